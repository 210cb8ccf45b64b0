"""The Stripe kit shared by the localstripe tests: the emulator, an app wired to it, and helpers that bill tenants,
read what the relay made in Stripe, and deliver signed webhooks."""

from __future__ import annotations

import hashlib
import hmac
import json
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
import requests
import stripe
from fastapi.testclient import TestClient
from sqlmodel import Session, col, select

from modelmeter.billing.ledger import UsageRecord, record_usage
from modelmeter.billing.stripe.relay import StripeRelay, relay_from_settings
from modelmeter.billing.tables import Invoice, InvoiceLine, StripeEvent, StripeOutbox
from modelmeter.gateway.app import create_app
from modelmeter.gateway.services import services_of
from modelmeter.settings import Settings
from modelmeter.tenancy.tenants import Tenant
from tests.conftest import ADMIN, FakeClock, bearer
from tests.support.net import free_port

SECRET = "whsec_modelmeter_test_secret"
GRACE_S = 3 * 24 * 3600


def ts(*args: int) -> int:
    return int(datetime(*args, tzinfo=UTC).timestamp())  # type: ignore[misc]


# --- localstripe and the app -----------------------------------------------------------------------------------


def _wait_for_port(port: int, proc: subprocess.Popen[bytes], timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, "localstripe exited"
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise AssertionError("localstripe did not start")


# localstripe saves its whole state to /tmp/localstripe.pickle on every write and reloads it at start, so
# instances running side by side (parallel test runs) corrupt each other: start from scratch, keep it in memory.
LOCALSTRIPE = (
    "import sys, localstripe.resources as r, localstripe.server as s; r.Store.dump_to_disk = lambda self: None; "
    "sys.argv = ['localstripe', '--from-scratch', '--port', sys.argv[1]]; s.start()"
)


@pytest.fixture(scope="module")
def localstripe() -> Iterator[str]:
    """A fresh emulator for this module, on a free loopback port."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", LOCALSTRIPE, str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for_port(port, proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture
def stripe_settings(settings: Settings, localstripe: str) -> Settings:
    return settings.model_copy(update={
        "stripe_api_key": "sk_test_modelmeter", "stripe_api_base": localstripe, "stripe_webhook_secret": SECRET,
        "stripe_sync_interval_s": 3600, "stripe_max_network_retries": 0, "past_due_grace_s": GRACE_S,
    })


@pytest.fixture
def app(stripe_settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(stripe_settings), raise_server_exceptions=False) as test_client:
        yield test_client


def relay_of(client: TestClient) -> StripeRelay:
    relay = services_of(client.app).stripe
    assert relay is not None
    return relay


@pytest.fixture
def restart(app: TestClient) -> Iterator[Callable[[], StripeRelay]]:
    """A new relay on the same database, as after a process restart."""
    made: list[StripeRelay] = []

    def make() -> StripeRelay:
        services = services_of(app.app)
        relay = relay_from_settings(services.settings, sessions=services.sessions, catalog=services.plans)
        assert relay is not None
        made.append(relay)
        return relay

    yield make
    for relay in made:
        relay.close()


@pytest.fixture
def api(localstripe: str) -> Iterator[stripe.StripeClient]:
    """Our own view of the emulator, to count what the relay made."""
    http = requests.Session()
    yield stripe.StripeClient("sk_test_modelmeter", base_addresses={"api": localstripe},
                              http_client=stripe.RequestsClient(session=http))
    http.close()


@pytest.fixture
def october(fake_clock: FakeClock) -> FakeClock:
    fake_clock.t = ts(2026, 10, 1)
    return fake_clock


def new_tenant(client: TestClient, plan: str = "payg") -> dict[str, Any]:
    tag = uuid.uuid4().hex[:10]
    response = client.post("/admin/tenants", json={"name": f"Acme {tag}", "email": f"{tag}@example.com",
                                                   "plan": plan}, headers=ADMIN)
    assert response.status_code == 201, response.text
    return dict(response.json())


def use(client: TestClient, tenant: dict[str, Any], at: int, *, tokens: int, requests_: int = 1,
        kind: str = "inference") -> None:
    services = services_of(client.app)
    records = [UsageRecord(request_id=uuid.uuid4().hex, tenant_id=tenant["id"], model_id="m", created=at,
                           tokens=tokens, plan=tenant["plan"], kind=kind) for _ in range(requests_)]
    with services.sessions() as session:
        record_usage(session=session, records=records)
        session.commit()


def close(client: TestClient, period: str) -> dict[str, Any]:
    response = client.post("/admin/billing/close", json={"period": period}, headers=ADMIN)
    assert response.status_code == 200, response.text
    return dict(response.json())


def db(client: TestClient) -> Session:
    return services_of(client.app).sessions()


def invoice_of(client: TestClient, tenant_id: str) -> tuple[Invoice, list[InvoiceLine]]:
    with db(client) as session:
        invoice = session.exec(select(Invoice).where(Invoice.tenant_id == tenant_id)).one()
        lines = session.exec(select(InvoiceLine).where(InvoiceLine.invoice_id == invoice.id)
                             .order_by(col(InvoiceLine.position))).all()
        return invoice, list(lines)


def tenant_row(client: TestClient, tenant_id: str) -> Tenant:
    with db(client) as session:
        tenant = session.get(Tenant, tenant_id)
        assert tenant is not None
        return tenant


def outbox(client: TestClient, tenant_id: str) -> list[StripeOutbox]:
    with db(client) as session:
        query = select(StripeOutbox).where(StripeOutbox.tenant_id == tenant_id).order_by(col(StripeOutbox.id))
        return list(session.exec(query).all())


def meta(obj: Any) -> dict[str, str]:
    return dict(obj.to_dict().get("metadata") or {})


def customers_of(api: stripe.StripeClient, tenant: dict[str, Any]) -> list[stripe.Customer]:
    found = api.v1.customers.list(params={"email": tenant["email"], "limit": 100}).auto_paging_iter()
    return [c for c in found if meta(c).get("tenant_id") == tenant["id"]]


def live_subscriptions(api: stripe.StripeClient, customer_id: str) -> list[stripe.Subscription]:
    return list(api.v1.subscriptions.list(params={"customer": customer_id, "limit": 100}).auto_paging_iter())


def stripe_invoices_of(api: stripe.StripeClient, customer_id: str, invoice_id: str,
                       key: str = "mm_invoice_id") -> list[stripe.Invoice]:
    """The customer's Stripe invoices whose metadata ``key`` is ``invoice_id`` (ours; or a purchase's)."""
    found = api.v1.invoices.list(params={"customer": customer_id, "limit": 100}).auto_paging_iter()
    return [i for i in found if meta(i).get(key) == invoice_id]


def our_lines(api: stripe.StripeClient, stripe_invoice_id: str, invoice_id: str,
              key: str = "mm_invoice_id") -> list[Any]:
    """The Stripe invoice's lines whose metadata ``key`` is ``invoice_id`` (ours; or a purchase's)."""
    lines = api.v1.invoices.line_items.list(stripe_invoice_id, params={"limit": 100}).auto_paging_iter()
    return [line for line in lines if meta(line).get(key) == invoice_id]


def billed_october(client: TestClient, clock: FakeClock, plan: str = "pro") -> dict[str, Any]:
    """A tenant with October usage, and October closed."""
    clock.t = ts(2026, 10, 1)
    tenant = new_tenant(client, plan)
    use(client, tenant, ts(2026, 10, 12), tokens=1_234_567, requests_=3)
    clock.t = ts(2026, 11, 2)
    close(client, "2026-10")
    return tenant


# --- webhooks ---------------------------------------------------------------------------------------------------


def sign(payload: str, secret: str = SECRET, at: int | None = None) -> str:
    at = int(time.time()) if at is None else at
    digest = hmac.new(secret.encode(), f"{at}.{payload}".encode(), hashlib.sha256).hexdigest()
    return f"t={at},v1={digest}"


def event(kind: str, obj: dict[str, Any], created: int, event_id: str | None = None) -> str:
    return json.dumps({"id": event_id or f"evt_{uuid.uuid4().hex}", "object": "event", "type": kind,
                       "created": created, "data": {"object": obj}})


def deliver(client: TestClient, payload: str, signature: str | None = None) -> Any:
    headers = {"content-type": "application/json", "stripe-signature": signature or sign(payload)}
    return client.post("/webhooks/stripe", content=payload, headers=headers)


def events_recorded(client: TestClient) -> int:
    with db(client) as session:
        return len(session.exec(select(StripeEvent)).all())


@pytest.fixture
def make_key_for(app: TestClient) -> Callable[[str], dict[str, str]]:
    def make(tenant_id: str) -> dict[str, str]:
        response = app.post(f"/admin/tenants/{tenant_id}/keys", json={}, headers=ADMIN)
        assert response.status_code == 201, response.text
        return bearer(response.json()["key"])

    return make
