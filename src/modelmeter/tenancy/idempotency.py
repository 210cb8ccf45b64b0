"""Idempotency keys: the table of a caller's keyed POSTs and their answers, and the claim that guards one.

A row is written when a keyed request is first let through (``claim``: an INSERT, so that of two replicas racing
on one key exactly one wins, by the primary key) and is either completed with the answer (``complete``, 2xx
only) or deleted (``release``: the request changed nothing, so its retry may run afresh). An in-flight row
carries a lease (``locked_until``): a replica that dies mid-request leaves a row that the next retry takes over
once the lease has passed. Every row is forgotten ``ttl_s`` after its first request (``purge``).

``complete`` and ``release`` only touch the row of the claim they are given (``claim_id``): a request that ran
past its lease and was taken over can no longer overwrite or delete its successor's row.

The HTTP side (scope, fingerprint, replay) is :mod:`modelmeter.gateway.idempotency`. The table sits here, with
the tenants and their keys, because a row belongs to a caller: a tenant id, or ``admin`` for the admin token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from sqlalchemy import JSON, Column, Index, LargeBinary, delete, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import sessionmaker
from sqlmodel import Field, Session, SQLModel, col

from modelmeter import clock
from modelmeter.ids import new_id

Sessions = sessionmaker[Session]
ADMIN_SCOPE = "admin"
IN_FLIGHT = "in_flight"
DONE = "done"
_CLAIM_ATTEMPTS = 3


class IdempotencyRecord(SQLModel, table=True):
    """One caller's use of one key: the request's fingerprint, and once it succeeded, its answer."""

    __tablename__ = "idempotency_key"
    __table_args__ = (Index("ix_idempotency_key_expires_at", "expires_at"),)

    scope: str = Field(primary_key=True, max_length=40)  # an API key id, or "admin"
    key: str = Field(primary_key=True, max_length=255)
    fingerprint: str = Field(max_length=64)  # SHA-256 (hex) of method, path, query and canonical body
    claim_id: str = Field(max_length=40)  # the request holding the row
    state: str = Field(max_length=16)  # in_flight | done
    locked_until: int | None = None  # in flight: the lease's end
    status: int | None = None
    headers: list[list[str]] | None = Field(default=None, sa_column=Column(JSON))
    body: bytes | None = Field(default=None, sa_column=Column(LargeBinary))
    created: int
    expires_at: int


@dataclass(frozen=True, slots=True)
class StoredResponse:
    status: int
    headers: list[tuple[str, str]]
    body: bytes


@dataclass(frozen=True, slots=True)
class Claim:
    """What a claim found: the key is now ours (``claim_id``), answered (``response``), in flight elsewhere, or
    first used for another request."""

    outcome: Literal["claimed", "done", "in_flight", "mismatch"]
    claim_id: str = ""
    response: StoredResponse | None = None


def claim(*, sessions: Sessions, scope: str, key: str, fingerprint: str, lock_s: int, ttl_s: int) -> Claim:
    """Take ``key`` for a request, or say who has it. Expired rows (past ``ttl_s``) and abandoned ones (lease
    passed, same request) are taken over; each step is its own short transaction."""
    for _ in range(_CLAIM_ATTEMPTS):
        now = clock.now_s()
        claim_id = new_id("idem")
        fresh = IdempotencyRecord(scope=scope, key=key, fingerprint=fingerprint, claim_id=claim_id, state=IN_FLIGHT,
                                  locked_until=now + lock_s, created=now, expires_at=now + ttl_s)
        if _insert(sessions, fresh):
            return Claim("claimed", claim_id)
        with sessions() as session:
            held = session.get(IdempotencyRecord, (scope, key))
        if held is None:  # released between our insert and this read: try again
            continue
        if held.expires_at > now:
            if held.fingerprint != fingerprint:
                return Claim("mismatch")
            if held.state == DONE:
                return Claim("done", response=_response(held))
            if held.locked_until is not None and held.locked_until > now:
                return Claim("in_flight")
        if _take_over(sessions, held=held, fresh=fresh):
            return Claim("claimed", claim_id)
    return Claim("in_flight")  # others kept winning the row: it is busy


def complete(*, sessions: Sessions, scope: str, key: str, claim_id: str, response: StoredResponse) -> bool:
    """Keep the answer of the claim's request; False when the claim was lost (taken over after its lease)."""
    with sessions() as session:
        result = session.exec(
            update(IdempotencyRecord)
            .where(col(IdempotencyRecord.scope) == scope, col(IdempotencyRecord.key) == key,
                   col(IdempotencyRecord.claim_id) == claim_id)
            .values(state=DONE, locked_until=None, status=response.status,
                    headers=[list(pair) for pair in response.headers], body=response.body)
        )
        session.commit()
        return bool(result.rowcount == 1)


def release(*, sessions: Sessions, scope: str, key: str, claim_id: str) -> None:
    """Forget the claim's row, so that the next request with the key runs afresh."""
    with sessions() as session:
        session.exec(
            delete(IdempotencyRecord)
            .where(col(IdempotencyRecord.scope) == scope, col(IdempotencyRecord.key) == key,
                   col(IdempotencyRecord.claim_id) == claim_id)
        )
        session.commit()


def purge(*, sessions: Sessions) -> int:
    """Delete every row past its retention; returns how many."""
    with sessions() as session:
        result = session.exec(
            delete(IdempotencyRecord).where(col(IdempotencyRecord.expires_at) <= clock.now_s())
        )
        session.commit()
        return int(result.rowcount)


def _insert(sessions: Sessions, row: IdempotencyRecord) -> bool:
    """Insert ``row``; False when the caller already has a row for the key (the primary key refuses it)."""
    with sessions() as session:
        session.add(row)
        try:
            session.commit()
        except IntegrityError:
            session.rollback()
            return False
    return True


def _take_over(sessions: Sessions, *, held: IdempotencyRecord, fresh: IdempotencyRecord) -> bool:
    """Replace ``held`` with ``fresh`` unless another request replaced it first (compare-and-set on the claim)."""
    with sessions() as session:
        result = session.exec(
            update(IdempotencyRecord)
            .where(col(IdempotencyRecord.scope) == held.scope, col(IdempotencyRecord.key) == held.key,
                   col(IdempotencyRecord.claim_id) == held.claim_id)
            .values(fingerprint=fresh.fingerprint, claim_id=fresh.claim_id, state=IN_FLIGHT,
                    locked_until=fresh.locked_until, status=None, headers=None, body=None, created=fresh.created,
                    expires_at=fresh.expires_at)
        )
        session.commit()
        return bool(result.rowcount == 1)


def _response(row: IdempotencyRecord) -> StoredResponse:
    assert row.status is not None
    assert row.body is not None
    return StoredResponse(row.status, [(name, value) for name, value in row.headers or []], row.body)
