"""Operator verbs for batches: every tenant's batches, one batch, and its progress followed as a bar.

They read the database (``models.batches``), so they work with or without a running server.
"""

from __future__ import annotations

import time

import click
from sqlmodel import col, select
from tqdm import tqdm

from modelmeter.cli.output import admin_services, emit, json_option, reports_errors
from modelmeter.errors import NotFoundError
from modelmeter.models.batches import FINISHED, Batch, BatchPublic
from modelmeter.shapes import Page


@click.group()
def batches() -> None:
    """List batches (the Batch API), show one, and follow its progress."""


def _when(ts: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


def _line(b: BatchPublic) -> str:
    counts = b.request_counts
    return (f"{b.id}  {b.status:<11} {b.endpoint:<15} {counts.completed + counts.failed:>6}/{counts.total:<6} "
            f"failed={counts.failed:<5} created {_when(b.created_at)}")


def _find(batch_id: str) -> BatchPublic:
    with admin_services() as services, services.sessions() as session:
        row = session.get(Batch, batch_id)
        if row is None:
            raise NotFoundError(f"No such batch: '{batch_id}'.", code="batch_not_found", param="batch_id")
        return BatchPublic.of(row)


@batches.command("list")
@click.option("--tenant", "tenant_id", help="Only this tenant's batches.")
@click.option("--limit", default=100, show_default=True, type=click.IntRange(1, 1000))
@json_option
@reports_errors
def batches_list(tenant_id: str | None, limit: int, as_json: bool) -> None:
    """Batches, newest first: every tenant's, or one tenant's."""
    with admin_services() as services, services.sessions() as session:
        query = select(Batch).order_by(col(Batch.id).desc()).limit(limit + 1)
        if tenant_id is not None:
            query = query.where(Batch.tenant_id == tenant_id)
        rows = list(session.exec(query).all())
        page = Page.of([BatchPublic.of(b) for b in rows[:limit]], len(rows) > limit)
    emit(as_json, page, lambda p: "\n".join(_line(b) for b in p.data) or "no batches")


@batches.command("show")
@click.argument("batch_id")
@click.option("--follow", "-f", is_flag=True, help="Show a progress bar until the batch finishes.")
@click.option("--interval", default=1.0, show_default=True, type=click.FloatRange(0.05, 60),
              help="Seconds between reads when following.")
@json_option
@reports_errors
def batches_show(batch_id: str, follow: bool, interval: float, as_json: bool) -> None:
    """One batch: status, counts, files, errors (with --follow: a bar until it finishes; exit 1 unless it
    completed)."""
    batch = _find(batch_id)
    if follow:
        with tqdm(total=batch.request_counts.total, desc=batch.id, unit="line", disable=as_json) as bar:
            while True:
                counts = batch.request_counts
                bar.n = counts.completed + counts.failed
                bar.set_postfix_str(f"{batch.status}, {counts.failed} failed", refresh=True)
                if batch.status in FINISHED:
                    break
                time.sleep(interval)
                batch = _find(batch_id)
    emit(as_json, batch, lambda b: "\n".join([
        _line(b),
        f"{'output file':>14}: {b.output_file_id or '-'}",
        f"{'error file':>14}: {b.error_file_id or '-'}",
        *(f"{'error':>14}: line {e.line}: {e.code}: {e.message}" for e in (b.errors.data if b.errors else [])),
    ]))
    if follow and batch.status != "completed":
        raise SystemExit(1)


COMMANDS = (batches,)
