"""Compose the fine-tuning worker with metering: what ``modelmeter worker`` (and ``serve``'s subprocess) runs."""

from __future__ import annotations

import signal
import threading

from sqlalchemy.engine import Engine
from sqlmodel import Session

from modelmeter import clock, db
from modelmeter.billing.alerts import Alerts
from modelmeter.billing.catalog import PlanCatalog
from modelmeter.billing.ledger import AlertHook, UsageRecord, record_usage
from modelmeter.models.backends import resolve_device
from modelmeter.models.finetune.tables import FineTuningJob
from modelmeter.models.finetune.train import TrainResult
from modelmeter.models.finetune.worker import Worker, WorkerConfig
from modelmeter.settings import Settings
from modelmeter.tenancy.tenants import Tenant


def meter_training(session: Session, job: FineTuningJob, result: TrainResult, device: str,
                   alerts: AlertHook | None = None) -> None:
    """Training tokens (rows' tokens times epochs) go to the ledger in the job's own success transaction, with the
    usage alerts they cross (``alerts``: a worker's hook, looking every tenant up: training rows are few)."""
    tenant = session.get(Tenant, job.tenant_id)
    record = UsageRecord(
        request_id=f"train_{job.id}", tenant_id=job.tenant_id, model_id=job.model, created=clock.now_s(),
        plan=tenant.plan if tenant is not None else "",
        kind="training", endpoint="fine_tuning", device=device, requests=0,
        training_tokens=result.training_tokens, compute_us=int(result.wall_s * 1e6),
    )
    record_usage(session=session, records=[record], alerts=alerts)


def build_worker(settings: Settings, *, engine: Engine | None = None, show_progress: bool = True) -> Worker:
    """A worker on ``engine`` (a new one from ``settings`` when omitted; the caller disposes it)."""
    engine = engine or db.engine_from_settings(settings)
    config = WorkerConfig(
        data_dir=settings.data_dir,
        device=resolve_device(settings.device),
        poll_s=settings.worker_poll_s,
        heartbeat_timeout_s=settings.job_heartbeat_timeout_s,
        show_progress=show_progress,
    )
    hook = Alerts(PlanCatalog.load(settings.plans_file))

    def on_succeeded(session: Session, job: FineTuningJob, result: TrainResult, device: str) -> None:
        meter_training(session, job, result, device, alerts=hook)

    return Worker(db.session_maker(engine), config, on_succeeded=on_succeeded)


def run_worker(settings: Settings) -> None:
    """Run until SIGTERM or SIGINT; the job in progress is left for recovery (re-queued at next start)."""
    engine = db.engine_from_settings(settings)
    db.upgrade(engine)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        build_worker(settings, engine=engine).run_forever(stop)
    finally:
        engine.dispose()
