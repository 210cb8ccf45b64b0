"""Database engine, sessions and the migration entry point (Alembic, applied at start-up)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Any

from sqlalchemy import event, make_url, or_, text, update
from sqlalchemy.engine import Engine
from sqlalchemy.orm import sessionmaker
from sqlmodel import Session, col, create_engine

from modelmeter.settings import Settings


def make_engine(url: str, **kwargs: Any) -> Engine:
    """An engine tuned for the URL's backend (SQLite in WAL mode with a busy timeout; pooled PostgreSQL)."""
    if url.startswith("sqlite"):
        if url.startswith("sqlite:///") and ":memory:" not in url:
            _private_file(Path(url.removeprefix("sqlite:///")))
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30}, **kwargs)
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    kwargs.setdefault("pool_size", 16)
    kwargs.setdefault("max_overflow", 32)
    kwargs.setdefault("pool_pre_ping", True)
    query = make_url(url).query
    kwargs["connect_args"] = {k: v for k, v in PG_FAIL_FAST.items() if k not in query} | kwargs.get("connect_args", {})
    return create_engine(url, **kwargs)


# libpq settings that bound how long a request waits on a PostgreSQL that stopped answering without a reset (a
# black-holed network, a frozen host): data left unacknowledged for 1 s and an idle connection whose keepalive
# probe goes unanswered fail the connection, and a new one gives up after 2 s (libpq's least connect_timeout).
# Measured through tests/faultproxy.py's blackhole (packets dropped both ways): a query fails in ~1 s instead of
# TCP's retransmission timeout (~15 min). A long query is not cut: the server's kernel acknowledges what we sent.
# Parameters named in MODELMETER_DATABASE_URL's query win.
PG_FAIL_FAST: dict[str, Any] = {"connect_timeout": 2, "tcp_user_timeout": 1000, "keepalives": 1,
                                "keepalives_idle": 5, "keepalives_interval": 1, "keepalives_count": 2}


def _private_file(path: Path) -> None:
    """Create the SQLite file 0600 (its -wal and -shm files take its mode), or narrow an existing one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
    for part in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        if part.exists() and part.stat().st_mode & 0o077:
            part.chmod(0o600)


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def engine_from_settings(settings: Settings) -> Engine:
    return make_engine(settings.effective_database_url)


def session_maker(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, class_=Session, expire_on_commit=False)


@contextmanager
def session_scope(factory: sessionmaker[Session]) -> Iterator[Session]:
    """A session that commits on success and rolls back on error."""
    session = factory()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def _alembic_config(engine: Engine) -> Any:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(resources.files("modelmeter") / "migrations"))
    config.attributes["engine"] = engine
    return config


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Apply migrations up to ``revision`` (idempotent)."""
    from alembic import command

    command.upgrade(_alembic_config(engine), revision)


def current_revision(engine: Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def ping(engine: Engine) -> None:
    """Raise if the database cannot answer a trivial query."""
    with engine.connect() as conn:
        conn.execute(text("SELECT 1"))


def claim_due(sessions: sessionmaker[Session], table: Any, row_id: object, *, now: int, lease_s: int) -> bool:
    """Lease one due row of an outbox ``table`` (a model with ``id``, ``status``, ``next_attempt_at``,
    ``locked_until`` and ``attempts``: the Stripe outbox, the alert deliveries): a compare-and-set on its being
    pending, due and unleased, so two relays never send the same row at once. Counts the attempt; True if this
    caller holds the lease now."""
    statement = (
        update(table)
        .where(col(table.id) == row_id, col(table.status) == "pending", col(table.next_attempt_at) <= now,
               or_(col(table.locked_until).is_(None), col(table.locked_until) <= now))
        .values(locked_until=now + lease_s, attempts=col(table.attempts) + 1)
    )
    with sessions() as session:
        claimed = bool(session.exec(statement).rowcount == 1)
        session.commit()
    return claimed
