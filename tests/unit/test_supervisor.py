"""The supervisor's pure parts: which devices get an engine, where the sockets live (0700, or a private temporary
directory when the data dir's path is too long for a Unix socket), and the readiness probe on a missing socket.
Starting, restarting and stopping real engines is tested in tests/integration/test_engine_processes.py."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from modelmeter.runtime.supervisor import MAX_IPC_PATH, answers_ping, devices_of, socket_dir
from modelmeter.settings import Settings


def test_devices_come_from_the_setting_then_the_single_device(tmp_path: Path) -> None:
    assert devices_of(Settings(data_dir=tmp_path, devices="cuda:0, cuda:1")) == ["cuda:0", "cuda:1"]
    assert devices_of(Settings(data_dir=tmp_path, device="cpu")) == ["cpu"]


def test_sockets_live_in_a_private_directory_of_this_supervisor(tmp_path: Path) -> None:
    run = socket_dir(Settings(data_dir=tmp_path / "data"))
    assert run.parent == (tmp_path / "data" / "run").resolve()
    assert run.name.endswith(f"-{os.getpid()}")  # two servers on one data dir never share a socket path
    assert stat.S_IMODE(run.stat().st_mode) == 0o700
    assert stat.S_IMODE(run.parent.stat().st_mode) == 0o700


def test_a_data_dir_too_long_for_a_socket_gets_a_private_temporary_one(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * MAX_IPC_PATH)
    run = socket_dir(Settings(data_dir=deep))
    assert len(str(run / "engine-00.sock")) <= MAX_IPC_PATH
    assert stat.S_IMODE(run.stat().st_mode) == 0o700
    assert not str(run).startswith(str(deep))


def test_no_socket_no_engine(tmp_path: Path) -> None:
    assert not answers_ping(tmp_path / "missing.sock")
