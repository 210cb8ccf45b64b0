"""Stripe sync pieces that need no emulator: keys, backoff, error classes, signatures, the outbox switch."""

from __future__ import annotations

import hashlib
import hmac
import json
import time

import pytest
import stripe
from sqlmodel import col, select

from modelmeter import db
from modelmeter.billing.accounts import create_tenant
from modelmeter.billing.stripe.client import StripeConfigError, check_key, retryable
from modelmeter.billing.stripe.outbox import enable_outbox, idempotency_key
from modelmeter.billing.stripe.relay import BACKOFF_CAP_S, RelayReport, RowOutcome, StripeSync, backoff_s
from modelmeter.billing.stripe.webhooks import verify_event
from modelmeter.billing.tables import StripeOutbox
from modelmeter.tenancy.tenants import TenantCreate

SECRET = "whsec_unit"


def signed(payload: str, *, secret: str = SECRET, age_s: int = 0) -> str:
    at = int(time.time()) - age_s
    return f"t={at},v1={hmac.new(secret.encode(), f'{at}.{payload}'.encode(), hashlib.sha256).hexdigest()}"


@pytest.mark.parametrize(("key", "live_mode", "ok"), [
    ("sk_test_abc", False, True), ("rk_test_abc", False, True), ("sk_live_abc", False, False),
    ("rk_live_abc", False, False), ("pk_test_abc", False, False), ("sk_live_abc", True, True),
])
def test_only_test_keys_without_live_mode(key: str, live_mode: bool, ok: bool) -> None:
    if ok:
        check_key(key, live_mode=live_mode)
    else:
        with pytest.raises(StripeConfigError):
            check_key(key, live_mode=live_mode)


def test_backoff_doubles_and_caps() -> None:
    assert [backoff_s(n) for n in (1, 2, 3, 4)] == [2, 4, 8, 16]
    assert backoff_s(40) == BACKOFF_CAP_S


def test_which_errors_retry_forever() -> None:
    assert retryable(stripe.APIConnectionError("down"))
    assert retryable(stripe.RateLimitError("slow down"))
    assert retryable(stripe.APIError("oops", http_status=502))
    assert not retryable(stripe.InvalidRequestError("bad", param=None, http_status=400))
    assert not retryable(stripe.AuthenticationError("no"))
    assert not retryable(ValueError("ours"))


def test_idempotency_keys_are_deterministic() -> None:
    assert idempotency_key("invoice", "in_1") == "mm-invoice-in_1" == idempotency_key(
        "invoice", "in_1")


def test_verify_event() -> None:
    payload = json.dumps({"id": "evt_1", "type": "invoice.paid", "created": 1, "data": {"object": {"id": "in_1"}}})
    assert verify_event(payload.encode(), signed(payload), SECRET)["id"] == "evt_1"
    for bad in (signed(payload, secret="whsec_other"), signed(payload, age_s=301), "", "t=1,v1=00"):
        with pytest.raises(stripe.SignatureVerificationError):
            verify_event(payload.encode(), bad, SECRET)
    not_an_event = json.dumps({"hello": "world"})
    with pytest.raises(ValueError, match="not a Stripe event"):
        verify_event(not_an_event.encode(), signed(not_an_event), SECRET)


def test_outbox_rows_only_when_switched_on(database_url: str) -> None:
    engine = db.make_engine(database_url)
    sessions = db.session_maker(engine)
    try:
        with sessions() as session:
            create_tenant(session=session, data=TenantCreate(name="Off", email="off@example.com"))
            session.commit()
            assert session.exec(select(StripeOutbox)).all() == []
        enable_outbox(sessions)
        with sessions() as session:
            tenant = create_tenant(session=session, data=TenantCreate(name="On", email="on@example.com"))
            session.commit()
            rows = session.exec(select(StripeOutbox).order_by(col(StripeOutbox.id))).all()
            assert [(r.kind, r.tenant_id, r.status) for r in rows] == [
                ("customer", tenant.id, "pending"), ("subscription", tenant.id, "pending")]
            assert rows[0].payload == {"email": "on@example.com", "name": "On"}
    finally:
        engine.dispose()


def test_report_summary() -> None:
    report = RelayReport(rows=[
        RowOutcome(1, "customer", "ten_1", "done", stripe_id="cus_1"),
        RowOutcome(2, "invoice", "in_1", "retry", error="APIConnectionError: down"),
    ], suspended=["ten_2"])
    assert StripeSync.of(report).sent == 1
    assert StripeSync.of(report).retrying == 1
    text = report.summary()
    assert "cus_1" in text
    assert "APIConnectionError" in text
    assert "ten_2" in text
    assert text.endswith("sent 1, retrying 1, failed 0")
