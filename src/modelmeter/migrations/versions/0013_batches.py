"""batches: a tenant's batch file served in the background (the Batch API)

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-04 19:40:00
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0013'
down_revision: str | None = '0012'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        'batch',
        sa.Column('id', sa.String(length=40), primary_key=True),
        sa.Column('tenant_id', sa.String(length=40), sa.ForeignKey('tenant.id'), nullable=False),
        sa.Column('key_id', sa.String(length=40), nullable=True),
        sa.Column('input_file_id', sa.String(length=40), nullable=False),
        sa.Column('endpoint', sa.String(length=32), nullable=False),
        sa.Column('completion_window', sa.String(length=8), nullable=False),
        sa.Column('status', sa.String(length=16), nullable=False),
        sa.Column('output_file_id', sa.String(length=40), nullable=True),
        sa.Column('error_file_id', sa.String(length=40), nullable=True),
        sa.Column('created_at', sa.Integer(), nullable=False),
        sa.Column('in_progress_at', sa.Integer(), nullable=True),
        sa.Column('expires_at', sa.Integer(), nullable=False),
        sa.Column('finalizing_at', sa.Integer(), nullable=True),
        sa.Column('completed_at', sa.Integer(), nullable=True),
        sa.Column('failed_at', sa.Integer(), nullable=True),
        sa.Column('expired_at', sa.Integer(), nullable=True),
        sa.Column('cancelling_at', sa.Integer(), nullable=True),
        sa.Column('cancelled_at', sa.Integer(), nullable=True),
        sa.Column('total', sa.Integer(), nullable=False),
        sa.Column('completed', sa.Integer(), nullable=False),
        sa.Column('failed', sa.Integer(), nullable=False),
        sa.Column('metadata_json', sa.String(), nullable=True),
        sa.Column('errors_json', sa.String(), nullable=True),
        sa.Column('lease_owner', sa.String(length=128), nullable=True),
        sa.Column('lease_until', sa.BigInteger(), nullable=True),
    )
    op.create_index('ix_batch_tenant_id', 'batch', ['tenant_id'])
    op.create_index('ix_batch_status_created', 'batch', ['status', 'created_at'])


def downgrade() -> None:
    op.drop_index('ix_batch_status_created', table_name='batch')
    op.drop_index('ix_batch_tenant_id', table_name='batch')
    op.drop_table('batch')
