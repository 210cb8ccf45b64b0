"""The Stripe client: which API keys are accepted, the client built from settings, and which of its errors retry."""

from __future__ import annotations

from collections.abc import Callable

import requests
import stripe

from modelmeter.settings import Settings

TEST_KEY_PREFIXES = ("sk_test_", "rk_test_")


class StripeConfigError(ValueError):
    """A Stripe setting refused at start-up (a live key without live mode)."""


class PermanentSyncError(RuntimeError):
    """Retrying cannot fix this row (the row is marked ``failed`` at once)."""


def check_key(api_key: str, *, live_mode: bool) -> None:
    """Refuse anything but a test-mode key unless live mode is explicitly enabled."""
    if not live_mode and not api_key.startswith(TEST_KEY_PREFIXES):
        raise StripeConfigError(
            "MODELMETER_STRIPE_API_KEY must be a test-mode key (sk_test_...); "
            "set MODELMETER_STRIPE_LIVE_MODE=true to use a live key."
        )


def make_client(settings: Settings) -> tuple[stripe.StripeClient, Callable[[], None]]:
    """A ``StripeClient`` for the settings' key and API base, and the function that closes its connections."""
    assert settings.stripe_api_key
    check_key(settings.stripe_api_key, live_mode=settings.stripe_live_mode)
    http = requests.Session()
    client = stripe.StripeClient(
        settings.stripe_api_key,
        base_addresses={"api": settings.stripe_api_base} if settings.stripe_api_base else None,
        max_network_retries=settings.stripe_max_network_retries,
        http_client=stripe.RequestsClient(session=http, timeout=settings.stripe_timeout_s),
    )
    return client, http.close


def retryable(exc: BaseException) -> bool:
    """Errors that time may fix: network, rate limits, Stripe's own 5xx."""
    if isinstance(exc, stripe.APIConnectionError | stripe.RateLimitError):
        return True
    return isinstance(exc, stripe.APIError) and (exc.http_status or 500) >= 500
