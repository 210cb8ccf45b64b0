"""training types: LoRA adapters beside full fine-tunes

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01 22:30:00.000000
"""
from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = '0007'
down_revision: str | None = '0006'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Existing rows keep NULL: tenant models and jobs from before adapters were full fine-tunes.
    with op.batch_alter_table('ml_model', schema=None) as batch_op:
        batch_op.add_column(sa.Column('training_type', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=True))

    with op.batch_alter_table('fine_tuning_job', schema=None) as batch_op:
        batch_op.add_column(sa.Column('training_type_json', sqlmodel.sql.sqltypes.AutoString(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('fine_tuning_job', schema=None) as batch_op:
        batch_op.drop_column('training_type_json')

    with op.batch_alter_table('ml_model', schema=None) as batch_op:
        batch_op.drop_column('training_type')
