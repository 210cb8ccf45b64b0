"""usage alerts: settings, threshold events, their deliveries

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-02 07:45:11.303766
"""
from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = '0010'
down_revision: str | None = '0009'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('alert_event',
    sa.Column('id', sqlmodel.sql.sqltypes.AutoString(length=40), nullable=False),
    sa.Column('type', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('tenant_id', sqlmodel.sql.sqltypes.AutoString(length=40), nullable=False),
    sa.Column('period', sqlmodel.sql.sqltypes.AutoString(length=7), nullable=False),
    sa.Column('resource', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
    sa.Column('threshold_percent', sa.Integer(), nullable=False),
    sa.Column('value', sa.BigInteger(), nullable=False),
    sa.Column('limit_value', sa.BigInteger(), nullable=False),
    sa.Column('created', sa.Integer(), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('tenant_id', 'period', 'resource', 'threshold_percent', name='uq_alert_event_crossing')
    )
    with op.batch_alter_table('alert_event', schema=None) as batch_op:
        batch_op.create_index('ix_alert_event_tenant_id', ['tenant_id', 'id'], unique=False)

    op.create_table('alert_delivery',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('event_id', sqlmodel.sql.sqltypes.AutoString(length=40), nullable=False),
    sa.Column('tenant_id', sqlmodel.sql.sqltypes.AutoString(length=40), nullable=False),
    sa.Column('url', sqlmodel.sql.sqltypes.AutoString(length=2000), nullable=False),
    sa.Column('status', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('next_attempt_at', sa.Integer(), nullable=False),
    sa.Column('locked_until', sa.Integer(), nullable=True),
    sa.Column('last_status', sa.Integer(), nullable=True),
    sa.Column('last_error', sqlmodel.sql.sqltypes.AutoString(length=1000), nullable=True),
    sa.Column('created', sa.Integer(), nullable=False),
    sa.Column('done_at', sa.Integer(), nullable=True),
    sa.ForeignKeyConstraint(['event_id'], ['alert_event.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('alert_delivery', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_alert_delivery_event_id'), ['event_id'], unique=False)
        batch_op.create_index('ix_alert_delivery_status_id', ['status', 'id'], unique=False)

    op.create_table('alert_setting',
    sa.Column('tenant_id', sqlmodel.sql.sqltypes.AutoString(length=40), nullable=False),
    sa.Column('thresholds', sa.JSON(), nullable=False),
    sa.Column('url', sqlmodel.sql.sqltypes.AutoString(length=2000), nullable=False),
    sa.Column('secret', sqlmodel.sql.sqltypes.AutoString(length=100), nullable=False),
    sa.Column('created', sa.Integer(), nullable=False),
    sa.Column('updated', sa.Integer(), nullable=False),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenant.id'], ),
    sa.PrimaryKeyConstraint('tenant_id')
    )


def downgrade() -> None:
    op.drop_table('alert_setting')
    with op.batch_alter_table('alert_delivery', schema=None) as batch_op:
        batch_op.drop_index('ix_alert_delivery_status_id')
        batch_op.drop_index(batch_op.f('ix_alert_delivery_event_id'))

    op.drop_table('alert_delivery')
    with op.batch_alter_table('alert_event', schema=None) as batch_op:
        batch_op.drop_index('ix_alert_event_tenant_id')

    op.drop_table('alert_event')
