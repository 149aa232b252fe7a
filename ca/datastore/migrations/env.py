"""Alembic's environment for the datastore.

Tessera runs it from :func:`ca.datastore.migrate.upgrade`, which hands over an
open connection inside a transaction (and, on PostgreSQL, holding an advisory
lock, so servers starting together migrate one at a time). A developer may
also run the alembic command with an ini naming this directory as
``script_location`` and a ``sqlalchemy.url``, e.g. to write a new revision.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from ca.datastore.migrate import VERSION_TABLE
from ca.datastore.schema import Base


def _configure_and_run(connection: object) -> None:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        version_table=VERSION_TABLE,
        render_as_batch=True,
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


connection = context.config.attributes.get("connection")
if connection is not None:
    _configure_and_run(connection)
else:
    engine = create_engine(context.config.get_main_option("sqlalchemy.url") or "")
    with engine.connect() as own_connection:
        _configure_and_run(own_connection)
    engine.dispose()
