"""Schema migrations, run in code every time the datastore opens.

Alembic's configuration is built here, not read from an ini file, and points
at the migrations shipped inside this package. Upgrading is idempotent: an
up-to-date schema is left alone, an older one is brought to the newest
revision in one transaction, so an upgrade of Tessera never loses data::

    upgrade(engine)                 # what Datastore.open does
    schema_revision(engine)         # "0001"
    head_revision()                 # the newest revision this Tessera knows

On PostgreSQL the upgrade holds an advisory lock, so several servers starting
together migrate one after another; on SQLite the write lock does the same.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.script.revision import RevisionError
from alembic.util import CommandError
from sqlalchemy import Connection, Engine, text

from sdk.errors import FailedPrecondition

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
VERSION_TABLE = "tessera_schema_version"
# pg_advisory_xact_lock key: any constant that no other part of Tessera uses.
_POSTGRES_LOCK_KEY = 0x7E55E8A0001


def alembic_config(connection: Connection | None = None) -> Config:
    config = Config()
    # The ini parser would read '%' as interpolation.
    config.set_main_option("script_location", str(MIGRATIONS_DIR).replace("%", "%%"))
    config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None, "the datastore has no migrations"
    return head


def schema_revision(engine: Engine) -> str | None:
    """The revision the database is at; None for a database never migrated."""
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE})
        return context.get_current_revision()


def upgrade(engine: Engine) -> None:
    """Bring the schema to the newest revision (a no-op when it is there already).

    SQLAlchemy errors pass through for the caller's boundary to translate.
    """
    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            connection.execute(
                text("SELECT pg_advisory_xact_lock(:key)"), {"key": _POSTGRES_LOCK_KEY}
            )
        try:
            command.upgrade(alembic_config(connection), "head")
        except (CommandError, RevisionError) as error:
            raise FailedPrecondition(
                f"the datastore schema cannot be upgraded: {error}; if a newer Tessera "
                "has used this database, run that version (or restore a backup)"
            ) from error
