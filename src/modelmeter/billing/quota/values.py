"""The quota's value types: an ``Amount`` of usage in six dimensions and the ``Caps`` it must stay within."""

from __future__ import annotations

from dataclasses import dataclass

from modelmeter.billing.counts import fieldwise
from modelmeter.billing.pricing import MeteredPrices, Usage, metered_cost_micro

QUOTA_TTL_S = 40 * 24 * 3600
HOLD_TTL_S = 900.0  # float-ok: seconds a reservation may stay in flight before it is reaped


@dataclass(frozen=True)
class Amount:
    """Usage in the quota dimensions; ``cost_micro`` is in micro-cents (1e-6 cent). ``batch_requests`` and
    ``batch_tokens`` are the part of ``requests`` and ``tokens`` served by the Batch API (priced at its discount;
    the caps on requests and tokens count both)."""

    requests: int = 0
    tokens: int = 0
    training_tokens: int = 0
    cost_micro: int = 0
    batch_requests: int = 0
    batch_tokens: int = 0

    def __post_init__(self) -> None:
        if min(self.values()) < 0:
            raise ValueError(f"amounts must not be negative: {self}")

    def values(self) -> tuple[int, int, int, int, int, int]:
        """The dimensions, in field order (the Redis scripts' order too)."""
        return (self.requests, self.tokens, self.training_tokens, self.cost_micro, self.batch_requests,
                self.batch_tokens)

    def __add__(self, other: Amount) -> Amount:
        return fieldwise(self, other)

    def __sub__(self, other: Amount) -> Amount:
        return fieldwise(self, other, sign=-1)

    def usage(self) -> Usage:
        """The metered dimensions (requests, tokens, training tokens), as pricing's ``Usage``."""
        return Usage(self.requests, self.tokens, self.training_tokens, self.batch_requests, self.batch_tokens)


@dataclass(frozen=True)
class Caps:
    """Upper bounds per dimension (``None``: uncapped); ``max_cost_micro`` is the budget in micro-cents.

    With ``prices`` (the plan's allowances and prices, flat or tiered), the budget is checked against the exact
    usage cost of the running totals (``pricing.metered_cost_micro``), allowances and tiers included, computed
    inside the same atomic step as the reservation: concurrent requests cannot spend past it, even where
    allowances run out, and a request is priced at the tier the period's usage is in. Without
    it, the ``cost_micro`` amounts are summed instead.
    """

    max_requests: int | None = None
    max_tokens: int | None = None
    max_training_tokens: int | None = None
    max_cost_micro: int | None = None
    prices: MeteredPrices | None = None

    def values(self) -> tuple[int | None, ...]:
        """The caps, in ``Amount`` field order (the batch dimensions are capped with requests and tokens)."""
        return (self.max_requests, self.max_tokens, self.max_training_tokens, self.max_cost_micro, None, None)

    def cost_of(self, total: Amount) -> int:
        """The usage cost of ``total`` in micro-cents (the summed ``cost_micro`` when not priced)."""
        if self.prices is None:
            return total.cost_micro
        return metered_cost_micro(self.prices, total.usage())

    def admit(self, total: Amount) -> bool:
        """Whether ``total`` is within every capped dimension."""
        values = (*total.values()[:3], self.cost_of(total), *total.values()[4:])
        return all(cap is None or value <= cap for value, cap in zip(values, self.values(), strict=True))

    def marginal_cost(self, before: Amount, amount: Amount) -> int:
        """What ``amount`` adds to the usage cost of ``before`` (may be negative under volume tiers)."""
        return self.cost_of(before + amount) - self.cost_of(before)


