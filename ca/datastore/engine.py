"""Connecting to the database: URL checks, SQLite file safety, per-dialect settings.

Two dialects are supported::

    sqlite:////var/lib/tessera/datastore.sqlite3          # embedded default
    postgresql+psycopg://tessera@db.internal/tessera     # shared by several servers

For SQLite the file and its directory are created if missing (0600 / 0700),
and every connection runs in WAL mode with ``synchronous=NORMAL``, a busy
timeout and foreign keys on. ``NORMAL`` syncs the WAL at checkpoints, not at
every commit: a commit survives the server process crashing, the last few may
be lost if the machine loses power, and the file is never corrupted either way.
Write transactions start with ``BEGIN IMMEDIATE`` so two writers queue on the
lock instead of one failing half-way. For PostgreSQL, reads run in REPEATABLE
READ (one snapshot per call) and connections are checked before use.

:func:`create_engines` returns one engine and two views of it, for reads and
for writes; all share one connection pool.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL, Connection, make_url
from sqlalchemy.exc import ArgumentError

from sdk.errors import ConfigError

SQLITE_BUSY_TIMEOUT_MS = 10_000
POSTGRES_CONNECT_TIMEOUT_S = 10
WRITE_OPTION = "tessera_write"
DATASTORE_FILE = "datastore.sqlite3"


def default_datastore_url(data_dir: Path) -> str:
    """The embedded default: a SQLite file in the server's data directory."""
    return f"sqlite:///{data_dir.resolve() / DATASTORE_FILE}"


@dataclass(frozen=True)
class Engines:
    engine: Engine
    reads: Engine
    writes: Engine

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name


def parse_url(url: str) -> URL:
    """Parse and check a datastore URL; ConfigError says what a good one looks like."""
    try:
        parsed = make_url(url)
    except ArgumentError as error:
        raise ConfigError(
            f"the datastore URL {url!r} is not a database URL; use e.g. "
            "sqlite:////var/lib/tessera/datastore.sqlite3 or "
            "postgresql+psycopg://user@host/dbname"
        ) from error
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        if parsed.drivername not in ("sqlite", "sqlite+pysqlite"):
            raise ConfigError(
                f"the SQLite driver {parsed.drivername!r} is not supported; use sqlite:"
            )
        database = parsed.database or ""
        if not database or database == ":memory:" or not os.path.isabs(database):
            raise ConfigError(
                f"the SQLite datastore URL must name an absolute file path, e.g. "
                f"sqlite:////var/lib/tessera/{DATASTORE_FILE}; got "
                f"{parsed.render_as_string(hide_password=True)!r}"
            )
        return parsed
    if backend in ("postgresql", "postgres"):
        if parsed.drivername in ("postgresql", "postgres", "postgresql+psycopg"):
            return parsed.set(drivername="postgresql+psycopg")
        raise ConfigError(
            f"the PostgreSQL driver {parsed.drivername!r} is not supported; "
            "use a postgresql+psycopg:// URL"
        )
    raise ConfigError(
        f"the datastore URL scheme {parsed.drivername!r} is not supported; "
        "use sqlite:///<absolute path> or postgresql+psycopg://..."
    )


def create_engines(url: str) -> Engines:
    parsed = parse_url(url)
    if parsed.get_backend_name() == "sqlite":
        engine = _sqlite_engine(parsed)
        return Engines(engine, engine, engine.execution_options(**{WRITE_OPTION: True}))
    engine = _postgres_engine(parsed)
    return Engines(engine, engine.execution_options(isolation_level="REPEATABLE READ"), engine)


def _sqlite_engine(url: URL) -> Engine:
    path = Path(url.database or "")
    _prepare_sqlite_file(path)
    engine = create_engine(
        url,
        connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000},
    )
    event.listen(engine, "connect", _sqlite_on_connect)
    event.listen(engine, "begin", _sqlite_on_begin)
    return engine


def _sqlite_on_connect(dbapi_connection: Any, _record: Any) -> None:
    # Let SQLAlchemy's begin event (below) start transactions, not the driver.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")  # see the module docstring
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys=ON")
    finally:
        cursor.close()


def _sqlite_on_begin(connection: Connection) -> None:
    writes = connection.get_execution_options().get(WRITE_OPTION, False)
    connection.exec_driver_sql("BEGIN IMMEDIATE" if writes else "BEGIN")


def _prepare_sqlite_file(path: Path) -> None:
    """Create the directory (0700) and the file (0600); tighten a file others can read."""
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            mode = stat.S_IMODE(path.stat().st_mode)
            if mode & 0o077:
                path.chmod(mode & 0o700)
        else:
            os.close(fd)
    except OSError as error:
        raise ConfigError(
            f"cannot create the datastore file {path}: {error.strerror or error}; "
            "choose a data directory the server may write to"
        ) from error


def _postgres_engine(url: URL) -> Engine:
    connect_args: dict[str, Any] = {}
    if "connect_timeout" not in url.query:
        connect_args["connect_timeout"] = POSTGRES_CONNECT_TIMEOUT_S
    return create_engine(url, pool_pre_ping=True, connect_args=connect_args)
