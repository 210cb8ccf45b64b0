"""Look before create: the Stripe object behind each outbox row, and its Stripe ids recorded on our side.

Each ``_send_<kind>`` first looks in Stripe for the object that carries our metadata and creates it only when
absent (passing the row's idempotency key), so a row sent twice makes one object. It returns a ``Sent`` whose
``record`` the relay runs in the transaction that marks the row done. ``StripeRelay`` extends ``StripeMirror``
with leasing, ordering and retries (:mod:`modelmeter.billing.stripe.relay`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import stripe
from sqlalchemy.orm import sessionmaker
from sqlmodel import Session, col, select, update

from modelmeter import clock
from modelmeter.billing.catalog import PlanCatalog
from modelmeter.billing.stripe.client import PermanentSyncError
from modelmeter.billing.stripe.outbox import idempotency_key
from modelmeter.billing.tables import CreditPurchase, Invoice, InvoiceLine, StripeOutbox, StripePlan
from modelmeter.tenancy.tenants import Tenant

log = logging.getLogger("modelmeter.stripe")

T = TypeVar("T")


@dataclass(frozen=True)
class Sent:
    """What one row made in Stripe, and how to record it on our side (in the transaction that marks it done)."""

    stripe_id: str
    record: Callable[[Session], None]


class StripeMirror:
    """Finds or creates the Stripe objects that mirror ours: customers, plans and subscriptions, invoices, and the
    invoices of credit purchases."""

    def __init__(self, *, client: stripe.StripeClient, sessions: sessionmaker[Session], catalog: PlanCatalog) -> None:
        self._client = client
        self._sessions = sessions
        self._catalog = catalog
        self._plans: dict[str, StripePlan] = {}

    # customers

    def _send_customer(self, row: StripeOutbox) -> Sent:
        tenant_id = row.tenant_id
        customer = self._ensure_customer(tenant_id, row.payload["email"], row.payload["name"], row.idempotency_key)
        return Sent(customer.id, lambda s: _set_tenant(session=s, tenant_id=tenant_id, stripe_customer_id=customer.id))

    def _ensure_customer(self, tenant_id: str, email: str, name: str, key: str) -> stripe.Customer:
        found = self._client.v1.customers.list(params={"email": email, "limit": 100})
        for customer in found.auto_paging_iter():
            if _meta(customer).get("tenant_id") == tenant_id:
                return customer
        return self._client.v1.customers.create(
            params={"email": email, "name": name, "metadata": {"tenant_id": tenant_id}},
            options={"idempotency_key": key},
        )

    def _customer_id(self, tenant_id: str) -> str:
        """The tenant's Customer id; created here when the tenant predates Stripe being switched on."""
        with self._sessions() as session:
            found = session.exec(select(Tenant.stripe_customer_id, Tenant.email, Tenant.name)
                                 .where(Tenant.id == tenant_id)).first()
        if found is None:
            raise PermanentSyncError(f"tenant {tenant_id} does not exist")
        customer_id, email, name = found
        if customer_id:
            return str(customer_id)
        customer = self._ensure_customer(tenant_id, email, name, idempotency_key("customer", tenant_id))
        with self._sessions() as session:
            _set_tenant(session=session, tenant_id=tenant_id, stripe_customer_id=customer.id)
            session.commit()
        return customer.id

    # plans and subscriptions

    def _send_subscription(self, row: StripeOutbox) -> Sent:
        tenant_id, change_id = row.tenant_id, str(row.payload["change_id"])
        customer_id = self._customer_id(tenant_id)
        mapping = self._ensure_plan(row.payload["plan"])
        ours = [s for s in self._client.v1.subscriptions.list(
            params={"customer": customer_id, "status": "all", "limit": 100}).auto_paging_iter()
            if _meta(s).get("tenant_id") == tenant_id]
        current = next((s for s in ours if _meta(s).get("mm_change_id") == change_id), None)
        if current is None:
            current = self._client.v1.subscriptions.create(
                params={"customer": customer_id, "items": [{"plan": mapping.price_id}],
                        "metadata": {"tenant_id": tenant_id, "mm_plan": mapping.plan, "mm_change_id": change_id}},
                options={"idempotency_key": row.idempotency_key},
            )
        for old in ours:  # the subscriptions of earlier plan changes
            if old.id != current.id and old.status not in ("canceled", "incomplete_expired"):
                self._client.v1.subscriptions.cancel(old.id)
        subscription_id = current.id

        def record(session: Session) -> None:
            session.merge(mapping)
            _set_tenant(session=session, tenant_id=tenant_id, stripe_subscription_id=subscription_id)

        return Sent(subscription_id, record)

    def _ensure_plan(self, plan_id: str) -> StripePlan:
        """The Product and the (zero-priced) monthly Plan that mirror a catalog plan, created once."""
        if plan_id in self._plans:
            return self._plans[plan_id]
        plan = self._catalog.get(plan_id)
        product_id, price_id = f"mm_{plan.id}", f"mm_{plan.id}_{plan.currency}_monthly"
        _retrieve_or_create(lambda: self._client.v1.products.retrieve(product_id),
                            lambda: self._client.v1.products.create(
                                params={"id": product_id, "name": plan.name, "metadata": {"mm_plan": plan.id}}))
        _retrieve_or_create(lambda: self._client.v1.plans.retrieve(price_id),
                            lambda: self._client.v1.plans.create(params={
                                "id": price_id, "product": product_id, "amount": 0, "currency": plan.currency,
                                "interval": "month", "nickname": f"{plan.name} (priced by modelmeter invoices)",
                                "metadata": {"mm_plan": plan.id, "mm_base_fee_cents": str(plan.base_fee_cents)}}))
        mapping = StripePlan(plan=plan.id, product_id=product_id, price_id=price_id, synced_at=clock.now_s())
        self._plans[plan_id] = mapping
        return mapping

    # invoices

    def _send_invoice(self, row: StripeOutbox) -> Sent:
        invoice, lines = self._load_invoice(row.object_id)
        customer_id = self._customer_id(invoice.tenant_id)
        found = self._find_invoice(customer_id, "mm_invoice_id", invoice.id)
        if found is None:
            self._ensure_items(row, customer_id, invoice, lines)
            found = self._client.v1.invoices.create(
                params={"customer": customer_id, "description": f"modelmeter {invoice.period}",
                        "metadata": _invoice_metadata(invoice), "pending_invoice_items_behavior": "include"},
                options={"idempotency_key": row.idempotency_key},
            )
        found = self._settle(found, _invoice_metadata(invoice))
        items = self._check_amounts(found, invoice, lines)
        invoice_id, stripe_id = invoice.id, found.id
        return Sent(stripe_id, lambda s: _record_invoice(session=s, invoice_id=invoice_id, stripe_id=stripe_id,
                                                         items=items))

    def _load_invoice(self, invoice_id: str) -> tuple[Invoice, list[InvoiceLine]]:
        with self._sessions() as session:
            invoice = session.get(Invoice, invoice_id)
            if invoice is None:
                raise PermanentSyncError(f"invoice {invoice_id} does not exist")
            query = select(InvoiceLine).where(InvoiceLine.invoice_id == invoice_id).order_by(col(InvoiceLine.position))
            return invoice, list(session.exec(query).all())

    def _find_invoice(self, customer_id: str, key: str, object_id: str) -> stripe.Invoice | None:
        """The Stripe invoice that carries our invoice or purchase (``key`` = ``object_id``): by its metadata, or by
        the metadata of its lines."""
        found = self._client.v1.invoices.list(params={"customer": customer_id, "limit": 100})
        for candidate in found.auto_paging_iter():
            lines = candidate.lines.data if candidate.lines else []
            if _meta(candidate).get(key) == object_id or any(_meta(line).get(key) == object_id for line in lines):
                return candidate
        return None

    def _ensure_items(self, row: StripeOutbox, customer_id: str, invoice: Invoice, lines: list[InvoiceLine]) -> None:
        """One pending invoice item per line; items left by an interrupted attempt are reused, not repeated."""
        pending = self._client.v1.invoice_items.list(params={"customer": customer_id, "limit": 100})
        have = {_meta(item).get("mm_line") for item in pending.auto_paging_iter()
                if _meta(item).get("mm_invoice_id") == invoice.id and not item.invoice}
        for line in lines:
            if str(line.position) in have:
                continue
            self._client.v1.invoice_items.create(
                params={"customer": customer_id, "amount": line.amount, "currency": invoice.currency,
                        "description": line.description, "metadata": _line_metadata(invoice, line)},
                options={"idempotency_key": f"{row.idempotency_key}-line-{line.position}"},
            )

    def _settle(self, found: stripe.Invoice, metadata: dict[str, str]) -> stripe.Invoice:
        """Make sure the Stripe invoice names ours (``metadata``), and finalise a draft so Stripe collects it.

        A finalised invoice whose total is 0 (credits paid all its usage) is marked paid by Stripe at once."""
        assert found.id is not None
        if any(_meta(found).get(name) != value for name, value in metadata.items()):
            found = self._client.v1.invoices.update(found.id, params={"metadata": metadata})
        if found.status != "draft":
            return found
        try:
            return self._client.v1.invoices.finalize_invoice(found.id, params={"auto_advance": True})
        except stripe.APIError as exc:
            if exc.http_status != 404:
                raise
            log.info("this Stripe API cannot finalise invoices (an emulator?); %s stays a draft", found.id)
            return found

    def _check_amounts(self, found: stripe.Invoice, invoice: Invoice, lines: list[InvoiceLine]) -> dict[int, str]:
        """Our lines on the Stripe invoice must be exactly ours; returns their invoice item ids by position."""
        assert found.id is not None
        remote = self._client.v1.invoices.line_items.list(found.id, params={"limit": 100}).auto_paging_iter()
        ours = [line for line in remote if _meta(line).get("mm_invoice_id") == invoice.id]
        got = sorted((int(_meta(line)["mm_line"]), line.amount) for line in ours)  # a duplicate shows up here
        if got != [(line.position, line.amount) for line in lines]:
            raise PermanentSyncError(f"Stripe invoice {found.id} does not carry the lines of {invoice.id} exactly")
        if found.total != invoice.total:
            log.warning("Stripe invoice %s totals %s, ours %s: it carries lines of its own", found.id, found.total,
                        invoice.total)
        return {int(_meta(line)["mm_line"]): _item_id(line) for line in ours}

    # credit purchases

    def _send_credit_purchase(self, row: StripeOutbox) -> Sent:
        """A top-up: one invoice item for the amount, on an invoice of its own (``metadata.mm_purchase_id``)."""
        purchase = self._load_purchase(row.object_id)
        customer_id = self._customer_id(purchase.tenant_id)
        metadata = _purchase_metadata(purchase)
        found = self._find_invoice(customer_id, "mm_purchase_id", purchase.id)
        if found is None:
            self._ensure_purchase_item(row, customer_id, purchase)
            found = self._client.v1.invoices.create(
                params={"customer": customer_id, "description": "modelmeter prepaid credits", "metadata": metadata,
                        "pending_invoice_items_behavior": "include"},
                options={"idempotency_key": row.idempotency_key},
            )
        found = self._settle(found, metadata)
        self._check_purchase_amount(found, purchase)
        purchase_id, stripe_id = purchase.id, found.id
        return Sent(stripe_id, lambda s: _record_purchase(session=s, purchase_id=purchase_id, stripe_id=stripe_id))

    def _load_purchase(self, purchase_id: str) -> CreditPurchase:
        with self._sessions() as session:
            purchase = session.get(CreditPurchase, purchase_id)
            if purchase is None:
                raise PermanentSyncError(f"credit purchase {purchase_id} does not exist")
            return purchase

    def _ensure_purchase_item(self, row: StripeOutbox, customer_id: str, purchase: CreditPurchase) -> None:
        """The purchase's pending invoice item; one left by an interrupted attempt is reused, not repeated."""
        pending = self._client.v1.invoice_items.list(params={"customer": customer_id, "limit": 100})
        if any(_meta(item).get("mm_purchase_id") == purchase.id and not item.invoice
               for item in pending.auto_paging_iter()):
            return
        self._client.v1.invoice_items.create(
            params={"customer": customer_id, "amount": purchase.amount_cents, "currency": purchase.currency,
                    "description": "Prepaid credits", "metadata": _purchase_metadata(purchase)},
            options={"idempotency_key": f"{row.idempotency_key}-item"},
        )

    def _check_purchase_amount(self, found: stripe.Invoice, purchase: CreditPurchase) -> None:
        """The Stripe invoice must carry exactly one line of ours, for exactly the amount bought."""
        assert found.id is not None
        remote = self._client.v1.invoices.line_items.list(found.id, params={"limit": 100}).auto_paging_iter()
        got = [line.amount for line in remote if _meta(line).get("mm_purchase_id") == purchase.id]
        if got != [purchase.amount_cents]:
            raise PermanentSyncError(f"Stripe invoice {found.id} does not carry purchase {purchase.id} exactly")
        if found.total != purchase.amount_cents:
            log.warning("Stripe invoice %s totals %s, purchase %s is %s: it carries lines of its own", found.id,
                        found.total, purchase.id, purchase.amount_cents)


# --- recording on our side --------------------------------------------------------------------------------------


def _set_tenant(*, session: Session, tenant_id: str, **values: Any) -> None:
    session.exec(update(Tenant).where(col(Tenant.id) == tenant_id).values(**values))


def _record_invoice(*, session: Session, invoice_id: str, stripe_id: str, items: dict[int, str]) -> None:
    invoice = session.get(Invoice, invoice_id)
    assert invoice is not None
    invoice.stripe_invoice_id, invoice.sync_status = stripe_id, "synced"
    session.add(invoice)
    for line in session.exec(select(InvoiceLine).where(InvoiceLine.invoice_id == invoice_id)).all():
        line.stripe_invoice_item_id = items.get(line.position) or line.stripe_invoice_item_id
        session.add(line)


def _record_purchase(*, session: Session, purchase_id: str, stripe_id: str) -> None:
    purchase = session.get(CreditPurchase, purchase_id)
    assert purchase is not None
    purchase.stripe_invoice_id = stripe_id
    session.add(purchase)


# --- Stripe objects ---------------------------------------------------------------------------------------------


def _invoice_metadata(invoice: Invoice) -> dict[str, str]:
    return {"mm_invoice_id": invoice.id, "tenant_id": invoice.tenant_id, "period": invoice.period}


def _purchase_metadata(purchase: CreditPurchase) -> dict[str, str]:
    return {"mm_purchase_id": purchase.id, "tenant_id": purchase.tenant_id}


def _line_metadata(invoice: Invoice, line: InvoiceLine) -> dict[str, str]:
    return {"mm_invoice_id": invoice.id, "mm_line": str(line.position), "code": line.code, "plan": line.plan,
            "quantity": str(line.quantity), "unit_amount_decimal": line.unit_amount_decimal}


def _meta(obj: Any) -> dict[str, str]:
    metadata = getattr(obj, "metadata", None)
    return metadata.to_dict() if isinstance(metadata, stripe.StripeObject) else dict(metadata or {})


def _item_id(line: Any) -> str:
    """The invoice item behind an invoice line (older API versions and emulators name it at the top level)."""
    direct = getattr(line, "invoice_item", None)
    if direct:
        return str(direct)
    details = getattr(getattr(line, "parent", None), "invoice_item_details", None)
    return str(getattr(details, "invoice_item", "") or "")


def _retrieve_or_create(retrieve: Callable[[], T], create: Callable[[], T]) -> T:
    try:
        return retrieve()
    except stripe.InvalidRequestError as exc:
        if exc.http_status != 404:
            raise
    return create()
