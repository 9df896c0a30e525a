"""Alembic environment: runs on the connection that keysteward.store.db.Database.migrate gives."""

from alembic import context

from keysteward.store.models import Base

config = context.config
connection = config.attributes.get("connection")
if connection is None:  # invoked by the alembic CLI for autogenerate
    from sqlalchemy import create_engine

    url = config.attributes.get("connection_url") or config.get_main_option("sqlalchemy.url")
    engine = create_engine(str(url))
    with engine.begin() as conn:
        context.configure(connection=conn, target_metadata=Base.metadata, render_as_batch=True)
        context.run_migrations()
else:
    context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()
