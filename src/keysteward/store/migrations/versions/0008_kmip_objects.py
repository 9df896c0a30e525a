"""kmip objects: managed objects of the KMIP front-end, their material a data key wrapped under the tenant's KEK

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-04 17:30:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "kmip_objects",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("tenant_id", sa.String(length=36), nullable=False),
        sa.Column("object_type", sa.String(length=32), nullable=False),
        sa.Column("state", sa.String(length=24), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=True),
        sa.Column("data_key_id", sa.String(length=36), nullable=True),
        sa.Column("attributes", sa.Text(), nullable=False),
        sa.Column("created_by", sa.String(length=200), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_get_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"]),
        sa.ForeignKeyConstraint(["data_key_id"], ["data_keys.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_kmip_objects_tenant_state", "kmip_objects", ["tenant_id", "state"], unique=False)
    op.create_index("ix_kmip_objects_tenant_name", "kmip_objects", ["tenant_id", "name"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_kmip_objects_tenant_name", table_name="kmip_objects")
    op.drop_index("ix_kmip_objects_tenant_state", table_name="kmip_objects")
    op.drop_table("kmip_objects")
