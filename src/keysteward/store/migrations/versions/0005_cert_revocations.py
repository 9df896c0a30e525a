"""cert revocations and CA rotation: revoked machine certificates, the previous tenant CA during a rotation

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-04 17:00:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "cert_revocations",
        sa.Column("tenant_id", sa.String(length=36), nullable=False),
        sa.Column("serial", sa.String(length=48), nullable=False),
        sa.Column("role", sa.String(length=32), nullable=True),
        sa.Column("name", sa.String(length=128), nullable=True),
        sa.Column("not_after", sa.DateTime(timezone=True), nullable=True),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"]),
        sa.PrimaryKeyConstraint("tenant_id", "serial"),
    )
    op.create_table(
        "tenant_ca_previous",
        sa.Column("tenant_id", sa.String(length=36), nullable=False),
        sa.Column("fingerprint", sa.String(length=64), nullable=False),
        sa.Column("cert_pem", sa.Text(), nullable=False),
        sa.Column("rotated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("retired_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"]),
        sa.PrimaryKeyConstraint("tenant_id", "fingerprint"),
    )
    op.create_index("ix_issued_certs_identity", "issued_certs", ["tenant_id", "role", "name"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_issued_certs_identity", table_name="issued_certs")
    op.drop_table("tenant_ca_previous")
    op.drop_table("cert_revocations")
