"""The ``modelmeter`` command (``modelmeter.cli:main``, or ``python -m modelmeter.cli``)."""

from modelmeter.cli.main import main

__all__ = ["main"]
