"""Migrations run only when due: a datastore opened on an up-to-date schema does not
import Alembic (about 100 ms of every server start), and a new SQLite database is
created at the newest revision without it, the same database the migrations make."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

from alembic import command
from sqlalchemy import create_engine

from ca.datastore.engine import create_engines
from ca.datastore.migrate import (
    VERSION_TABLE,
    _create_new,
    alembic_config,
    head_revision,
    shipped_head,
    upgrade,
)

OPEN_TWICE = """
import sys
from ca.datastore.store import Datastore
url = sys.argv[1]
Datastore.open(url).close()          # a new database: created, without Alembic
first = "alembic" in sys.modules
Datastore.open(url).close()          # up to date: no Alembic
print(first, "alembic" in sys.modules)
"""

OPEN_MIGRATED = """
import sys
from ca.datastore.store import Datastore
Datastore.open(sys.argv[1]).close()  # made by the migrations (below), up to date
print("alembic" in sys.modules)
"""


def migrated_with_alembic(path: Path) -> None:
    """A new database brought to the head by running every migration, as before."""
    engine = create_engines(f"sqlite:///{path}").writes
    with engine.begin() as connection:
        command.upgrade(alembic_config(connection), "head")
    engine.dispose()


def database_contents(path: Path) -> dict[str, Any]:
    """Everything a database holds that Tessera could tell apart: each table's columns
    (by name: columns added by a migration come last in its table, which no query
    sees), keys, indexes and rows."""
    with sqlite3.connect(path) as connection:
        tables = sorted(row[0] for row in connection.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table'"))  # fmt: skip
        contents: dict[str, Any] = {
            "indexes": sorted(connection.execute(
                "SELECT name, tbl_name, sql FROM sqlite_master WHERE type = 'index'")),
        }  # fmt: skip
        for name in tables:
            contents[name] = {
                "columns": sorted(tuple(c[1:]) for c in connection.execute(
                    f"PRAGMA table_info('{name}')")),
                "foreign_keys": sorted(tuple(k[2:]) for k in connection.execute(
                    f"PRAGMA foreign_key_list('{name}')")),
                "indexes": sorted(tuple(i[1:]) for i in connection.execute(
                    f"PRAGMA index_list('{name}')")),
                "rows": sorted(map(repr, connection.execute(f"SELECT * FROM '{name}'"))),
            }  # fmt: skip
    return contents


def test_the_shipped_head_read_from_the_files_is_alembics() -> None:
    assert shipped_head() == head_revision()
    assert VERSION_TABLE == "tessera_schema_version"  # the fast path's query names it


def test_a_new_sqlite_database_is_created_and_opened_without_alembic(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/tessera.sqlite3"
    result = subprocess.run([sys.executable, "-c", OPEN_TWICE, url],
                            capture_output=True, text=True, timeout=60, check=True)  # fmt: skip
    assert result.stdout.split() == ["False", "False"], result.stderr


def test_an_up_to_date_schema_is_opened_without_alembic(tmp_path: Path) -> None:
    migrated_with_alembic(tmp_path / "tessera.sqlite3")
    url = f"sqlite:///{tmp_path}/tessera.sqlite3"
    result = subprocess.run([sys.executable, "-c", OPEN_MIGRATED, url],
                            capture_output=True, text=True, timeout=60, check=True)  # fmt: skip
    assert result.stdout.split() == ["False"], result.stderr


def test_a_new_database_is_the_one_the_migrations_make(tmp_path: Path) -> None:
    migrated_with_alembic(tmp_path / "migrated.sqlite3")
    engine = create_engines(f"sqlite:///{tmp_path}/created.sqlite3").writes
    upgrade(engine)
    engine.dispose()
    migrated = database_contents(tmp_path / "migrated.sqlite3")
    assert migrated[VERSION_TABLE]["rows"] == [repr((head_revision(),))]
    assert database_contents(tmp_path / "created.sqlite3") == migrated


def test_a_database_with_any_table_is_left_to_alembic(tmp_path: Path) -> None:
    path = tmp_path / "tessera.sqlite3"
    with sqlite3.connect(path) as connection:
        connection.execute("CREATE TABLE something_else (x INTEGER)")
    engine = create_engine(f"sqlite:///{path}")
    assert _create_new(engine) is False
    engine.dispose()
    with sqlite3.connect(path) as connection:
        names = [row[0] for row in connection.execute("SELECT name FROM sqlite_master")]
    assert names == ["something_else"]
