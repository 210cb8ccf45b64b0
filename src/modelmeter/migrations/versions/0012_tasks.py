"""training files and fine-tuning jobs name their task: text classification, or token classification (named
entities)

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-03 15:30:00
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0012'
down_revision: str | None = '0011'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    for table in ('tenant_file', 'fine_tuning_job'):
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column('task', sa.String(length=32), nullable=False,
                                       server_default='text-classification'))


def downgrade() -> None:
    for table in ('tenant_file', 'fine_tuning_job'):
        with op.batch_alter_table(table) as batch:
            batch.drop_column('task')
