"""Stripe webhooks: the signature is checked on the raw body before anything is read or written; each event
is applied once."""

from __future__ import annotations

from typing import Any

import stripe
from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from modelmeter import clock
from modelmeter.billing.stripe.webhooks import WebhookReceipt, apply_event, verify_event
from modelmeter.errors import MalformedRequestError, ServiceUnavailableError
from modelmeter.gateway.deps import ServicesDep
from modelmeter.gateway.schemas import errors

router = APIRouter(tags=["webhooks"])

SIGNATURE_TOLERANCE_S = 300


@router.post("/webhooks/stripe", response_model=WebhookReceipt, responses=errors(400, 413, 503))
async def stripe_webhook(request: Request, services: ServicesDep) -> WebhookReceipt:
    """Verify ``Stripe-Signature`` (HMAC-SHA256 of the raw body, 300 s tolerance), then apply the event once."""
    secret = services.settings.stripe_webhook_secret
    if not secret:
        raise ServiceUnavailableError("Stripe webhooks are not configured (MODELMETER_STRIPE_WEBHOOK_SECRET).",
                                      code="webhooks_not_configured")
    event = _verified(await request.body(), request.headers.get("stripe-signature"), secret)
    result = await run_in_threadpool(lambda: apply_event(sessions=services.sessions, event=event, now=clock.now_s(),
                                                         grace_s=services.settings.past_due_grace_s))
    if result.tenant_id is not None:
        services.forget_tenant(result.tenant_id)
    return WebhookReceipt.of(result)


def _verified(payload: bytes, signature: str | None, secret: str) -> dict[str, Any]:
    try:
        return verify_event(payload, signature, secret, tolerance=SIGNATURE_TOLERANCE_S)
    except stripe.SignatureVerificationError:
        raise MalformedRequestError("The Stripe-Signature header is missing, wrong or too old.",
                                    code="invalid_signature", param="Stripe-Signature") from None
    except ValueError:
        raise MalformedRequestError("The body is not a Stripe event.") from None


