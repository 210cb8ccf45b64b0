"""batch events: alert_event also holds batch.completed and batch.failed (once per batch)

The usage columns become nullable (a batch event has none), the batch's columns are added, and a unique index on
(batch_id, type) makes the event once per batch (the crossings' unique constraint still holds: its columns are
NULL on a batch event, and NULLs are distinct).

On SQLite, making a column nullable recreates the table (batch mode), and dropping ``alert_event`` while
``alert_delivery`` rows reference it fails under ``PRAGMA foreign_keys=ON`` (the pragma cannot be changed inside
the migration's transaction, and deferring the check does not help: the rows stay counted as violations). So the
deliveries are set aside in a temporary table while ``alert_event`` is rebuilt, then put back, ids and all.

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-05 10:20:00
"""
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import sqlalchemy as sa
from alembic import op

revision: str = '0014'
down_revision: str | None = '0013'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_USAGE_COLUMNS = (
    ('period', sa.String(length=7)),
    ('resource', sa.String(length=32)),
    ('threshold_percent', sa.Integer()),
    ('value', sa.BigInteger()),
    ('limit_value', sa.BigInteger()),
)
_BATCH_COLUMNS = (
    ('batch_id', sa.String(length=40)),
    ('requests_total', sa.Integer()),
    ('requests_completed', sa.Integer()),
    ('requests_failed', sa.Integer()),
    ('output_file_id', sa.String(length=40)),
    ('error_file_id', sa.String(length=40)),
)


@contextmanager
def _deliveries_set_aside() -> Iterator[None]:
    """On SQLite, ``alert_delivery`` emptied while ``alert_event`` is rebuilt, and refilled after."""
    sqlite = op.get_bind().dialect.name == 'sqlite'
    if sqlite:
        op.execute('CREATE TEMPORARY TABLE _alert_delivery_0014 AS SELECT * FROM alert_delivery')
        op.execute('DELETE FROM alert_delivery')
    yield
    if sqlite:
        op.execute('INSERT INTO alert_delivery SELECT * FROM _alert_delivery_0014')
        op.execute('DROP TABLE _alert_delivery_0014')


def upgrade() -> None:
    with _deliveries_set_aside(), op.batch_alter_table('alert_event') as batch:
        for name, type_ in _USAGE_COLUMNS:
            batch.alter_column(name, existing_type=type_, nullable=True)
        for name, type_ in _BATCH_COLUMNS:
            batch.add_column(sa.Column(name, type_, nullable=True))
        batch.create_index('uq_alert_event_batch', ['batch_id', 'type'], unique=True)


def downgrade() -> None:
    # The batch events (and their deliveries) have no place in the older table.
    op.execute("DELETE FROM alert_delivery WHERE event_id IN "
               "(SELECT id FROM alert_event WHERE batch_id IS NOT NULL)")
    op.execute('DELETE FROM alert_event WHERE batch_id IS NOT NULL')
    with _deliveries_set_aside(), op.batch_alter_table('alert_event') as batch:
        batch.drop_index('uq_alert_event_batch')
        for name, _ in reversed(_BATCH_COLUMNS):
            batch.drop_column(name)
        for name, type_ in _USAGE_COLUMNS:
            batch.alter_column(name, existing_type=type_, nullable=False)
