"""The Redis quota store: counters shared by every replica, each operation one Lua script (``lua/*.lua``)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from functools import lru_cache
from importlib import resources

import redis.asyncio as redis

from modelmeter.billing.drawdown import CreditTerms, Draws, GrantBalance, Reservation
from modelmeter.billing.pricing import MeteredPrice, MeteredPrices
from modelmeter.billing.quota.store import Baseline, QuotaStore
from modelmeter.billing.quota.values import HOLD_TTL_S, QUOTA_TTL_S, Amount, Caps

# The layout's version is in the prefix: a change to what the scripts keep (v2: six dimensions, the batch part of
# requests and tokens) moves to new keys, so replicas of two versions never run each other's scripts on one hash
# (an old script dropping a new six-figure hold would stop half-way). During a rolling deploy each version counts
# apart, from the ledger's baseline: limits hold per version, and the ledger (the invoice) is exact throughout.
KEY_PREFIX = "mm:quota:v2:"


def lua(*names: str) -> str:
    """The named scripts of ``lua/`` (package data), joined in order: a script and the pieces it builds on."""
    folder = resources.files("modelmeter.billing.quota") / "lua"
    return "\n".join((folder / f"{name}.lua").read_text(encoding="utf-8") for name in names)


_RESERVE_LUA = lua("prelude", "usage_cost", "draw", "reserve")
_SETTLE_LUA = lua("prelude", "settle")
_RELEASE_LUA = lua("prelude", "release")
_ADD_COMMITTED_LUA = lua("prelude", "add_committed")
_RESOLVE_LUA = lua("resolve")

_DIMENSIONS = ("requests", "tokens", "training_tokens", "cost_micro", "batch_requests", "batch_tokens")
_COUNTER_FIELDS = (*(f"c_{name}" for name in _DIMENSIONS), *(f"r_{name}" for name in _DIMENSIONS))


def _amount_args(amount: Amount) -> list[str]:
    return [str(v) for v in amount.values()]


def _cap_args(caps: Caps) -> list[str]:
    return ["" if v is None else str(v) for v in caps.values()]


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _credit_args(credits: CreditTerms | None, grants: list[GrantBalance] | None) -> str:
    """ARGV 23 of the reserve script: the credit terms as JSON, with the grants when the script asked for them."""
    if credits is None:
        return ""
    terms: dict[str, object] = {"epoch": credits.epoch, "now": credits.now, "prepaid": credits.prepaid}
    if grants is not None:
        terms["grants"] = [[g.id, g.rank, g.expires_at or 0, str(g.remaining_micro)] for g in grants]
    return json.dumps(terms)


def _dimension_words(price: MeteredPrice) -> list[str]:
    if price.mode is None:  # a flat price: one unbounded graduated tier, no flat amount
        return [str(price.included), "g", "1", "-", str(price.unit_micro), "0"]
    words = [str(price.included), "v" if price.mode == "volume" else "g", str(len(price.tiers))]
    for tier in price.tiers:
        words += ["-" if tier.up_to is None else str(tier.up_to), str(tier.unit_micro), str(tier.flat_micro)]
    return words


@lru_cache(maxsize=256)
def _price_args(prices: MeteredPrices | None) -> tuple[str]:
    """ARGV 24 of the reserve script ('' = not priced): the batch discount percent, then for requests, tokens,
    training tokens in turn, the allowance, the mode (``g`` graduated or ``v`` volume), the number of tiers, then
    each tier's up_to (``-``: no bound), unit micro-cents and flat micro-cents, all separated by spaces. Cached:
    plans are few and frozen."""
    if prices is None:
        return ("",)
    dimensions = (prices.requests, prices.tokens, prices.training_tokens)
    words = [str(prices.batch_discount_percent)] + [word for price in dimensions for word in _dimension_words(price)]
    return (" ".join(words),)


class RedisQuotaStore(QuotaStore):
    """Quota counters in Redis, shared by every replica; keys live ``ttl_s`` after their last write.

    Per (tenant, period): a hash of committed (``c_*``) and reserved (``r_*``) totals, a hash of reservation id ->
    amounts (settle and release are exact and idempotent), and a sorted set of hold deadlines. The three keys share
    a hash tag, so they stay in one slot on a cluster.
    """

    def __init__(
        self,
        client: redis.Redis,
        prefix: str = KEY_PREFIX,
        *,
        ttl_s: int = QUOTA_TTL_S,
        hold_ttl_s: float = HOLD_TTL_S,  # float-ok
        owns_client: bool = False,
    ) -> None:
        self._client = client
        self._prefix = prefix
        self._ttl_s = ttl_s
        self._hold_ms = round(hold_ttl_s * 1000)
        self._owns_client = owns_client
        self._reserve = client.register_script(_RESERVE_LUA)
        self._settle = client.register_script(_SETTLE_LUA)
        self._release = client.register_script(_RELEASE_LUA)
        self._add = client.register_script(_ADD_COMMITTED_LUA)
        self._resolve = client.register_script(_RESOLVE_LUA)

    async def reserve_drawing(
        self, tenant_id: str, period: str, amount: Amount, caps: Caps, *, baseline: Baseline,
        credits: CreditTerms | None = None, reservation_id: str | None = None,
    ) -> Reservation | None:
        """Hold ``amount`` if it fits every cap, drawing credits; see ``QuotaStore.reserve_drawing``.

        The script says what it lacks (the baseline: counters unknown; the grants: credits epoch behind); each is
        awaited once and sent with the next call, which initialises only what is still absent."""
        reservation_id = reservation_id or uuid.uuid4().hex
        keys = self._keys(tenant_id, period)
        start: Amount | None = None
        drawn = 0
        grants: list[GrantBalance] | None = None
        for _ in range(3):
            args = [str(self._ttl_s), reservation_id, str(self._hold_ms), "0" if start is None else "1",
                    *_amount_args(amount), *_cap_args(caps), *_amount_args(start or Amount()),
                    _credit_args(credits, grants), *_price_args(caps.prices), str(drawn)]
            outcome = await self._reserve(keys=keys, args=args)
            if outcome == -1:
                start = await baseline()
                if credits is not None and credits.drawn is not None:
                    drawn = await credits.drawn()
            elif outcome == -2 and credits is not None:
                grants = await credits.load()
            elif isinstance(outcome, list):
                pairs = [(_text(outcome[i]), int(outcome[i + 1])) for i in range(1, len(outcome), 2)]
                return Reservation(reservation_id, tuple(pairs))
            else:
                return None
        raise RuntimeError("the quota store kept asking for a baseline")  # only if the keys vanish in between

    async def expired_draws(self, tenant_id: str) -> dict[str, Draws]:
        """Draws of holds that lapsed unsettled; see ``QuotaStore.expired_draws``."""
        flat: dict[bytes | str, bytes | str] = await self._client.hgetall(self._credits_key(tenant_id))
        parked = {_text(k)[2:]: _text(v).split() for k, v in flat.items() if _text(k).startswith("x:")}
        return {rid: tuple((words[i], int(words[i + 1])) for i in range(0, len(words), 2))
                for rid, words in parked.items()}

    async def resolve_expired(self, tenant_id: str, served: dict[str, bool]) -> None:
        """Keep or return expired draws; see ``QuotaStore.resolve_expired``."""
        if served:
            args = [v for rid, was in served.items() for v in (rid, "1" if was else "0")]
            await self._resolve(keys=[self._credits_key(tenant_id)], args=args)

    async def credit_balances(self, tenant_id: str) -> dict[str, int] | None:
        """What is left of each grant held for the tenant; see ``QuotaStore.credit_balances``."""
        flat: dict[bytes | str, bytes | str] = await self._client.hgetall(self._credits_key(tenant_id))
        if not flat:
            return None
        fields = {_text(k): _text(v) for k, v in flat.items()}
        return {k[2:]: int(v) for k, v in fields.items() if k.startswith("r:") and f"m:{k[2:]}" in fields}

    async def settle(self, tenant_id: str, period: str, reservation_id: str, actual: Amount) -> None:
        """Commit ``actual`` in place of the reservation; idempotent."""
        args = [str(self._ttl_s), reservation_id, *_amount_args(actual)]
        await self._settle(keys=self._keys(tenant_id, period), args=args)

    async def release(self, tenant_id: str, period: str, reservation_id: str) -> None:
        """Drop the reservation; idempotent."""
        await self._release(keys=self._keys(tenant_id, period), args=[self._ttl_s, reservation_id])

    async def add_committed(self, tenant_id: str, period: str, amount: Amount) -> None:
        """Count unreserved usage if the counters exist."""
        await self._add(keys=self._keys(tenant_id, period), args=[self._ttl_s, *_amount_args(amount)])

    async def add_committed_many(self, items: Sequence[tuple[str, str, Amount]]) -> None:
        """One pipeline (one round trip) for every (tenant, period) of a group."""
        if len(items) == 1:
            await self.add_committed(*items[0])
            return
        async with self._client.pipeline(transaction=False) as pipe:
            for tenant_id, period, amount in items:
                await self._add(keys=self._keys(tenant_id, period), args=[self._ttl_s, *_amount_args(amount)],
                                client=pipe)
            await pipe.execute()

    async def snapshot(self, tenant_id: str, period: str) -> tuple[Amount, Amount] | None:
        """(committed, reserved), or None when the counters do not exist."""
        values: Sequence[str | bytes | None] = await self._client.hmget(
            self._keys(tenant_id, period)[0], list(_COUNTER_FIELDS)
        )
        if all(v is None for v in values):
            return None
        counts = [int(v or 0) for v in values]
        return Amount(*counts[:len(_DIMENSIONS)]), Amount(*counts[len(_DIMENSIONS):])

    async def aclose(self) -> None:
        """Close the client if this store created it."""
        if self._owns_client:
            await self._client.aclose()

    def _credits_key(self, tenant_id: str) -> str:
        return f"{self._prefix}{{{tenant_id}}}:credits"

    def _keys(self, tenant_id: str, period: str) -> list[str]:
        # One hash tag per tenant: a period's counters and the tenant's credits stay in one slot on a cluster.
        counters = f"{self._prefix}{{{tenant_id}}}:{period}"
        return [counters, f"{counters}:holds", f"{counters}:deadlines", self._credits_key(tenant_id)]
