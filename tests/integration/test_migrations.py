"""Migrations from an empty database, on SQLite and (when configured) PostgreSQL."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from sqlalchemy import inspect, text
from sqlmodel import SQLModel

from modelmeter import db
from modelmeter.tables import import_all_tables
from tests.conftest import ON_POSTGRES, PG_URL


def _expected_tables() -> set[str]:
    import_all_tables()
    return set(SQLModel.metadata.tables)


def test_sqlite_from_empty(tmp_path: Path) -> None:
    engine = db.make_engine(f"sqlite:///{tmp_path}/fresh.db")
    assert db.current_revision(engine) is None
    db.upgrade(engine)
    assert _expected_tables() <= set(inspect(engine).get_table_names())
    head = db.current_revision(engine)
    db.upgrade(engine)  # idempotent
    assert db.current_revision(engine) == head
    engine.dispose()


@pytest.mark.skipif(not ON_POSTGRES, reason="needs MODELMETER_DATABASE_URL=postgresql://…")
def test_postgres_from_empty_schema() -> None:
    schema = f"mig_{uuid.uuid4().hex[:10]}"
    admin = db.make_engine(PG_URL)
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    engine = db.make_engine(PG_URL, connect_args={"options": f"-csearch_path={schema}"})
    try:
        db.upgrade(engine)
        assert _expected_tables() <= set(inspect(engine).get_table_names(schema=schema))
        with engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM alembic_version")).scalar() == 1
    finally:
        engine.dispose()
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


def test_models_match_migrations(tmp_path: Path) -> None:
    """Autogenerate finds nothing to do: the tables and the migrations agree."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    engine = db.make_engine(PG_URL) if ON_POSTGRES else db.make_engine(f"sqlite:///{tmp_path}/cmp.db")
    if not ON_POSTGRES:
        db.upgrade(engine)
    import_all_tables()
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), SQLModel.metadata)
    engine.dispose()
    assert diff == []
