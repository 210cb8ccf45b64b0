"""External programs some tests drive (Debian's chromium, prometheus, promtool): missing ones fail the test
when ``CI`` is set (CI must install them), and skip it with the reason otherwise."""

from __future__ import annotations

import os
import shutil

import pytest

APT_PACKAGE = {"chromium": "chromium", "prometheus": "prometheus", "promtool": "prometheus"}


def require_binary(name: str) -> str:
    """The program's path; fail under CI, skip elsewhere, when it is not installed."""
    path = shutil.which(name) or (f"/usr/bin/{name}" if os.access(f"/usr/bin/{name}", os.X_OK) else None)
    if path is not None:
        return path
    reason = f"'{name}' is not installed (apt-get install -y {APT_PACKAGE.get(name, name)})"
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; CI must install it")
    pytest.skip(reason)
