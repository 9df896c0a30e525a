"""vm migrations: live migrations of VMs between hosts, and the migration a migrate-out order belongs to

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-04 20:10:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("vm_orders") as batch:
        batch.add_column(sa.Column("migration_id", sa.String(length=36), nullable=True))
    op.create_table(
        "vm_migrations",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("tenant_id", sa.String(length=36), nullable=False),
        sa.Column("vm_id", sa.String(length=36), nullable=False),
        sa.Column("source", sa.String(length=128), nullable=False),
        sa.Column("destination", sa.String(length=128), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("source_lease_id", sa.String(length=36), nullable=True),
        sa.Column("incoming_lease_id", sa.String(length=36), nullable=True),
        sa.Column("address", sa.String(length=128), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"]),
        sa.ForeignKeyConstraint(["vm_id"], ["vms.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(op.f("ix_vm_migrations_vm_id"), "vm_migrations", ["vm_id"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_vm_migrations_vm_id"), table_name="vm_migrations")
    op.drop_table("vm_migrations")
    with op.batch_alter_table("vm_orders") as batch:
        batch.drop_column("migration_id")
