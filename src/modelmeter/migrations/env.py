"""Alembic environment: the engine comes from ``modelmeter.db.upgrade`` (config.attributes["engine"])."""

from alembic import context
from sqlmodel import SQLModel

from modelmeter.tables import import_all_tables

import_all_tables()
target_metadata = SQLModel.metadata
config = context.config


def run() -> None:
    engine = config.attributes.get("engine")
    if engine is None:
        from modelmeter.db import engine_from_settings
        from modelmeter.settings import get_settings

        engine = engine_from_settings(get_settings())
    with engine.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            render_as_batch=connection.dialect.name == "sqlite",
            compare_type=True,
        )
        with context.begin_transaction():
            context.run_migrations()
        connection.commit()


run()
