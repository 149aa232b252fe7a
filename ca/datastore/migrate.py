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

Alembic is imported only when a migration is due: a start against an up-to-date
schema reads the version table with one query and compares it with the newest
revision shipped, read from the migration files' ``revision``/``down_revision``
lines. Importing Alembic costs a start about 100 ms.

A new SQLite database (one without a single table) is created at the newest
revision without Alembic too (:func:`_create_new`): the tables from the models
(``ca.datastore.schema``, which a test holds equal to what the migrations make),
the rows the migrations seed, and the version table naming the head. Running
Alembic's import and the ten migrations cost ``tessera up`` on a new data
directory about 110 ms; a test checks that both ways make the same database.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    Column,
    Connection,
    Engine,
    MetaData,
    PrimaryKeyConstraint,
    Select,
    String,
    Table,
    column,
    insert,
    select,
    table,
    text,
)
from sqlalchemy.exc import SQLAlchemyError

from sdk.errors import FailedPrecondition

if TYPE_CHECKING:
    from alembic.config import Config

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
VERSION_TABLE = "tessera_schema_version"
# pg_advisory_xact_lock key: any constant that no other part of Tessera uses.
_POSTGRES_LOCK_KEY = 0x7E55E8A0001


def alembic_config(connection: Connection | None = None) -> Config:
    from alembic.config import Config

    config = Config()
    # The ini parser would read '%' as interpolation.
    config.set_main_option("script_location", str(MIGRATIONS_DIR).replace("%", "%%"))
    config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None, "the datastore has no migrations"
    return head


def schema_revision(engine: Engine) -> str | None:
    """The revision the database is at; None for a database never migrated."""
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE})
        return context.get_current_revision()


def upgrade(engine: Engine) -> None:
    """Bring the schema to the newest revision (a no-op when it is there already).

    SQLAlchemy errors pass through for the caller's boundary to translate.
    """
    if _at_shipped_head(engine):
        return
    if engine.dialect.name == "sqlite" and _create_new(engine):
        return
    from alembic import command
    from alembic.script.revision import RevisionError
    from alembic.util import CommandError

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


_REVISION = re.compile(r'^revision = "([^"]+)"$', re.M)
_READ_VERSION: Select[tuple[Any]] = select(column("version_num")).select_from(table(VERSION_TABLE))
_DOWN_REVISION = re.compile(r'^down_revision = (?:"([^"]+)"|None)$', re.M)


def shipped_head() -> str | None:
    """The newest revision among the migration files, read without Alembic; None when
    the files do not make one plain chain (Alembic then decides)."""
    revisions: set[str] = set()
    parents: set[str] = set()
    for path in (MIGRATIONS_DIR / "versions").glob("[0-9]*.py"):
        source = path.read_text(encoding="utf-8")
        revision, down = _REVISION.search(source), _DOWN_REVISION.search(source)
        if revision is None or down is None:
            return None
        revisions.add(revision.group(1))
        if down.group(1) is not None:
            parents.add(down.group(1))
    heads = revisions - parents
    return heads.pop() if len(heads) == 1 else None


def _at_shipped_head(engine: Engine) -> bool:
    """Whether the database's schema is already the newest shipped (one cheap query)."""
    head = shipped_head()
    if head is None:
        return False
    try:
        with engine.connect() as connection:
            rows = connection.execute(_READ_VERSION).all()
    except SQLAlchemyError:  # no version table yet: a new database
        return False
    return [row[0] for row in rows] == [head]


# Alembic's own version table, as its MigrationContext defines it.
_VERSION_TABLE = Table(
    VERSION_TABLE,
    MetaData(),
    Column("version_num", String(32), nullable=False),
    PrimaryKeyConstraint("version_num", name=f"{VERSION_TABLE}_pkc"),
)
_AUDIT_HEAD = "head"  # the audit_head row migration 0002 writes (ca.datastore.sql.audit)


def _create_new(engine: Engine) -> bool:
    """Create the schema of a new SQLite database at the shipped head, as the
    migrations would; False (and nothing done) when the database holds any table or
    the migration files make no plain chain: Alembic decides then.

    The check and the creation are one write transaction (``BEGIN IMMEDIATE``), so of
    two servers starting on one new file, one creates and the other finds it made."""
    head = shipped_head()
    if head is None:
        return False
    from ca.datastore.audit import GENESIS
    from ca.datastore.schema import COUNTERS, AuditHeadRow, Base, CounterRow

    with engine.begin() as connection:
        tables = connection.exec_driver_sql(
            "SELECT count(*) FROM sqlite_master WHERE type = 'table'"
        ).scalar_one()
        if tables:
            return False
        Base.metadata.create_all(connection)
        _VERSION_TABLE.create(connection)
        connection.execute(insert(_VERSION_TABLE).values(version_num=head))
        # The rows the migrations seed: the counters (0001, 0005, 0008), the audit head (0002).
        connection.execute(insert(CounterRow), [{"name": name, "value": 0} for name in COUNTERS])
        connection.execute(
            insert(AuditHeadRow).values(name=_AUDIT_HEAD, last_id=0, last_hash=GENESIS)
        )
    return True
