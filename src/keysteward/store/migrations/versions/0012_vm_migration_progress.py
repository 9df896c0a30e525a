"""vm migration progress: the source's latest report, the downtime it reported, the state a failure ended

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-04 23:10:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("vm_migrations") as batch:
        batch.add_column(sa.Column("progress", sa.Text(), nullable=True))
        batch.add_column(sa.Column("downtime_ms", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("failed_in", sa.String(length=16), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("vm_migrations") as batch:
        batch.drop_column("failed_in")
        batch.drop_column("downtime_ms")
        batch.drop_column("progress")
