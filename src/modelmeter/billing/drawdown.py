"""Drawing prepaid credits inside a quota reservation: the grants a store holds, and the order they pay in.

A reservation that carries ``CreditTerms`` prices the request at the margin (the period's usage cost with it,
less without it, both from the running totals, so tiers and allowances are followed) and draws that amount from
the tenant's live grants: granted before purchased, the soonest expiry first, then the oldest (``draw_rank``).
A ``prepaid`` reservation is refused unless credits pay all of it; otherwise credits pay what they can and the
rest is invoiced. A request whose marginal cost is zero or negative (within an allowance, or a volume tier that
reprices the period lower) draws nothing. The draws are part of the hold: a release returns them, a settle keeps
them, and the ledger writes them (``CreditDraw``) in the transaction that writes the usage row.

``plan_draws`` is the rule; the Redis store's Lua (``quota.DRAW_LUA``) mirrors it: change both together.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

NEVER = 9_999_999_999  # the expiry rank of a grant that does not expire (Unix seconds, year 2286)


def draw_rank(*, source: str, expires_at: int | None, created: int, grant_id: str) -> str:
    """The order grants pay in, as a string that sorts: granted before purchased, soonest expiry, oldest, id."""
    expiry = NEVER if expires_at is None else expires_at
    return f"{0 if source == 'granted' else 1}{expiry:010d}{created:010d}{grant_id}"


@dataclass(slots=True)
class GrantBalance:
    """A grant as a quota store holds it: its draw order, its expiry and what is left of it, in micro-cents."""

    id: str
    rank: str
    expires_at: int | None
    remaining_micro: int

    def live(self, now: int) -> bool:
        return self.expires_at is None or self.expires_at > now


@dataclass(frozen=True)
class CreditTerms:
    """What a reservation may draw on.

    ``epoch`` is the tenant's credits epoch as the caller read it: a store that has seen an older one awaits
    ``load`` (each live grant with what the ledger says is left of it) and adds the grants it does not hold yet;
    the grants it holds keep their own, more current, balance. ``now`` decides expiry. ``prepaid`` refuses a
    request that credits cannot pay in full.
    """

    epoch: int
    now: int
    prepaid: bool
    load: Callable[[], Awaitable[list[GrantBalance]]]


Draws = tuple[tuple[str, int], ...]  # (grant id, micro-cents), in draw order


@dataclass(frozen=True, slots=True)
class Reservation:
    """A granted reservation: its id and the credits it drew."""

    id: str
    draws: Draws = ()

    @property
    def drawn_micro(self) -> int:
        return sum(amount for _, amount in self.draws)


def plan_draws(grants: Iterable[GrantBalance], cost_micro: int, *, now: int, prepaid: bool) -> Draws | None:
    """The draws that pay ``cost_micro`` from ``grants`` (not changed), or None when a prepaid request cannot be
    paid in full. A cost of zero or less draws nothing."""
    if cost_micro <= 0:
        return ()
    live = sorted((g for g in grants if g.live(now) and g.remaining_micro > 0), key=lambda g: g.rank)
    if prepaid and sum(g.remaining_micro for g in live) < cost_micro:
        return None
    draws, due = [], cost_micro
    for grant in live:
        if due == 0:
            break
        take = min(due, grant.remaining_micro)
        draws.append((grant.id, take))
        due -= take
    return tuple(draws)
