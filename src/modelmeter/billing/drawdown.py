"""Drawing prepaid credits inside a quota reservation: the grants a store holds, and the order they pay in.

A reservation that carries ``CreditTerms`` prices the request at the margin (the period's usage cost with it,
less without it, both from the running totals, so tiers and allowances are followed) and draws that amount from
the tenant's live grants: granted before purchased, the soonest expiry first, then the oldest (``draw_rank``).
A ``prepaid`` reservation is refused unless credits pay all of it; otherwise credits pay what they can and the
rest is invoiced. A request whose marginal cost is zero or negative (within an allowance, or a volume tier that
reprices the period lower) draws nothing. The draws are part of the hold: a release returns them, a settle keeps
them, and the ledger writes them (``CreditDraw``) in the transaction that writes the usage row.

A volume tier reprices every unit of the period when usage crosses its bound, so the period can end up costing
less than its requests drew when each was priced at the margin. Two rules keep the draws within the charge: a
store keeps the period's drawn total (held and settled draws, from the ledger's ``CreditDraw`` rows when its
counters start) and a request draws at most the period's cost with it less that total (``due_micro``): after a
reprice, requests draw nothing until the usage cost catches up with what was drawn. What is still over at the end
(the period closed right after a reprice) goes back to the tenant when the period closes
(``credits.return_overdraw``). Worked: 100 units at 10 then 5 per unit over 100 (volume): unit 100 brings the
drawn total to 1000; unit 101 reprices the period to 505 and draws nothing; units 102..200 draw nothing (cost 510
.. 1000 is within 1000 drawn); unit 201 draws 5. Closed at 150 units (cost 750), 250 goes back.

``plan_draws`` and ``due_micro`` are the rule; the Redis store's Lua (``billing/quota/lua/draw.lua`` and
``reserve.lua``) mirrors them: change both together.
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
    request that credits cannot pay in full. ``drawn`` is awaited when the period's counters start, for the
    drawn total ``due_micro`` needs (None: nothing drawn yet).
    """

    epoch: int
    now: int
    prepaid: bool
    load: Callable[[], Awaitable[list[GrantBalance]]]
    drawn: Callable[[], Awaitable[int]] | None = None  # the period's draws per the ledger (micro-cents)


Draws = tuple[tuple[str, int], ...]  # (grant id, micro-cents), in draw order


@dataclass(frozen=True, slots=True)
class Reservation:
    """A granted reservation: its id and the credits it drew."""

    id: str
    draws: Draws = ()

    @property
    def drawn_micro(self) -> int:
        return sum(amount for _, amount in self.draws)


def due_micro(*, marginal_micro: int, cost_after_micro: int, drawn_micro: int) -> int:
    """What a request may draw: its marginal cost, but never past the period's cost with it less what the period
    has drawn already (held or settled). Zero or less draws nothing."""
    return min(marginal_micro, cost_after_micro - drawn_micro)


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
