"""A client's recomputation of an upcoming invoice's metered lines from ``/admin/plans`` and ``/v1/usage`` alone
(flat-priced plans): what product.md promises any client can do, batch lines at the plan's discount included."""

from __future__ import annotations

from collections.abc import Callable
from decimal import ROUND_HALF_UP, Decimal, localcontext
from typing import Any

Get = Callable[..., Any]  # (path, headers=..., params=...) -> a response with .json()

# (line code, used field, batch field or None, price field, included field, units the price is per)
_CHARGES = (("requests", "requests", "batch_requests", "price_per_request", "included_requests", 1),
            ("tokens", "tokens", "batch_tokens", "price_per_1k_tokens", "included_tokens", 1_000))


def _half_up(value: Decimal) -> int:
    return int(value.quantize(Decimal(1), rounding=ROUND_HALF_UP))


def recomputed_lines(plan: dict[str, Any], used: dict[str, int]) -> dict[str, int]:
    """Amounts (cents) by line code: interactive units take the allowance first, batch units what follows, at
    (100 - batch_discount_percent)% of the price; each line rounded once, half-up."""
    keep = Decimal(100 - plan["batch_discount_percent"]) / 100
    out: dict[str, int] = {}
    with localcontext(prec=60):
        for code, used_field, batch_field, price_field, included_field, per_units in _CHARGES:
            total, batch = used[used_field], used[batch_field]
            included, unit = plan[included_field], Decimal(plan[price_field]) * 100 / per_units
            own_billable = max(0, total - batch - included)
            if total - batch:
                out[code] = _half_up(own_billable * unit)
            if batch:
                out[f"batch_{code}"] = _half_up((max(0, total - included) - own_billable) * unit * keep)
    return out


def period_usage(get: Get, headers: dict[str, str], start: int, end: int) -> dict[str, int]:
    """The sums of ``/v1/usage``'s daily buckets over ``[start, end)``."""
    body = get("/v1/usage", headers=headers,
               params={"start_time": start, "end_time": end, "bucket_width": "1d"}).json()
    sums = dict.fromkeys(("requests", "tokens", "batch_requests", "batch_tokens"), 0)
    for bucket in body["data"]:
        for result in bucket["results"]:
            for name in sums:
                sums[name] += result[name]
    return sums


def assert_upcoming_recomputes(get: Get, headers: dict[str, str], admin: dict[str, str], plan_id: str,
                               start: int, end: int) -> dict[str, int]:
    """The upcoming invoice's request and token lines (batch ones included) equal, to the cent, what a client
    recomputes from the plan as ``/admin/plans`` lists it and the usage as ``/v1/usage`` reports it."""
    plan = next(p for p in get("/admin/plans", headers=admin).json()["data"] if p["id"] == plan_id)
    used = period_usage(get, headers, start, end)
    upcoming = get("/v1/billing/invoices/upcoming", headers=headers).json()
    billed: dict[str, int] = {}
    for line in upcoming["lines"]["data"]:
        if line["code"] in ("requests", "tokens", "batch_requests", "batch_tokens"):
            billed[line["code"]] = billed.get(line["code"], 0) + line["amount"]
    expected = recomputed_lines(plan, used)
    assert billed == expected, (billed, expected, used)
    return billed
