"""Engines for ``serve --workers N``: started before the fronts, restarted when one dies, stopped on exit.

One engine process per device (``MODELMETER_DEVICES``). The supervisor waits until each engine answers a ping on
its socket (the platform base model loaded) before the fronts start, so a front's ``/readyz`` is only ever green
with an engine behind it. A watcher thread restarts an engine that exits, with a short backoff; the fronts see the
gap as 503 ``engine_unavailable`` and reconnect on their own once the new engine binds the same socket.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import zmq

from modelmeter.models.engine import protocol as p
from modelmeter.settings import Settings

log = logging.getLogger("modelmeter.supervisor")
MAX_IPC_PATH = 100  # sun_path holds 108 bytes; ZMQ wants room for the terminator
PING_EVERY_S = 1.0  # float-ok: how often the supervisor pings each running engine
HUNG_S = 20.0  # float-ok: an engine silent this long is killed and restarted


def devices_of(settings: Settings) -> list[str]:
    """``MODELMETER_DEVICES``, or every CUDA device, else the CPU."""
    if settings.devices:
        return [d.strip() for d in settings.devices.split(",") if d.strip()]
    if settings.device not in ("auto", ""):
        return [settings.device]
    # Asked of a child interpreter: with one front, the supervisor's process is that front, and stays torch-free.
    probe = "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)"
    found = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=False)  # noqa: S603
    count = int(found.stdout.strip() or 0) if found.returncode == 0 else 0
    return [f"cuda:{i}" for i in range(count)] or ["cpu"]


def socket_dir(settings: Settings) -> Path:
    """``<data dir>/run/<host>-<pid>`` (0700: one per supervisor, so two servers, or two pods on a shared data
    volume, never bind or unlink each other's sockets); a fresh private temporary directory when that path is too
    long for a Unix socket."""
    run = (settings.data_dir / "run").resolve() / f"{socket.gethostname()[:24]}-{os.getpid()}"
    if len(str(run / "engine-00.sock")) <= MAX_IPC_PATH:
        run.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(run.parent, 0o700)
        run.mkdir(mode=0o700, exist_ok=True)
        os.chmod(run, 0o700)
        return run
    return Path(tempfile.mkdtemp(prefix="modelmeter-run-"))  # mkdtemp makes it 0700


@dataclass
class EngineProcess:
    index: int
    device: str
    socket: Path
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0
    started_at: float = field(default=0.0)
    checked_at: float = field(default=0.0)
    answered_at: float = field(default=0.0)


class Supervisor:
    """Starts, watches and stops the engine processes."""

    def __init__(self, settings: Settings, *, devices: list[str] | None = None, ready_timeout_s: float = 180.0,
                 env: dict[str, str] | None = None) -> None:
        self.settings = settings
        run = socket_dir(settings)
        self.engines = [EngineProcess(i, d, run / f"engine-{i:02d}.sock")
                        for i, d in enumerate(devices or devices_of(settings))]
        self._ready_timeout_s = ready_timeout_s
        self._env = env
        self._stopping = threading.Event()
        self._watcher: threading.Thread | None = None
        self.restarts = 0

    @property
    def sockets(self) -> str:
        """The value fronts get as ``MODELMETER_ENGINE_SOCKETS``."""
        return ",".join(str(e.socket) for e in self.engines)

    def start(self) -> None:
        for engine in self.engines:
            self._spawn(engine)
        for engine in self.engines:
            self._wait_ready(engine)
        self._watcher = threading.Thread(target=self._watch, name="engine-supervisor", daemon=True)
        self._watcher.start()

    def _spawn(self, engine: EngineProcess) -> None:
        command = [sys.executable, "-m", "modelmeter.runtime.engine", "--device", engine.device,
                   "--socket", str(engine.socket)]
        # Its own session: a Ctrl-C to the terminal's process group reaches the fronts, not the engines, which are
        # stopped after the fronts have drained (and stop themselves should this supervisor die).
        engine.process = subprocess.Popen(command, env=self._env, start_new_session=True)  # noqa: S603
        engine.starts += 1
        engine.started_at = time.monotonic()
        log.info("engine %d on %s started (pid %d)", engine.index, engine.device, engine.process.pid)

    def _wait_ready(self, engine: EngineProcess) -> None:
        deadline = time.monotonic() + self._ready_timeout_s
        while not answers_ping(engine.socket):
            process = engine.process
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"engine {engine.index} on {engine.device} exited with {process.returncode} "
                                   "before it was ready (see its log above)")
            if time.monotonic() > deadline:
                raise RuntimeError(f"engine {engine.index} on {engine.device} not ready after "
                                   f"{self._ready_timeout_s:g} s")
            time.sleep(0.1)

    def _watch(self) -> None:
        while not self._stopping.wait(0.1):
            for engine in self.engines:
                process = engine.process
                if process is not None and process.poll() is None:
                    self._check_alive(engine, process)
                    continue
                if process is None or self._stopping.is_set():
                    continue
                _forget_metrics(process.pid)
                log.error("engine %d on %s (pid %d) exited with %s; restarting", engine.index, engine.device,
                          process.pid, process.returncode)
                # A crash loop backs off (a second), a one-off death restarts at once.
                if time.monotonic() - engine.started_at < 5.0:
                    self._stopping.wait(1.0)
                if not self._stopping.is_set():
                    self.restarts += 1
                    self._spawn(engine)

    def _check_alive(self, engine: EngineProcess, process: subprocess.Popen[bytes]) -> None:
        """A running engine that has not answered a ping for ``HUNG_S`` is killed (the watcher then restarts it)."""
        now = time.monotonic()
        if now - engine.checked_at < PING_EVERY_S or now - engine.started_at < self._ready_timeout_s / 4:
            return
        engine.checked_at = now
        if answers_ping(engine.socket, timeout_ms=1000):
            engine.answered_at = now
        elif now - max(engine.answered_at, engine.started_at) > HUNG_S:
            log.error("engine %d on %s (pid %d) has not answered for %g s; killing it", engine.index, engine.device,
                      process.pid, HUNG_S)
            process.kill()

    def stop(self, timeout_s: float = 15.0) -> None:  # float-ok: seconds
        self._stopping.set()
        if self._watcher is not None:
            self._watcher.join(timeout=2)
        for engine in self.engines:
            if engine.process is not None and engine.process.poll() is None:
                engine.process.terminate()
        deadline = time.monotonic() + timeout_s
        for engine in self.engines:
            if engine.process is None:
                continue
            try:
                engine.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                engine.process.kill()
                engine.process.wait()
            engine.socket.unlink(missing_ok=True)
        if self.engines:
            shutil.rmtree(self.engines[0].socket.parent, ignore_errors=True)


def _forget_metrics(pid: int) -> None:
    """Drop a dead engine's live gauges from the multiprocess metrics (its counters stay, as Prometheus expects)."""
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if directory:
        from prometheus_client.multiprocess import mark_process_dead

        mark_process_dead(pid, directory)  # type: ignore[no-untyped-call]  # untyped lib


def answers_ping(path: Path, timeout_ms: int = 500) -> bool:
    """Whether an engine serves ``path`` (one ping, one pong)."""
    if not path.exists():
        return False
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(f"ipc://{path}")
        sock.send(p.to_engine_encoder.encode(p.Ping(0, 0)))
        if not sock.poll(timeout_ms):
            return False
        return isinstance(p.to_front_decoder.decode(sock.recv()), p.Pong)
    except (zmq.ZMQError, msgspec.DecodeError):
        return False
    finally:
        sock.close(linger=0)
