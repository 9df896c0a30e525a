"""people: API tokens belong to a person; approval votes and requests name people

Every existing token becomes its own person (named after the token, created when the token was), so
nothing that voted before loses its vote; an admin joins tokens to one person by creating new ones
with ``--person``.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-04 18:00:00.000000
"""

import uuid

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "people",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("tenant_id", sa.String(length=36), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_by", sa.String(length=64), nullable=True),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("tenant_id", "name", name="uq_person_name"),
    )
    op.create_index("ix_people_tenant_id", "people", ["tenant_id"])
    with op.batch_alter_table("api_tokens") as batch:
        batch.add_column(sa.Column("person_id", sa.String(length=36), nullable=True))
        batch.add_column(sa.Column("created_by", sa.String(length=64), nullable=True))

    conn = op.get_bind()
    tokens = sa.table(
        "api_tokens",
        sa.column("id", sa.String),
        sa.column("tenant_id", sa.String),
        sa.column("name", sa.String),
        sa.column("created_at", sa.DateTime(timezone=True)),
        sa.column("person_id", sa.String),
    )
    people = sa.table(
        "people",
        sa.column("id", sa.String),
        sa.column("tenant_id", sa.String),
        sa.column("name", sa.String),
        sa.column("created_at", sa.DateTime(timezone=True)),
    )
    for row in conn.execute(sa.select(tokens.c.id, tokens.c.tenant_id, tokens.c.name, tokens.c.created_at)).all():
        person_id = str(uuid.uuid4())
        conn.execute(
            sa.insert(people).values(id=person_id, tenant_id=row.tenant_id, name=row.name, created_at=row.created_at)
        )
        conn.execute(sa.update(tokens).where(tokens.c.id == row.id).values(person_id=person_id))

    with op.batch_alter_table("api_tokens") as batch:
        batch.alter_column("person_id", existing_type=sa.String(length=36), nullable=False)
        batch.create_foreign_key("fk_api_tokens_person_id_people", "people", ["person_id"], ["id"])
        batch.create_index("ix_api_tokens_person_id", ["person_id"])

    with op.batch_alter_table("approval_requests") as batch:
        batch.add_column(sa.Column("requested_by", sa.String(length=64), nullable=True))
    with op.batch_alter_table("approval_votes") as batch:
        batch.add_column(sa.Column("person", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("role", sa.String(length=32), nullable=True))
        batch.add_column(sa.Column("granted_by", sa.Text(), nullable=False, server_default="[]"))
        batch.create_index("uq_approval_vote_person", ["request_id", "person"], unique=True)


def downgrade() -> None:
    with op.batch_alter_table("approval_votes") as batch:
        batch.drop_index("uq_approval_vote_person")
        batch.drop_column("granted_by")
        batch.drop_column("role")
        batch.drop_column("person")
    with op.batch_alter_table("approval_requests") as batch:
        batch.drop_column("requested_by")
    with op.batch_alter_table("api_tokens") as batch:
        batch.drop_index("ix_api_tokens_person_id")
        batch.drop_constraint("fk_api_tokens_person_id_people", type_="foreignkey")
        batch.drop_column("created_by")
        batch.drop_column("person_id")
    op.drop_index("ix_people_tenant_id", table_name="people")
    op.drop_table("people")
