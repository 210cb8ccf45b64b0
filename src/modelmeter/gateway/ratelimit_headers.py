"""Rate-limit response headers: IETF ``RateLimit``/``RateLimit-Policy``, OpenAI's ``x-ratelimit-*`` and
``Retry-After``, formatted from a ``RateDecision``."""

from __future__ import annotations

from modelmeter.gateway.ratelimit import WINDOW_S, RateDecision, to_us


def _ceil_s(seconds: float) -> int:  # float-ok
    return -(-to_us(seconds) // 1_000_000)


def _duration(seconds: float) -> str:  # float-ok
    """OpenAI's reset format (Go durations, to the millisecond, rounded up): ``250ms``, ``6s``, ``1m2.5s``."""
    ms = -(-to_us(seconds) // 1000)
    if ms < 1000:
        return f"{ms}ms" if ms else "0s"
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    whole, frac = divmod(rest, 1000)
    secs = f"{whole}.{frac:03d}".rstrip("0") if frac else str(whole)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"


def rate_headers(d: RateDecision) -> dict[str, str]:
    """Response headers for a decision: IETF ``RateLimit``/``RateLimit-Policy`` (draft 08+), OpenAI's
    ``x-ratelimit-*``, and ``Retry-After`` when refused (not for ``too_large``: waiting will not help).

    "tokens" is not a registered quota unit, so the policy name carries the unit and ``qu`` is left out.
    """
    headers = {
        "RateLimit-Policy": f'"requests";q={d.limit_requests};w={WINDOW_S}, "tokens";q={d.limit_tokens};w={WINDOW_S}',
        "RateLimit": (
            f'"requests";r={d.remaining_requests};t={_ceil_s(d.reset_requests_s)}, '
            f'"tokens";r={d.remaining_tokens};t={_ceil_s(d.reset_tokens_s)}'
        ),
        "x-ratelimit-limit-requests": str(d.limit_requests),
        "x-ratelimit-remaining-requests": str(d.remaining_requests),
        "x-ratelimit-reset-requests": _duration(d.reset_requests_s),
        "x-ratelimit-limit-tokens": str(d.limit_tokens),
        "x-ratelimit-remaining-tokens": str(d.remaining_tokens),
        "x-ratelimit-reset-tokens": _duration(d.reset_tokens_s),
    }
    if not d.allowed and d.reason != "too_large":
        headers["Retry-After"] = str(max(1, _ceil_s(d.retry_after_s)))
    return headers
