"""training files keep their token counts (one tokenization per file and tokenizer, never per job); alert
secrets are stored sealed (a wider column)

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-03 11:55:00
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0011'
down_revision: str | None = '0010'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('tenant_file') as batch:
        batch.add_column(sa.Column('token_counts_json', sa.Text(), nullable=True))
    with op.batch_alter_table('alert_setting') as batch:
        batch.alter_column('secret', type_=sa.String(length=255), existing_type=sa.String(length=100),
                           existing_nullable=False)


def downgrade() -> None:
    # alert_setting.secret stays 255 wide: the sealed secrets in it do not fit 100 (and cannot be unsealed here).
    with op.batch_alter_table('tenant_file') as batch:
        batch.drop_column('token_counts_json')
