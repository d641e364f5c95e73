"""Alembic environment: runs on the connection that `Database.open()` hands over."""

from __future__ import annotations

from alembic import context

from yanray.storage.models import Base

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("Yanray's migrations run through yanray.storage.db.Database.open()")

context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
context.run_migrations()
