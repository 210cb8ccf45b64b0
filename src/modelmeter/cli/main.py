"""The ``modelmeter`` command: the group, and the verbs of each concern added to it."""

from __future__ import annotations

import logging
import os

import click

from modelmeter.cli import admin, batches, jobs, process, quickstart


@click.group()
@click.option("-v", "--verbose", is_flag=True, help="Log at debug level.")
def main(verbose: bool) -> None:
    """modelmeter: a metered model-API platform for fine-tuned BERT models."""
    level = "DEBUG" if verbose else os.environ.get("MODELMETER_LOG_LEVEL", "info").upper()  # what serve honours
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("alembic").setLevel(logging.DEBUG if verbose else logging.WARNING)


for _command in (*process.COMMANDS, *admin.COMMANDS, *jobs.COMMANDS, *batches.COMMANDS, *quickstart.COMMANDS):
    main.add_command(_command)
