"""What every quota store does: the protocol the in-process and the Redis stores implement."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

from modelmeter.billing.drawdown import CreditTerms, Draws, Reservation
from modelmeter.billing.quota.values import Amount, Caps

Baseline = Callable[[], Awaitable[Amount]]


class QuotaStore(Protocol):
    """Committed and reserved usage per (tenant, period), with atomic reserve / settle / release."""

    async def reserve(
        self, tenant_id: str, period: str, amount: Amount, caps: Caps, *, baseline: Baseline
    ) -> str | None:
        """Hold ``amount`` if committed + reserved + amount fits every cap and return the reservation id; else
        change nothing and return None. ``baseline`` (committed totals from the ledger) is awaited only when the
        counters are not known yet. Both stores inherit this: ``reserve_drawing`` without credits."""
        reservation = await self.reserve_drawing(tenant_id, period, amount, caps, baseline=baseline)
        return None if reservation is None else reservation.id

    async def reserve_drawing(
        self, tenant_id: str, period: str, amount: Amount, caps: Caps, *, baseline: Baseline,
        credits: CreditTerms | None = None, reservation_id: str | None = None,
    ) -> Reservation | None:
        """``reserve``, and with ``credits`` draw the request's marginal cost from the tenant's grants in the same
        atomic step (``drawdown``): the reservation carries the draws; a release returns them. ``reservation_id``
        (the request's id) names the hold, so that an expired hold's draws can be checked against the ledger."""
        ...

    async def expired_draws(self, tenant_id: str) -> dict[str, Draws]:
        """The draws of holds that expired unsettled (a replica died, or its settle failed), by reservation id:
        kept out of the balance until ``resolve_expired`` learns from the ledger whether their request was
        served."""
        ...

    async def resolve_expired(self, tenant_id: str, served: dict[str, bool]) -> None:
        """Settle expired draws: a served request's draw stays drawn, an unserved one returns to its grants."""
        ...

    async def settle(self, tenant_id: str, period: str, reservation_id: str, actual: Amount) -> None:
        """Replace the reservation by the ``actual`` usage in the committed totals; a second call does nothing."""
        ...

    async def release(self, tenant_id: str, period: str, reservation_id: str) -> None:
        """Drop the reservation (the request failed); a second call does nothing."""
        ...

    async def add_committed(self, tenant_id: str, period: str, amount: Amount) -> None:
        """Count usage that had no reservation, if the counters are known (else the baseline will include it)."""
        ...

    async def add_committed_many(self, items: Sequence[tuple[str, str, Amount]]) -> None:
        """:meth:`add_committed` for several (tenant, period, amount) at once (one round trip on Redis)."""
        ...

    async def snapshot(self, tenant_id: str, period: str) -> tuple[Amount, Amount] | None:
        """(committed, reserved), or None when the counters are not known."""
        ...

    async def credit_balances(self, tenant_id: str) -> dict[str, int] | None:
        """What is left of each grant the store holds for the tenant (micro-cents, in-flight draws taken), or
        None when it holds none."""
        ...

    async def aclose(self) -> None:
        """Release connections, if any."""
        ...
