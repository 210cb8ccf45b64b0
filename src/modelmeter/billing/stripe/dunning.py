"""Past due: a tenant's ``billing_status`` follows its unpaid failed invoices, and a tenant past due for longer
than the grace period is suspended (and reactivated once nothing is past due).

Called by the webhook events that change an invoice (``refresh_billing``) and by every relay pass
(``suspend_overdue``); both run inside the caller's transaction.
"""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import func
from sqlmodel import Session, col, select, update

from modelmeter.billing.tables import Invoice
from modelmeter.tenancy.tenants import Tenant

log = logging.getLogger("modelmeter.stripe")


def suspend_overdue(*, session: Session, now: int, grace_s: int, tenant_id: str | None = None) -> list[str]:
    """Suspend active tenants past due for longer than ``grace_s``; returns their ids (caller commits)."""
    query = select(Tenant.id).where(
        Tenant.billing_status == "past_due", Tenant.status == "active",
        col(Tenant.past_due_since) <= now - grace_s,
    )
    if tenant_id is not None:
        query = query.where(Tenant.id == tenant_id)
    ids = list(session.exec(query).all())
    if ids:
        session.exec(update(Tenant).where(col(Tenant.id).in_(ids))
                     .values(status="suspended", suspension_reason="past_due", updated=now))
        log.warning("suspended %d tenant(s) past due beyond %d s: %s", len(ids), grace_s, ", ".join(ids))
    return ids


def refresh_billing(*, session: Session, tenant_id: str, now: int, grace_s: int) -> None:
    """Derive ``billing_status``/``past_due_since`` from the tenant's unpaid failed invoices; apply the grace period.

    A tenant suspended for non-payment is reactivated once nothing is past due.
    """
    since = session.exec(select(func.min(Invoice.payment_failed_at)).where(
        Invoice.tenant_id == tenant_id, col(Invoice.payment_failed_at).is_not(None),
        col(Invoice.status).not_in(("paid", "void")))).one()
    status, reason, billing, was_since = session.exec(
        select(Tenant.status, Tenant.suspension_reason, Tenant.billing_status, Tenant.past_due_since)
        .where(Tenant.id == tenant_id)).one()
    values: dict[str, Any] = {}
    if (billing, was_since) != ("past_due" if since else "ok", since):
        values |= {"billing_status": "past_due" if since else "ok", "past_due_since": since}
    if since is None and status == "suspended" and reason == "past_due":
        values |= {"status": "active", "suspension_reason": None}
    if values:
        session.exec(update(Tenant).where(col(Tenant.id) == tenant_id).values(**values, updated=now))
    suspend_overdue(session=session, now=now, grace_s=grace_s, tenant_id=tenant_id)
