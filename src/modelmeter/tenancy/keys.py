"""API keys: the table and its shapes, the key format and hashing, issuing, revoking, rolling, and queries.

A key looks like ``mm_<32 random base62><6 base62 CRC32 checksum>`` (41 characters, ~190 random bits).
The checksum lets a malformed or mutated key be refused without touching the database; only the key's
SHA-256 is stored. The plaintext exists in exactly one response body and never in a log line. Lookup on the
request path (with its cache) is the gateway's (:mod:`modelmeter.gateway.auth`).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import zlib
from collections.abc import Sequence
from typing import Annotated, Literal

from pydantic import Strict
from sqlmodel import Field, Session, SQLModel, col, select

from modelmeter import clock
from modelmeter.errors import NotFoundError
from modelmeter.fields import INT32_MAX, INTEGRAL
from modelmeter.ids import fixed_width, new_id
from modelmeter.tenancy.tenants import FORBID, Name

Scope = Literal["inference", "fine-tune", "billing:read", "billing:write"]
ALL_SCOPES: tuple[str, ...] = ("inference", "fine-tune", "billing:read", "billing:write")

KEY_PREFIX = "mm_"
_BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_RANDOM_LEN = 32
_CHECK_LEN = 6
_KEY_RE = re.compile(rf"^{KEY_PREFIX}[0-9A-Za-z]{{{_RANDOM_LEN + _CHECK_LEN}}}$")


def _checksum(body: str) -> str:
    return fixed_width(zlib.crc32(body.encode()), _CHECK_LEN, _BASE62)


def generate_key() -> str:
    """A fresh plaintext key (shown to the user once, never stored)."""
    body = KEY_PREFIX + "".join(secrets.choice(_BASE62) for _ in range(_RANDOM_LEN))
    return body + _checksum(body)


def well_formed(key: str) -> bool:
    """Format and checksum check: no database needed to refuse a typo or a forged key."""
    if not _KEY_RE.match(key):
        return False
    body, check = key[:-_CHECK_LEN], key[-_CHECK_LEN:]
    return hmac.compare_digest(_checksum(body), check)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def display_prefix(key: str) -> str:
    return key[: len(KEY_PREFIX) + 8]


# --- issuing ---------------------------------------------------------------------------------------


def issue_key(*, session: Session, tenant_id: str, data: ApiKeyCreate) -> tuple[ApiKey, str]:
    """Create a key row; returns it with the plaintext, which the caller shows once."""
    plaintext = generate_key()
    scopes = data.scopes if data.scopes is not None else list(ALL_SCOPES)
    row = ApiKey(
        id=new_id("key"),
        tenant_id=tenant_id,
        name=data.name,
        prefix=display_prefix(plaintext),
        last4=plaintext[-4:],
        key_hash=hash_key(plaintext),
        scopes=",".join(sorted(set(scopes), key=ALL_SCOPES.index)),
        created=clock.now_s(),
        expires_at=data.expires_at,
    )
    session.add(row)
    session.flush()
    return row, plaintext


def revoke_key(*, session: Session, key: ApiKey) -> ApiKey:
    if key.revoked_at is None:
        key.revoked_at = clock.now_s()
        session.add(key)
        session.flush()
    return key


def roll_key(*, session: Session, key: ApiKey, grace_s: int) -> tuple[ApiKey, str]:
    """Issue a successor with the same name and scopes; the old key keeps working for ``grace_s``."""
    now = clock.now_s()
    successor_expiry = key.expires_at if key.expires_at is None or key.expires_at > now else None
    new, plaintext = issue_key(
        session=session,
        tenant_id=key.tenant_id,
        data=ApiKeyCreate(name=key.name, scopes=key.scope_list, expires_at=successor_expiry),  # type: ignore[arg-type]
    )
    end = now + grace_s
    key.expires_at = end if key.expires_at is None else min(key.expires_at, end)
    key.rolled_to = new.id
    session.add(key)
    session.flush()
    return new, plaintext



# --- the table and its shapes ------------------------------------------------------------------------------------


class ApiKeyCreate(SQLModel):
    model_config = FORBID
    name: Name = "default"
    scopes: list[Scope] | None = None
    # The column is a 32-bit integer.
    expires_at: Annotated[int, Strict(), Field(gt=0, le=INT32_MAX), INTEGRAL] | None = None


class ApiKeyRoll(SQLModel):
    model_config = FORBID
    grace_period_seconds: Annotated[int, Strict(), Field(ge=0, le=30 * 24 * 3600), INTEGRAL] | None = None


class ApiKey(SQLModel, table=True):
    __tablename__ = "api_key"

    id: str = Field(primary_key=True, max_length=40)
    tenant_id: str = Field(foreign_key="tenant.id", index=True, max_length=40)
    name: str = Field(max_length=200)
    prefix: str = Field(max_length=16)
    last4: str = Field(max_length=4)
    key_hash: str = Field(unique=True, max_length=64)
    scopes: str = Field(max_length=200)
    created: int
    expires_at: int | None = None
    revoked_at: int | None = None
    last_used_at: int | None = None
    rolled_to: str | None = Field(default=None, max_length=40)

    @property
    def scope_list(self) -> list[str]:
        return [s for s in self.scopes.split(",") if s]

    def status_at(self, now: int) -> str:
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= now:
            return "expired"
        return "active"


class ApiKeyPublic(SQLModel):
    id: str
    object: Literal["api_key"] = "api_key"
    tenant_id: str
    name: str
    prefix: str
    last4: str
    scopes: list[str]
    status: str
    created: int
    expires_at: int | None
    revoked_at: int | None
    last_used_at: int | None
    rolled_to: str | None

    @classmethod
    def of(cls, key: ApiKey, *, now: int) -> ApiKeyPublic:
        return cls(
            id=key.id,
            tenant_id=key.tenant_id,
            name=key.name,
            prefix=key.prefix,
            last4=key.last4,
            scopes=key.scope_list,
            status=key.status_at(now),
            created=key.created,
            expires_at=key.expires_at,
            revoked_at=key.revoked_at,
            last_used_at=key.last_used_at,
            rolled_to=key.rolled_to,
        )


class ApiKeyCreated(ApiKeyPublic):
    """The only shape that carries the secret: returned once, at creation or roll."""

    key: str

    @classmethod
    def of_new(cls, key: ApiKey, plaintext: str, *, now: int) -> ApiKeyCreated:
        return cls(**ApiKeyPublic.of(key, now=now).model_dump(), key=plaintext)


def get_key(*, session: Session, key_id: str) -> ApiKey:
    key = session.get(ApiKey, key_id)
    if key is None:
        raise NotFoundError(f"No API key with id '{key_id}'.", param="id")
    return key


def list_keys(*, session: Session, tenant_id: str, limit: int, after: str | None) -> tuple[Sequence[ApiKey], bool]:
    query = select(ApiKey).where(ApiKey.tenant_id == tenant_id).order_by(col(ApiKey.id).desc())
    if after:
        query = query.where(col(ApiKey.id) < after)
    rows = session.exec(query.limit(limit + 1)).all()
    return rows[:limit], len(rows) > limit
