"""What ``tessera server run`` and ``tessera up`` load before they are ready.

Each import below is left for the first request that needs it, because loading
it at every start cost tens of milliseconds (docs/performance.md, section 8).
A fresh interpreter imports the server (or starts one on an existing data dir
until it is ready) and prints what ``sys.modules`` holds.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

# Module -> why the server starts without it.
NOT_AT_START = {
    "grpc": "the spiffe package's Workload API client: the server needs SpiffeId and "
            "TrustDomain only (sdk.spiffeid)",
    "spiffe.workloadapi": "the same",
    "spiffe.bundle": "the server's TLS context takes its TrustBundle as it is (sdk.tls)",
    "pyasn1": "imported by spiffe.bundle",
    "httpx": "federation's bundle fetches only (ca.federation.client)",
    "sqlalchemy.dialects.postgresql": "a PostgreSQL datastore only (ca.datastore.sql.base)",
    "mesh.compile": "describe and explain requests only (ca.api.meshconfig)",
    "mesh.explain": "explain requests only",
    "mesh.describe": "describe requests only",
    "mesh.parse": "mesh apply requests only",
    "alembic": "migrating an older schema only; a new SQLite database is created at the "
               "head without it (ca.datastore.migrate)",
}  # fmt: skip

IMPORTED = """
import sys
import ca.cli.run, ca.server
print(" ".join(sorted(sys.modules)))
"""

READY = """
import asyncio, sys
from ca.config import server_config
from ca.server import Server

server = Server(server_config({"trust_domain": "example.org", "bind": "127.0.0.1:0",
                               "data_dir": sys.argv[1]}))
asyncio.run(server.run(on_ready=lambda s: s.stop(), handle_signals=False))
print(" ".join(sorted(sys.modules)))
"""


def modules_after(script: str, *args: str) -> set[str]:
    ran = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True,
                         timeout=60, check=False)
    assert ran.returncode == 0, ran.stderr
    return set(ran.stdout.split())


def test_importing_the_server_leaves_these_for_later() -> None:
    loaded = modules_after(IMPORTED)
    assert "ca.server" in loaded
    assert {name: NOT_AT_START[name] for name in NOT_AT_START if name in loaded} == {}


@pytest.mark.parametrize("start", ["first", "again"])
def test_a_server_is_ready_without_them(tmp_path: Path, start: str) -> None:
    data_dir = str(tmp_path / "server")
    if start == "again":  # the common case: a restart, its datastore up to date
        modules_after(READY, data_dir)
    loaded = modules_after(READY, data_dir)
    assert "ca.api.meshconfig" in loaded and "uvicorn" in loaded
    assert {name: NOT_AT_START[name] for name in NOT_AT_START if name in loaded} == {}


def test_the_value_types_are_the_spiffe_packages_own() -> None:
    script = """
import sys
from sdk.spiffeid import SpiffeId, TrustDomain, parse_spiffe_id
assert "grpc" not in sys.modules
import spiffe
from spiffe import SpiffeId as Packaged, X509Source, TrustDomain as PackagedDomain
assert Packaged is SpiffeId and PackagedDomain is TrustDomain
assert spiffe.X509Bundle is not None and "grpc" in sys.modules
assert isinstance(parse_spiffe_id("spiffe://example.org/web"), spiffe.SpiffeId)
print("ok")
"""
    ran = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=60, check=False)
    assert ran.stdout.strip() == "ok", ran.stderr
