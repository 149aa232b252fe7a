"""Migrations run only when due: a datastore opened on an up-to-date schema does not
import Alembic (about 100 ms of every server start)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from ca.datastore.migrate import VERSION_TABLE, head_revision, shipped_head

OPEN_TWICE = """
import sys
from ca.datastore.store import Datastore
url = sys.argv[1]
Datastore.open(url).close()          # a new database: migrated, with Alembic
first = "alembic" in sys.modules
for name in [m for m in sys.modules if m == "alembic" or m.startswith("alembic.")]:
    del sys.modules[name]
Datastore.open(url).close()          # up to date: no Alembic
print(first, "alembic" in sys.modules)
"""


def test_the_shipped_head_read_from_the_files_is_alembics() -> None:
    assert shipped_head() == head_revision()
    assert VERSION_TABLE == "tessera_schema_version"  # the fast path's query names it


def test_an_up_to_date_schema_is_opened_without_alembic(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/tessera.sqlite3"
    result = subprocess.run([sys.executable, "-c", OPEN_TWICE, url],
                            capture_output=True, text=True, timeout=60, check=True)  # fmt: skip
    assert result.stdout.split() == ["True", "False"], result.stderr
