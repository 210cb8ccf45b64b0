"""The events of a batch that ended: ``batch.completed`` and ``batch.failed``, written by the batch runner in the
transaction that sets the final status, once per batch, whether or not alerts are set (a delivery to the tenant's
alert URL only when they are). They share the usage alerts' table, outbox and relay (:mod:`.alerts`,
:mod:`.alert_relay`); ``alerts.EventPublic`` is their public shape, with this module's ``BatchEventData``."""

from __future__ import annotations

from typing import Literal

from sqlalchemy import insert as sa_insert
from sqlalchemy import select as sa_select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection
from sqlmodel import col

from modelmeter import clock
from modelmeter.billing.tables import AlertDelivery, AlertEvent, AlertSetting
from modelmeter.ids import new_id
from modelmeter.shapes import Public

BATCH_EVENT_TYPES = {"completed": "batch.completed", "failed": "batch.failed"}  # a batch's final status -> event


class BatchRequestCounts(Public):
    total: int
    completed: int  # lines answered (the output file)
    failed: int  # lines refused (the error file)


class BatchEventData(Public):
    """``batch.completed`` and ``batch.failed``: the batch as it ended (``GET /v1/batches/{id}`` has the rest)."""

    id: str  # batch_…
    status: Literal["completed", "failed"]
    request_counts: BatchRequestCounts
    output_file_id: str | None
    error_file_id: str | None


_BATCH_EVENT_INSERTS = {
    name: dialect.insert(AlertEvent).on_conflict_do_nothing(index_elements=["batch_id", "type"])
    .returning(col(AlertEvent.id))
    for name, dialect in (("postgresql", postgresql), ("sqlite", sqlite))
}
_DELIVERY_INSERT = sa_insert(AlertDelivery)


def batch_ended(conn: Connection, *, tenant_id: str, batch_id: str, status: str, total: int, completed: int,
                failed: int, output_file_id: str | None, error_file_id: str | None) -> str | None:
    """Write the event of a batch that ended in ``status`` (``batch.completed``, ``batch.failed``; no other status
    has one) and its delivery to the tenant's alert URL, if it has one; returns the new event's id.

    Called by the batch runner on the connection of the transaction that sets the final status, so the event
    exists exactly when that status does; once per batch whatever runs it again (unique ``(batch_id, type)``,
    ``ON CONFLICT DO NOTHING``: None then, and no second delivery). The values are the batch's as it ended (this
    layer does not read batches)."""
    event_type = BATCH_EVENT_TYPES.get(status)
    if event_type is None:
        return None
    now = clock.now_s()
    # The same width as a crossing's id (``Alerts._write``), so that ids of both kinds sort by time together.
    values = {"id": f"{new_id('evt')}00", "type": event_type, "tenant_id": tenant_id, "created": now,
              "batch_id": batch_id, "requests_total": total, "requests_completed": completed,
              "requests_failed": failed, "output_file_id": output_file_id, "error_file_id": error_file_id}
    event_id = conn.execute(_BATCH_EVENT_INSERTS[conn.dialect.name], values).scalar_one_or_none()
    if event_id is None:
        return None
    query = sa_select(col(AlertSetting.url)).where(col(AlertSetting.tenant_id) == tenant_id)
    if conn.dialect.name == "postgresql":  # as ``Alerts.fire``: a concurrent DELETE of the settings waits for us
        query = query.with_for_update()
    url = conn.execute(query).scalar_one_or_none()
    if url is not None:
        conn.execute(_DELIVERY_INSERT, [{"event_id": event_id, "tenant_id": tenant_id, "url": url,
                                         "status": "pending", "attempts": 0, "next_attempt_at": now,
                                         "created": now}])
    return str(event_id)
