"""The fine-tuning worker as a child process of ``serve`` (it imports torch; the gateway that starts it need not)."""

from __future__ import annotations

import os
import subprocess
import sys

from modelmeter.settings import Settings


def spawn_worker(settings: Settings) -> subprocess.Popen[bytes]:
    """Start ``modelmeter worker`` as a child process on the same data dir, database and device."""
    env = {
        **os.environ,
        "MODELMETER_DATA_DIR": str(settings.data_dir.resolve()),
        "MODELMETER_DATABASE_URL": settings.effective_database_url,
        "MODELMETER_DEVICE": settings.device,
    }
    return subprocess.Popen([sys.executable, "-m", "modelmeter.cli", "worker"], env=env)


def stop_worker(process: subprocess.Popen[bytes], timeout_s: float = 10.0) -> None:  # float-ok: seconds
    process.terminate()
    try:
        process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
