"""Operator verbs for fine-tuning jobs: any tenant's jobs, one job, and its events (followed as they come).

They read the database through the service functions (``ops.jobs``), so they work with or without a running
server, and whichever worker trains the job.
"""

from __future__ import annotations

import time

import click

from modelmeter.cli.output import admin_services, dump, emit, json_option, reports_errors
from modelmeter.cli.progress import ProgressDisplay, event_line, follow_job
from modelmeter.models.finetune.tables import FineTuningJobPublic
from modelmeter.ops import jobs as ops
from modelmeter.shapes import Page


@click.group()
def jobs() -> None:
    """List fine-tuning jobs, show one, and follow its events."""


def _when(ts: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


def _accuracy(job: FineTuningJobPublic) -> str:
    result = job.result or {}
    return f"{result['accuracy']:.4f}" if "accuracy" in result else "-"


def _job_line(j: FineTuningJobPublic) -> str:
    return (f"{j.id}  {j.organization_id}  {j.status:<16} {j.model:<20} "
            f"{j.fine_tuned_model or '-':<44} accuracy={_accuracy(j):<6} created {_when(j.created_at)}")


def _job_text(j: FineTuningJobPublic) -> str:
    hp = j.hyperparameters
    lines = {
        "id": j.id, "tenant": j.organization_id, "status": j.status, "model": j.model,
        "fine_tuned_model": j.fine_tuned_model or "-",
        "training_type": " ".join(f"{k}={v}" for k, v in j.training_type.items()),
        "hyperparameters": f"n_epochs={hp.n_epochs} batch_size={hp.batch_size} "
                           f"learning_rate_multiplier={hp.learning_rate_multiplier}",
        "training_file": j.training_file, "validation_file": j.validation_file or "-",
        "created": _when(j.created_at), "finished": _when(j.finished_at),
        "trained_tokens": j.trained_tokens if j.trained_tokens is not None else "-",
    }
    if j.error:
        lines["error"] = f"{j.error.code}: {j.error.message}"
    result = j.result or {}
    if "accuracy" in result:
        lines["accuracy"] = f"{result['accuracy']:.4f} (macro F1 {result.get('macro_f1', float('nan')):.4f}, " \
                            f"{result.get('n_validation', '?')} validation rows)"
    if "wall_s" in result:
        lines["training_time"] = f"{result['wall_s']} s"
    return "\n".join(f"{k:>18}: {v}" for k, v in lines.items())


@jobs.command("list")
@click.option("--tenant", "tenant_id", help="Only this tenant's jobs.")
@click.option("--limit", default=100, show_default=True, type=click.IntRange(1, 1000))
@json_option
@reports_errors
def jobs_list(tenant_id: str | None, limit: int, as_json: bool) -> None:
    """Fine-tuning jobs, newest first: every tenant's, or one tenant's."""
    with admin_services() as services:
        data, has_more = ops.list_jobs(sessions=services.sessions, tenant_id=tenant_id, limit=limit, after=None)
    emit(as_json, dump(Page.of(data, has_more)), lambda _: "\n".join(_job_line(j) for j in data) or "no jobs")


@jobs.command("show")
@click.argument("job_id")
@json_option
@reports_errors
def jobs_show(job_id: str, as_json: bool) -> None:
    """One job: status, hyperparameters, result (accuracy) or error."""
    with admin_services() as services:
        payload = ops.get_job(sessions=services.sessions, job_id=job_id)
    emit(as_json, dump(payload), lambda _: _job_text(payload))


@jobs.command("events")
@click.argument("job_id")
@click.option("--follow", "-f", is_flag=True, help="Keep printing events, with a progress bar, until the job ends.")
@click.option("--interval", default=1.0, show_default=True, type=click.FloatRange(0.05, 60), help="Seconds "
              "between reads when following.")
@json_option
@reports_errors
def jobs_events(job_id: str, follow: bool, interval: float, as_json: bool) -> None:
    """A job's events, oldest first (with --json: the API's list, newest first; with --json --follow: one JSON
    event a line, as they come)."""
    with admin_services() as services:
        if not follow:
            job, events = ops.job_events(sessions=services.sessions, job_id=job_id, limit=10**6)
            emit(as_json, dump(Page.of(events[::-1])),
                 lambda _: "\n".join(event_line(e) for e in events) or "no events")
            return
        display = ProgressDisplay(as_json=as_json)
        job = follow_job(lambda after: ops.job_events(sessions=services.sessions, job_id=job_id, after_seq=after),
                         display, interval_s=interval)
    if not as_json:
        click.echo(f"{job.id} {job.status}" + (f": {job.fine_tuned_model} (accuracy {_accuracy(job)})"
                                               if job.status == "succeeded" else ""))
    if job.status != "succeeded":
        raise SystemExit(1)


COMMANDS = (jobs,)
