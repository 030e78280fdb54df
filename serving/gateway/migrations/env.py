"""Alembic's environment for the gateway's schema: run by serving/gateway/db.py (`migrate`) on the connection it
passes in `config.attributes["connection"]`; no alembic.ini, no URL of its own."""
from alembic import context

from serving.gateway.db import Base

connection = context.config.attributes["connection"]
# batch mode: SQLite alters a table by copying it (ALTER ... DROP COLUMN and friends); PostgreSQL alters in place
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
