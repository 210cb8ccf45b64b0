"""Authentication on the request path: a key's lookup (with a short TTL cache), scopes, and the admin token.

The key format, hashing and the key table are :mod:`modelmeter.tenancy.keys`.
"""

from __future__ import annotations

import hmac
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy.orm import sessionmaker
from sqlmodel import Session, col, select, update

from modelmeter import clock
from modelmeter.errors import AuthenticationError, PermissionDeniedError, RateLimitError, TenantSuspendedError
from modelmeter.tenancy.keys import ApiKey, hash_key
from modelmeter.tenancy.tenants import Tenant

INVALID_KEY_MESSAGE = "Invalid API key provided."


# --- lookup ------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: the key and the tenant state needed on the hot path."""

    key_id: str
    tenant_id: str
    scopes: frozenset[str]
    expires_at: int | None
    tenant_status: str
    plan: str
    rpm_limit: int | None = None
    tpm_limit: int | None = None
    monthly_budget_cents: int | None = None
    credits_epoch: int = 0
    batch: bool = False  # a line of a batch, served in-process (``batch_runner``): no RPM/TPM limits


    def admitted_at(self, now: int) -> bool:
        """Whether ``check`` lets this principal through at ``now`` (unexpired key, active tenant)."""
        return (self.expires_at is None or self.expires_at > now) and self.tenant_status == "active"

    def require(self, scope: str) -> None:
        if scope not in self.scopes:
            raise PermissionDeniedError(
                f"This API key lacks the '{scope}' scope.", code="insufficient_scope", param="scope"
            )


class KeyAuthenticator:
    """Resolves bearer keys to principals, caching hits and misses for ``ttl_s`` seconds.

    Revocation and tenant changes made through this process invalidate the cache at once; other replicas
    see them within ``ttl_s``. ``last_used_at`` is kept in memory and flushed in bulk by ``flush_last_used``.
    """

    def __init__(self, factory: sessionmaker[Session], *, ttl_s: float, max_entries: int = 100_000) -> None:
        self._factory = factory
        self._ttl = ttl_s
        self._max = max_entries
        self._cache: OrderedDict[str, tuple[float, Principal | None]] = OrderedDict()
        self._lock = threading.Lock()
        self._last_used: dict[str, int] = {}
        self._generation = 0  # bumped by every invalidation: a lookup that overlapped one does not store its result

    def cached(self, key: str) -> tuple[bool, Principal | None]:
        """(hit, principal) from the cache alone; a miss means the caller must ``load``."""
        digest = hash_key(key)
        with self._lock:
            entry = self._cache.get(digest)
            if entry is None or time.monotonic() - entry[0] > self._ttl:
                return False, None
            return True, entry[1]

    def load(self, key: str) -> Principal | None:
        """Database lookup (call from a worker thread); result cached unless an invalidation ran meanwhile (the
        row read may predate the change it announced: another replica's revocation, say)."""
        digest = hash_key(key)
        with self._lock:
            generation = self._generation
        with self._factory() as session:
            row = session.exec(
                select(ApiKey, Tenant).join(Tenant, col(Tenant.id) == col(ApiKey.tenant_id))
                .where(ApiKey.key_hash == digest)
            ).first()
        principal = None
        if row is not None and row[0].revoked_at is None:
            key_row, tenant = row
            principal = Principal(
                key_row.id, tenant.id, frozenset(key_row.scope_list), key_row.expires_at, tenant.status, tenant.plan,
                tenant.rpm_limit, tenant.tpm_limit, tenant.monthly_budget_cents, tenant.credits_epoch,
            )
        self._store(digest, principal, generation)
        return principal

    def _store(self, digest: str, principal: Principal | None, generation: int) -> None:
        with self._lock:
            if generation != self._generation:
                return
            self._cache[digest] = (time.monotonic(), principal)
            self._cache.move_to_end(digest)
            while len(self._cache) > self._max:
                self._cache.popitem(last=False)

    def check(self, principal: Principal | None) -> Principal:
        """Refuse unknown, revoked, expired keys (401, one message) and suspended tenants (403)."""
        if principal is None or (principal.expires_at is not None and principal.expires_at <= clock.now_s()):
            raise AuthenticationError(INVALID_KEY_MESSAGE)
        if principal.tenant_status != "active":
            raise TenantSuspendedError("This tenant is suspended; contact the operator.")
        self._last_used[principal.key_id] = clock.now_s()
        return principal

    def invalidate(self, predicate: Callable[[Principal], bool] | None = None) -> None:
        """Drop cached entries (all, or those matching ``predicate``); misses are always dropped."""
        with self._lock:
            self._generation += 1
            if predicate is None:
                self._cache.clear()
                return
            for digest in [d for d, (_, p) in self._cache.items() if p is None or predicate(p)]:
                del self._cache[digest]

    def flush_last_used(self) -> int:
        """Write buffered ``last_used_at`` values in one transaction; returns rows touched."""
        pending, self._last_used = self._last_used, {}
        if not pending:
            return 0
        with self._factory() as session:
            for key_id, ts in pending.items():
                session.exec(
                    update(ApiKey)
                    .where(col(ApiKey.id) == key_id)
                    .where((col(ApiKey.last_used_at).is_(None)) | (col(ApiKey.last_used_at) < ts))
                    .values(last_used_at=ts)
                )
            session.commit()
        return len(pending)


class FailedAuthThrottle:
    """Failed authentications per client address, per minute (fixed windows), in this process.

    A key that is unknown, revoked or malformed costs a database lookup and tells the caller something; past
    ``per_minute`` failures from one address, that address gets 429 ``too_many_failed_authentications`` before
    any lookup until the window ends (issue 21: failures were never throttled). A valid cached key is never
    throttled, so a tenant sharing an address with a guesser keeps working. At most ``max_entries`` addresses
    are tracked (the oldest windows are dropped first)."""

    def __init__(self, *, per_minute: int, max_entries: int = 100_000) -> None:
        self._limit = per_minute
        self._max = max_entries
        self._windows: OrderedDict[str, tuple[int, int]] = OrderedDict()
        self._lock = threading.Lock()

    def check(self, address: str) -> None:
        """Raise 429 when ``address`` has spent its failures for this minute."""
        minute = int(time.monotonic() // 60)
        with self._lock:
            window = self._windows.get(address)
        if window is not None and window[0] == minute and window[1] >= self._limit:
            retry = 60 - int(time.monotonic() % 60)
            raise RateLimitError(
                f"Too many failed authentications from this address; retry in {retry} s.",
                code="too_many_failed_authentications", headers={"Retry-After": str(max(1, retry))})

    def failed(self, address: str) -> None:
        minute = int(time.monotonic() // 60)
        with self._lock:
            start, count = self._windows.pop(address, (minute, 0))
            self._windows[address] = (minute, 1) if start != minute else (minute, count + 1)
            while len(self._windows) > self._max:
                self._windows.popitem(last=False)


def parse_bearer(header: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, or None."""
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def admin_token_matches(token: str, expected: str) -> bool:
    return hmac.compare_digest(token.encode(), expected.encode())
