"""prepaid credits: grants, their draws, purchases; the tenant's credits epoch

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-02 07:40:00.000000
"""
from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = '0009'
down_revision: str | None = '0008'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('credit_grant',
    sa.Column('id', sqlmodel.sql.sqltypes.AutoString(length=40), nullable=False),
    sa.Column('tenant_id', sqlmodel.sql.sqltypes.AutoString(length=40), nullable=False),
    sa.Column('source', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('amount_cents', sa.BigInteger(), nullable=False),
    sa.Column('description', sqlmodel.sql.sqltypes.AutoString(length=500), nullable=True),
    sa.Column('expires_at', sa.Integer(), nullable=True),
    sa.Column('purchase_id', sqlmodel.sql.sqltypes.AutoString(length=40), nullable=True),
    sa.Column('created', sa.Integer(), nullable=False),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenant.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('purchase_id')
    )
    with op.batch_alter_table('credit_grant', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_credit_grant_tenant_id'), ['tenant_id'], unique=False)

    op.create_table('credit_purchase',
    sa.Column('id', sqlmodel.sql.sqltypes.AutoString(length=40), nullable=False),
    sa.Column('tenant_id', sqlmodel.sql.sqltypes.AutoString(length=40), nullable=False),
    sa.Column('amount_cents', sa.BigInteger(), nullable=False),
    sa.Column('currency', sqlmodel.sql.sqltypes.AutoString(length=3), nullable=False),
    sa.Column('status', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('stripe_invoice_id', sqlmodel.sql.sqltypes.AutoString(length=255), nullable=True),
    sa.Column('grant_id', sqlmodel.sql.sqltypes.AutoString(length=40), nullable=True),
    sa.Column('created', sa.Integer(), nullable=False),
    sa.Column('paid_at', sa.Integer(), nullable=True),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenant.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('credit_purchase', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_credit_purchase_tenant_id'), ['tenant_id'], unique=False)

    op.create_table('credit_draw',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('request_id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('grant_id', sqlmodel.sql.sqltypes.AutoString(length=40), nullable=False),
    sa.Column('tenant_id', sqlmodel.sql.sqltypes.AutoString(length=40), nullable=False),
    sa.Column('period', sqlmodel.sql.sqltypes.AutoString(length=7), nullable=False),
    sa.Column('amount_micro', sa.BigInteger(), nullable=False),
    sa.Column('created', sa.Integer(), nullable=False),
    sa.ForeignKeyConstraint(['grant_id'], ['credit_grant.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('request_id', 'grant_id', name='uq_credit_draw_request_grant')
    )
    with op.batch_alter_table('credit_draw', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_credit_draw_grant_id'), ['grant_id'], unique=False)
        batch_op.create_index('ix_credit_draw_tenant_period', ['tenant_id', 'period'], unique=False)

    with op.batch_alter_table('tenant', schema=None) as batch_op:
        batch_op.add_column(sa.Column('credits_epoch', sa.Integer(), server_default='0', nullable=False))



def downgrade() -> None:
    with op.batch_alter_table('tenant', schema=None) as batch_op:
        batch_op.drop_column('credits_epoch')

    with op.batch_alter_table('credit_draw', schema=None) as batch_op:
        batch_op.drop_index('ix_credit_draw_tenant_period')
        batch_op.drop_index(batch_op.f('ix_credit_draw_grant_id'))

    op.drop_table('credit_draw')
    with op.batch_alter_table('credit_purchase', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_credit_purchase_tenant_id'))

    op.drop_table('credit_purchase')
    with op.batch_alter_table('credit_grant', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_credit_grant_tenant_id'))

    op.drop_table('credit_grant')
