"""kmip client pins and platform reports: self-signed hypervisor certificates a tenant admin registered (KMIP
trust mode C), and each machine's latest verified TPM quote (a fact of KMIP policies)

Revision ID: 0014
Revises: 0012
Create Date: 2026-12-05 02:20:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0012"
branch_labels = None
depends_on = None

_ACTIVE = sa.text("removed_at IS NULL")


def upgrade() -> None:
    op.create_table(
        "kmip_client_pins",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("tenant_id", sa.String(length=36), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("fingerprint", sa.String(length=64), nullable=False),
        sa.Column("cert_pem", sa.Text(), nullable=False),
        sa.Column("subject", sa.String(length=255), nullable=False),
        sa.Column("not_after", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_by", sa.String(length=200), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("removed_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_kmip_client_pins_fingerprint", "kmip_client_pins", ["fingerprint"], unique=False)
    op.create_index(
        "ux_kmip_client_pins_active_fingerprint", "kmip_client_pins", ["fingerprint"], unique=True,
        sqlite_where=_ACTIVE, postgresql_where=_ACTIVE,
    )  # fmt: skip
    op.create_index(
        "ux_kmip_client_pins_active_name", "kmip_client_pins", ["tenant_id", "name"], unique=True,
        sqlite_where=_ACTIVE, postgresql_where=_ACTIVE,
    )  # fmt: skip
    op.create_table(
        "platform_reports",
        sa.Column("tenant_id", sa.String(length=36), nullable=False),
        sa.Column("holder", sa.String(length=256), nullable=False),
        sa.Column("facts", sa.Text(), nullable=False),
        sa.Column("ak_name", sa.String(length=132), nullable=False),
        sa.Column("verified_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"]),
        sa.PrimaryKeyConstraint("tenant_id", "holder"),
    )


def downgrade() -> None:
    op.drop_table("platform_reports")
    op.drop_index("ux_kmip_client_pins_active_name", table_name="kmip_client_pins")
    op.drop_index("ux_kmip_client_pins_active_fingerprint", table_name="kmip_client_pins")
    op.drop_index("ix_kmip_client_pins_fingerprint", table_name="kmip_client_pins")
    op.drop_table("kmip_client_pins")
