"""Process management: the gateway (one process or several), the fine-tuning worker, and migrations."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import click

from modelmeter import db
from modelmeter.settings import Settings, ensure_admin_token, weak_secrets


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--worker/--no-worker", default=None, help="Start a fine-tuning worker process (default: on).")
@click.option("--workers", default=1, show_default=True, type=click.IntRange(1, 64),
              help="Front processes sharing the port (HTTP, auth, limits, metering, tokenization).")
@click.option("--engine", "engine_mode", type=click.Choice(["auto", "process", "inprocess"]), default="auto",
              show_default=True,
              help="Where models run: one engine process per device (MODELMETER_DEVICES) fed by every front, or "
                   "inside the single front. auto: in-process with one front, engine processes with several.")
def serve(host: str, port: int, worker: bool | None, workers: int, engine_mode: str) -> None:
    """Run the gateway on embedded defaults (SQLite, local model store, the packaged base model)."""
    settings = Settings()
    if worker is not None:
        settings.start_worker = worker
    token, generated = ensure_admin_token(settings)
    problems = weak_secrets(settings)
    if problems:
        for problem in problems:
            click.echo(f"modelmeter serve: refusing to start: {problem}.", err=True)
        raise SystemExit(2)
    if generated:
        click.echo(f"Admin token (shown once, kept in {settings.data_dir}/admin_token): {token}", err=True)
    separate = engine_mode == "process" or (engine_mode == "auto" and workers > 1)
    if workers > 1 and not separate:
        raise click.UsageError("--engine inprocess runs one front: it cannot be combined with --workers > 1.")
    if workers > 1 and not settings.redis_url:
        raise click.UsageError(
            "--workers > 1 needs MODELMETER_REDIS_URL: rate limits and quotas must be shared by the processes, "
            "or each would enforce its own copy."
        )
    if settings.simulated_device:
        click.echo(f"WARNING: simulated device ({settings.simulated_device}): engines wait instead of computing "
                   "and return made-up outputs. For capacity planning only.", err=True)
    if not separate:
        import uvicorn

        from modelmeter.gateway.app import create_app

        uvicorn.run(create_app(settings), host=host, port=port, access_log=False, log_level=settings.log_level)
        return
    _serve_processes(settings, host, port, workers)


def _serve_processes(settings: Settings, host: str, port: int, workers: int) -> None:
    """Engines first (one per device, ready before any front answers), then the fronts on one socket, one
    fine-tuning worker beside them; metrics in multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``, else a fresh local
    temporary directory: never a volume another host shares). SIGTERM/SIGINT stop the fronts, then the engines."""
    import inspect
    import shutil
    import tempfile

    import uvicorn

    from modelmeter.runtime.supervisor import Supervisor
    from modelmeter.runtime.worker import spawn_worker, stop_worker

    given = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    metrics_dir = Path(given) if given else Path(tempfile.mkdtemp(prefix="modelmeter-metrics-"))
    metrics_dir.mkdir(parents=True, exist_ok=True)
    for stale in metrics_dir.glob("*.db"):
        stale.unlink()
    os.environ.update({"PROMETHEUS_MULTIPROC_DIR": str(metrics_dir.resolve()), "MODELMETER_START_WORKER": "false",
                       "MODELMETER_DATA_DIR": str(settings.data_dir.resolve())})
    engine = db.engine_from_settings(settings)
    db.upgrade(engine)  # once, here: the processes' own (no-op) upgrades then never race on a fresh database
    engine.dispose()
    supervisor = Supervisor(settings)
    # uvicorn re-raises the SIGTERM/SIGINT it caught once it has shut down; ending with SystemExit here lets the
    # engines and the worker be stopped below instead of the signal's default action killing this process.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _exit_on_signal)
    child = None
    try:
        supervisor.start()  # raises when an engine cannot start: nothing answers without one
        os.environ["MODELMETER_ENGINE_SOCKETS"] = supervisor.sockets
        child = spawn_worker(settings) if settings.start_worker else None
        # A front on a busy machine can take longer than uvicorn's 5 s default to answer its first health check,
        # and would be killed and restarted forever.
        supported = "timeout_worker_healthcheck" in inspect.signature(uvicorn.run).parameters
        patience: dict[str, Any] = {"timeout_worker_healthcheck": 60} if supported and workers > 1 else {}
        uvicorn.run("modelmeter.gateway.app:create_app", factory=True, host=host, port=port, workers=workers,
                    access_log=False, log_level=settings.log_level, **patience)
    finally:
        if child is not None:
            stop_worker(child)
        supervisor.stop()
        if not given:
            shutil.rmtree(metrics_dir, ignore_errors=True)


def _exit_on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum if signum != signal.SIGTERM else 0)


@click.command()
def worker() -> None:
    """Run fine-tuning jobs, one at a time, until stopped (SIGTERM/SIGINT)."""
    from modelmeter.trainer import run_worker

    run_worker(Settings())


@click.group("db")
def db_group() -> None:
    """Database administration."""


@db_group.command("upgrade")
def db_upgrade() -> None:
    """Apply every pending migration."""
    settings = Settings()
    engine = db.engine_from_settings(settings)
    db.upgrade(engine)
    click.echo(f"database at revision {db.current_revision(engine)}")
    engine.dispose()


COMMANDS = (serve, worker, db_group)
