"""xks: external key stores (URI prefixes), their SigV4 credentials (secrets wrapped) and external keys

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-04 17:00:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "xks_stores",
        sa.Column("prefix", sa.String(128), primary_key=True),
        sa.Column("tenant_id", sa.String(36), sa.ForeignKey("tenants.id"), nullable=False, index=True),
        sa.Column("region", sa.String(32), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "xks_credentials",
        sa.Column("access_key_id", sa.String(32), primary_key=True),
        sa.Column("prefix", sa.String(128), sa.ForeignKey("xks_stores.prefix"), nullable=False, index=True),
        sa.Column("secret_wrapped", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("retired_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_table(
        "xks_keys",
        sa.Column("prefix", sa.String(128), sa.ForeignKey("xks_stores.prefix"), primary_key=True),
        sa.Column("external_id", sa.String(128), primary_key=True),
        sa.Column("key_id", sa.String(36), sa.ForeignKey("keys.id"), nullable=False, unique=True),
        sa.Column("usage", sa.String(16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("xks_keys")
    op.drop_table("xks_credentials")
    op.drop_table("xks_stores")
