"""Prepaid credits: grants, what is left of them, top-ups bought through Stripe, and what a period drew.

A grant's balance is its amount less its draws (``CreditDraw`` rows, written with the usage rows that drew them),
so the ledger alone says what every grant has left; the quota store holds a running copy for the atomic draw
(:mod:`modelmeter.billing.drawdown`). Amounts shown to people are whole cents: what is left is rounded down (a
fraction of a cent drawn counts as spent), a period's draws are rounded half-up like an invoice line.

Revenue from credits is counted once, when they pay for usage (see :mod:`modelmeter.billing.economics`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, Strict, StringConstraints
from sqlalchemy import func
from sqlalchemy.orm import sessionmaker
from sqlmodel import Session, col, select, update

from modelmeter import clock
from modelmeter.billing.drawdown import GrantBalance, draw_rank
from modelmeter.billing.tables import CreditDraw, CreditGrant, CreditPurchase
from modelmeter.errors import InvalidRequestError
from modelmeter.fields import INTEGRAL, PYTHON_RE
from modelmeter.ids import new_id
from modelmeter.money import MICRO_PER_CENT, micro_to_cents, round_half_up_div
from modelmeter.shapes import Page, Public
from modelmeter.tenancy.tenants import Tenant, get_tenant, lock_tenant

MAX_GRANT_CENTS = 100_000_000  # $1,000,000 in one grant
MIN_PURCHASE_CENTS = 500  # $5.00: below it, card fees eat the top-up
MAX_PURCHASE_CENTS = 1_000_000  # $10,000

Sessions = sessionmaker[Session]


class CreditGrantCreate(BaseModel):
    """An operator's grant: a positive amount, and optionally what it is for and when it lapses."""

    model_config = ConfigDict(extra="forbid", regex_engine=PYTHON_RE)

    amount_cents: Annotated[int, Strict(), Field(ge=1, le=MAX_GRANT_CENTS), INTEGRAL]
    description: Annotated[str, StringConstraints(max_length=500)] | None = None
    expires_at: Annotated[int, Strict(), Field(ge=0, le=2**31 - 1), INTEGRAL] | None = None


class CreditPurchaseCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    amount_cents: Annotated[int, Strict(), Field(ge=MIN_PURCHASE_CENTS, le=MAX_PURCHASE_CENTS), INTEGRAL]


# --- grants ---------------------------------------------------------------------------------------------


def grant(*, session: Session, tenant_id: str, amount_cents: int, source: str, description: str | None = None,
          expires_at: int | None = None, purchase_id: str | None = None, now: int | None = None) -> CreditGrant:
    """Add a grant (flushed, not committed) and bump the tenant's credits epoch, so quota stores load it."""
    now = clock.now_s() if now is None else now
    if expires_at is not None and expires_at <= now:
        raise InvalidRequestError("expires_at must be in the future.", code="invalid_expires_at", param="expires_at")
    lock_tenant(session=session, tenant_id=tenant_id)
    row = CreditGrant(id=new_id("cg"), tenant_id=tenant_id, source=source, amount_cents=amount_cents,
                      description=description, expires_at=expires_at, purchase_id=purchase_id, created=now)
    session.add(row)
    session.exec(update(Tenant).where(col(Tenant.id) == tenant_id)
                 .values(credits_epoch=col(Tenant.credits_epoch) + 1))
    session.flush()
    return row


def grant_credits(*, sessions: Sessions, tenant_id: str, data: CreditGrantCreate) -> CreditGrantPublic:
    """The operator's grant to an existing tenant (404 first), committed; its public form."""
    with sessions() as session:
        get_tenant(session=session, tenant_id=tenant_id)
        row = grant(session=session, tenant_id=tenant_id, amount_cents=data.amount_cents, source="granted",
                    description=data.description, expires_at=data.expires_at)
        session.commit()
        now = clock.now_s()
        return CreditGrantPublic.of(row, left_micro=left_micro(row, 0, now), now=now)


def drawn_by_grant(*, session: Session, grant_ids: Sequence[str]) -> dict[str, int]:
    """Micro-cents drawn from each grant, per the ledger."""
    if not grant_ids:
        return {}
    query = (select(CreditDraw.grant_id, func.sum(CreditDraw.amount_micro))
             .where(col(CreditDraw.grant_id).in_(grant_ids)).group_by(col(CreditDraw.grant_id)))
    return {grant_id: int(total or 0) for grant_id, total in session.exec(query).all()}


def _grants(*, session: Session, tenant_id: str) -> list[CreditGrant]:
    return list(session.exec(select(CreditGrant).where(CreditGrant.tenant_id == tenant_id)
                             .order_by(col(CreditGrant.id).desc())).all())


def left_micro(row: CreditGrant, drawn_micro: int, now: int) -> int:
    """What a grant can still pay, in micro-cents: nothing once expired."""
    if row.expires_at is not None and row.expires_at <= now:
        return 0
    return max(0, row.amount_cents * MICRO_PER_CENT - drawn_micro)


class CreditGrantPublic(Public):
    model_config = ConfigDict(title="CreditGrant")

    id: str
    object: Literal["credit_grant"]
    amount_cents: int
    remaining_cents: int  # what is left, in whole cents (rounded down); 0 once expired
    source: Literal["granted", "purchased"]
    description: str | None
    status: Literal["active", "used", "expired"]
    expires_at: int | None
    created: int

    @classmethod
    def of(cls, row: CreditGrant, *, left_micro: int, now: int) -> CreditGrantPublic:
        """``left_micro``: what the grant can still pay (``left_micro()`` of the function of that name)."""
        expired = row.expires_at is not None and row.expires_at <= now
        return cls(id=row.id, object="credit_grant", amount_cents=row.amount_cents,
                   remaining_cents=left_micro // MICRO_PER_CENT,
                   source=row.source,
                   description=row.description, status="expired" if expired else "active" if left_micro else "used",
                   expires_at=row.expires_at, created=row.created)


class CreditList(Page[CreditGrantPublic]):
    balance_cents: int  # what every live grant holds, in whole cents (rounded down)


def credits_page(*, session: Session, tenant_id: str, limit: int, after: str | None,
                 live: dict[str, int] | None = None) -> CreditList:
    """``GET /v1/billing/credits``: the tenant's grants, newest first, and the balance of all live ones.

    ``live`` (micro-cents left per grant, from the quota store) overrides the ledger for the grants it holds,
    so draws of requests still in flight show at once."""
    now = clock.now_s()
    rows = _grants(session=session, tenant_id=tenant_id)
    drawn = drawn_by_grant(session=session, grant_ids=[r.id for r in rows])
    left: dict[str, int] = {}
    for row in rows:
        used = drawn.get(row.id, 0)
        if live is not None and row.id in live:
            used = row.amount_cents * MICRO_PER_CENT - live[row.id]
        left[row.id] = left_micro(row, used, now)
    page = [row for row in rows if after is None or row.id < after]
    data = [CreditGrantPublic.of(r, left_micro=left[r.id], now=now) for r in page[:limit]]
    return CreditList(object="list", data=data, has_more=len(page) > limit,
                      balance_cents=sum(left.values()) // MICRO_PER_CENT)


def balance_cents(*, session: Session, tenant_id: str, now: int | None = None) -> int:
    """What the tenant's live grants hold, per the ledger, in whole cents (rounded down)."""
    now = clock.now_s() if now is None else now
    rows = _grants(session=session, tenant_id=tenant_id)
    drawn = drawn_by_grant(session=session, grant_ids=[r.id for r in rows])
    return sum(left_micro(r, drawn.get(r.id, 0), now) for r in rows) // MICRO_PER_CENT


def store_grants(*, sessions: Sessions, tenant_id: str, now: int) -> list[GrantBalance]:
    """The tenant's live grants with what the ledger says is left, for a quota store to load."""
    with sessions() as session:
        rows = _grants(session=session, tenant_id=tenant_id)
        drawn = drawn_by_grant(session=session, grant_ids=[r.id for r in rows])
    return [GrantBalance(r.id, draw_rank(source=r.source, expires_at=r.expires_at, created=r.created, grant_id=r.id),
                         r.expires_at, left_micro(r, drawn.get(r.id, 0), now))
            for r in rows if left_micro(r, drawn.get(r.id, 0), now) > 0]


def drawn_in_period(*, session: Session, tenant_id: str, period: str) -> dict[str, int]:
    """Micro-cents the period's usage drew, by source (``granted``, ``purchased``)."""
    query = (select(CreditGrant.source, func.sum(CreditDraw.amount_micro))
             .join(CreditGrant, col(CreditGrant.id) == col(CreditDraw.grant_id))
             .where(CreditDraw.tenant_id == tenant_id, CreditDraw.period == period)
             .group_by(col(CreditGrant.source)))
    return {source: int(total or 0) for source, total in session.exec(query).all()}


def return_overdraw(*, session: Session, tenant_id: str, period: str, over_micro: int, now: int
                    ) -> list[CreditGrant]:
    """Give back what a closing period drew past its usage charge (a volume tier repriced it below what its
    requests drew at the margin: ``drawdown``), as new grants the quota stores load with the next epoch.

    One grant per grant the period drew from, the last in the draw order first, each up to what the period drew
    from it, with its source and expiry and the amount rounded half-up to cents; the share of a grant that has
    expired since is not returned (it could pay nothing now). Flushed, not committed: the caller closes the period
    in the same transaction, so a period returns once."""
    if over_micro <= 0:
        return []
    query = (select(CreditDraw.grant_id, func.sum(CreditDraw.amount_micro))
             .where(CreditDraw.tenant_id == tenant_id, CreditDraw.period == period)
             .group_by(col(CreditDraw.grant_id)))
    drawn = {grant_id: int(total or 0) for grant_id, total in session.exec(query).all()}
    rows = session.exec(select(CreditGrant).where(col(CreditGrant.id).in_(list(drawn)))).all()
    rows = sorted(rows, reverse=True, key=lambda r: draw_rank(source=r.source, expires_at=r.expires_at,
                                                             created=r.created, grant_id=r.id))
    returned, due = [], over_micro
    for row in rows:
        part = min(due, drawn[row.id])
        due -= part
        cents = micro_to_cents(part)
        if cents > 0 and (row.expires_at is None or row.expires_at > now):
            returned.append(grant(session=session, tenant_id=tenant_id, amount_cents=cents, source=row.source,
                                  description=f"Returned from {period}: its volume tier charged less than it drew",
                                  expires_at=row.expires_at, now=now))
        if due <= 0:
            break
    return returned


def applied_cents(drawn_micro: int, usage_cents: int) -> int:
    """The credits an invoice applies: the period's draws rounded half-up, never more than its usage charges."""
    return max(0, min(micro_to_cents(drawn_micro), usage_cents))


def granted_share(applied: int, drawn: dict[str, int]) -> int:
    """The part of ``applied`` cents (an invoice's ``Credits applied``) that granted credits paid.

    ``applied`` is split between the sources in proportion to what each drew in the period (``drawn_in_period``,
    micro-cents), rounded half-up for the granted part; the purchased part is the rest, so the two add up to
    ``applied`` exactly. All of it when only granted credits were drawn, none when only purchased ones were."""
    granted, total = drawn.get("granted", 0), sum(drawn.values())
    if applied <= 0 or granted <= 0 or total <= 0:
        return 0
    return min(applied, round_half_up_div(applied * granted, total))


def outstanding_by_tenant(*, session: Session, now: int | None = None) -> dict[str, int]:
    """What every tenant's live grants still hold, per the ledger, in whole cents (rounded down, as
    ``balance_cents``): every tenant with an unexpired grant, used up or not. One grouped query, whatever the
    number of tenants."""
    now = clock.now_s() if now is None else now
    drawn = (select(CreditDraw.grant_id, func.sum(CreditDraw.amount_micro).label("drawn"))
             .group_by(col(CreditDraw.grant_id)).subquery())
    query = (select(CreditGrant.tenant_id, CreditGrant.amount_cents, func.coalesce(drawn.c.drawn, 0))
             .outerjoin(drawn, drawn.c.grant_id == col(CreditGrant.id))
             .where(col(CreditGrant.expires_at).is_(None) | (col(CreditGrant.expires_at) > now)))
    left: dict[str, int] = {}
    for tenant_id, amount_cents, used in session.exec(query).all():
        micro = max(0, amount_cents * MICRO_PER_CENT - int(used))
        left[tenant_id] = left.get(tenant_id, 0) + micro
    return {tenant_id: micro // MICRO_PER_CENT for tenant_id, micro in left.items()}


# --- purchases ------------------------------------------------------------------------------------------


class CreditPurchasePublic(Public):
    model_config = ConfigDict(title="CreditPurchase")

    id: str
    object: Literal["credit_purchase"]
    amount_cents: int
    currency: str
    status: Literal["pending", "paid"]
    credit_grant: str | None  # the grant made when Stripe reported the invoice paid
    stripe_invoice_id: str | None
    created: int
    paid_at: int | None

    @classmethod
    def of(cls, row: CreditPurchase) -> CreditPurchasePublic:
        return cls(id=row.id, object="credit_purchase", amount_cents=row.amount_cents, currency=row.currency,
                   status=row.status,
                   credit_grant=row.grant_id, stripe_invoice_id=row.stripe_invoice_id, created=row.created,
                   paid_at=row.paid_at)


def create_purchase(*, session: Session, tenant_id: str, amount_cents: int, currency: str) -> CreditPurchase:
    """A pending top-up (flushed, not committed): the caller queues its Stripe invoice in the same transaction."""
    row = CreditPurchase(id=new_id("cp"), tenant_id=tenant_id, amount_cents=amount_cents, currency=currency,
                         created=clock.now_s())
    session.add(row)
    session.flush()
    return row


def mark_paid(*, session: Session, purchase: CreditPurchase, paid_at: int, stripe_invoice_id: str | None) -> bool:
    """Grant a paid purchase's credits once (the tenant is locked by the caller); False when already granted."""
    if purchase.status == "paid":
        return False
    row = grant(session=session, tenant_id=purchase.tenant_id, amount_cents=purchase.amount_cents,
                source="purchased", description=f"Credit purchase {purchase.id}", purchase_id=purchase.id)
    purchase.status, purchase.paid_at, purchase.grant_id = "paid", paid_at, row.id
    purchase.stripe_invoice_id = purchase.stripe_invoice_id or stripe_invoice_id
    session.add(purchase)
    return True
