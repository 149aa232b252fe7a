"""A trust domain to measure: ``tessera server run`` and ``tessera agent run`` as a user starts
them, and the clients that drive them (admin API, node API over mTLS, PostgreSQL).

    with running_server(tmp / "server") as server:
        token = server.join_token("spiffe://bench.test/node/a")
        session = NodeSession(server, token)          # an agent's mTLS session, attested
        with session.client() as client:
            client.get("/v1/agent/entries")
        with running_agent(server, tmp / "agent", alias="spiffe://bench.test/node/b") as agent:
            agent.metric("tessera_agent_x509_svids")
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from spiffe import SpiffeId

from ca.admin_client import AdminClient
from ca.datastore.schema import ENTRY_REVISION, CounterRow, EntryRow, EntrySelectorRow
from sdk.address import unused_port
from sdk.csr import build_csr

TRUST_DOMAIN = "bench.test"
TESSERA = shutil.which("tessera", path=str(Path(sys.executable).parent)) or "tessera"
START_DEADLINE = 30.0
POSTGRES_HOST = os.environ.get("TESSERA_BENCH_PG_HOST", "127.0.0.1")
POSTGRES_PORT = int(os.environ.get("TESSERA_BENCH_PG_PORT", "5432"))
POSTGRES_ADMIN_URL = f"postgresql+psycopg://postgres@{POSTGRES_HOST}:{POSTGRES_PORT}/postgres"


def free_port() -> int:
    """A port for a process the bench starts (outside the range wrk's connections use)."""
    return unused_port()


def entry_body(spiffe_id: str, parent_id: str, selectors: Sequence[str], **extra: Any
               ) -> dict[str, Any]:
    """The JSON of ``POST /v1/entries``."""
    return {"spiffe_id": spiffe_id, "parent_id": parent_id, "selectors": list(selectors),
            **extra}


def _tail(path: Path, lines: int = 40) -> str:
    if not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# -- the server ----------------------------------------------------------------------------


@dataclass
class Server:
    data_dir: Path
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path
    db: str | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def admin_socket(self) -> Path:
        return self.data_dir / "admin.sock"

    @property
    def admin(self) -> AdminClient:
        return AdminClient(self.admin_socket)

    @property
    def database_url(self) -> str:
        return self.db or f"sqlite:///{self.data_dir.resolve() / 'datastore.sqlite3'}"

    def join_token(self, alias: str) -> str:
        return str(self.admin.post("/v1/tokens", json={"spiffe_id": alias})["token"])

    def bundle_pem(self) -> str:
        return bytes(self.admin.get("/v1/bundle", params={"format": "pem"}, raw=True)).decode()

    def create_entries(self, bodies: Sequence[dict[str, Any]], concurrency: int = 8
                       ) -> list[dict[str, Any]]:
        """Create entries through the admin API, ``concurrency`` requests at a time."""
        return asyncio.run(_create_entries(self.admin_socket, bodies, concurrency))

    def log(self) -> str:
        return _tail(self.log_path)


async def _create_entries(admin_socket: Path, bodies: Sequence[dict[str, Any]],
                          concurrency: int) -> list[dict[str, Any]]:
    created: list[dict[str, Any]] = [{} for _ in bodies]
    queue: asyncio.Queue[int] = asyncio.Queue()
    for index in range(len(bodies)):
        queue.put_nowait(index)
    transport = httpx.AsyncHTTPTransport(uds=str(admin_socket))
    async with httpx.AsyncClient(transport=transport, base_url="http://tessera",
                                 timeout=60) as client:

        async def worker() -> None:
            while not queue.empty():
                index = queue.get_nowait()
                response = await client.post("/v1/entries", json=bodies[index])
                if response.status_code != 201:
                    raise RuntimeError(f"entry create answered {response.status_code}: "
                                       f"{response.text}")
                created[index] = response.json()

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return created


@contextlib.contextmanager
def running_server(data_dir: Path, *, db: str | None = None) -> Iterator[Server]:
    """``tessera server run`` on a free loopback port; stopped when the block ends."""
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log_path = data_dir.parent / f"{data_dir.name}-server.log"
    args = [TESSERA, "server", "run", "--trust-domain", TRUST_DOMAIN, "--data-dir",
            str(data_dir), "--bind", f"127.0.0.1:{port}", "--log-level", "warning"]
    if db:
        args += ["--db", db]
    with log_path.open("ab") as log:
        process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
    server = Server(data_dir=data_dir, port=port, process=process, log_path=log_path, db=db)
    try:
        deadline = time.monotonic() + START_DEADLINE
        while not _healthy(server):
            if process.poll() is not None:
                raise RuntimeError(f"tessera server exited {process.returncode}:\n{server.log()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"tessera server not healthy in {START_DEADLINE}s:\n"
                                   f"{server.log()}")
            time.sleep(0.05)
        yield server
    finally:
        _stop(process)


def _healthy(server: Server) -> bool:
    if not server.admin_socket.exists():
        return False
    try:
        server.admin.get("/v1/health")
    except Exception:
        return False
    return True


# -- the agent -----------------------------------------------------------------------------


@dataclass
class Agent:
    alias: str
    socket_path: Path
    health_port: int
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def metric(self, name: str) -> float:
        """A gauge or counter of the agent's /metrics (no labels)."""
        text = httpx.get(f"http://127.0.0.1:{self.health_port}/metrics", timeout=10).text
        for line in text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        raise RuntimeError(f"the agent's /metrics has no {name}")

    def wait_for_svids(self, count: int, timeout: float) -> float:
        """Wait until the agent holds ``count`` X509-SVIDs; returns the seconds waited."""
        began = time.monotonic()
        while self.metric("tessera_agent_x509_svids") < count:
            if self.process.poll() is not None:
                raise RuntimeError(f"tessera agent exited:\n{self.log()}")
            if time.monotonic() - began > timeout:
                raise RuntimeError(f"the agent holds fewer than {count} SVIDs after "
                                   f"{timeout:.0f}s:\n{self.log()}")
            time.sleep(0.1)
        return time.monotonic() - began

    def log(self) -> str:
        return _tail(self.log_path)


@contextlib.contextmanager
def running_agent(server: Server, data_dir: Path, *, alias: str,
                  settings: Mapping[str, int] | None = None) -> Iterator[Agent]:
    """``tessera agent run`` joined to ``server`` with a fresh join token for ``alias``;
    ``settings`` go into an agent.toml it is given with ``--config``."""
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    bundle = data_dir.parent / f"{data_dir.name}-bundle.pem"
    bundle.write_text(server.bundle_pem())
    # A short path (sun_path holds 107 bytes) that every uid may reach.
    socket_dir = Path(tempfile.mkdtemp(prefix="tessera-bench-"))
    os.chmod(socket_dir, 0o755)
    socket_path = socket_dir / "agent.sock"
    health_port = free_port()
    log_path = data_dir.parent / f"{data_dir.name}-agent.log"
    args = [TESSERA, "agent", "run", "--trust-domain", TRUST_DOMAIN, "--server", server.address,
            "--data-dir", str(data_dir), "--socket", str(socket_path), "--join-token",
            server.join_token(alias), "--trust-bundle", str(bundle), "--health-bind",
            f"127.0.0.1:{health_port}", "--log-level", "warning"]
    if settings:
        config = data_dir.parent / f"{data_dir.name}-agent.toml"
        config.write_text("".join(f"{key} = {value}\n" for key, value in settings.items()))
        args += ["--config", str(config)]
    with log_path.open("ab") as log:
        process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
    agent = Agent(alias=alias, socket_path=socket_path, health_port=health_port,
                  process=process, log_path=log_path)
    try:
        deadline = time.monotonic() + START_DEADLINE
        while not _ready(agent):
            if process.poll() is not None:
                raise RuntimeError(f"tessera agent exited {process.returncode}:\n{agent.log()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"tessera agent not ready in {START_DEADLINE}s:\n"
                                   f"{agent.log()}")
            time.sleep(0.05)
        yield agent
    finally:
        _stop(process)
        shutil.rmtree(socket_dir, ignore_errors=True)


def _ready(agent: Agent) -> bool:
    try:
        url = f"http://127.0.0.1:{agent.health_port}/ready"
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


# -- the node API, as an agent calls it ------------------------------------------------------


@dataclass
class NodeSession:
    """An attested agent's mTLS session with the node API, without the agent around it."""

    server: Server
    token: str
    key: ec.EllipticCurvePrivateKey = field(
        default_factory=lambda: ec.generate_private_key(ec.SECP256R1()))
    spiffe_id: str = ""
    files: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="tessera-node-")))

    def __post_init__(self) -> None:
        self.bundle_pem = self.server.bundle_pem()
        agent_id = f"spiffe://{TRUST_DOMAIN}/tessera/agent/join_token/{self.token}"
        csr = base64.b64encode(build_csr(self.key, SpiffeId(agent_id))).decode()
        with httpx.Client(base_url=self.base_url, verify=self._context(with_svid=False),
                          timeout=30) as client:
            response = client.post("/v1/agent/attest", json={
                "attestation_type": "join_token", "payload": {"token": self.token},
                "csr": csr})
        if response.status_code != 200:
            raise RuntimeError(f"attestation refused: {response.status_code} {response.text}")
        body = response.json()
        self.spiffe_id = body["spiffe_id"]
        chain = [x509.load_der_x509_certificate(base64.b64decode(c))
                 for c in body["svid"]["cert_chain"]]
        (self.files / "svid.pem").write_bytes(
            b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain))
        key_path = self.files / "key.pem"
        key_path.touch(mode=0o600)
        key_path.write_bytes(self.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))

    @property
    def base_url(self) -> str:
        return f"https://{self.server.address}"

    def _context(self, *, with_svid: bool = True) -> ssl.SSLContext:
        context = ssl.create_default_context(cadata=self.bundle_pem)
        context.check_hostname = False  # the server is named by its SPIFFE ID
        if with_svid:
            context.load_cert_chain(self.files / "svid.pem", self.files / "key.pem")
        return context

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, verify=self._context(), timeout=60)

    def async_client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.base_url, verify=self._context(), timeout=60)

    def keep_alive(self, connections: int) -> KeepAliveClient:
        """``connections`` kept-alive HTTP/1.1 connections with the least client work per
        request (see :class:`KeepAliveClient`), opened by ``async with``."""
        return KeepAliveClient(self.server.port, self._context(), connections)

    def close(self) -> None:
        shutil.rmtree(self.files, ignore_errors=True)


class KeepAliveClient:
    """POSTs over kept-alive HTTP/1.1 connections, each request on a free connection.

    httpx spends about 2 ms of the client's CPU per request; on a machine whose
    other core runs the server, that, not the server, sets the pace of small
    requests. This client writes the request in one piece and reads the answer by
    its ``content-length`` (the node API always sends one), nothing more.

        async with session.keep_alive(16) as client:
            status, body = await client.post("/v1/agent/svids/x509", payload)
    """

    def __init__(self, port: int, context: ssl.SSLContext, connections: int) -> None:
        self._port = port
        self._context = context
        self._count = connections
        self._free: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = (
            asyncio.Queue())
        self._all: list[asyncio.StreamWriter] = []

    async def __aenter__(self) -> KeepAliveClient:
        opened = await asyncio.gather(*(
            asyncio.open_connection("127.0.0.1", self._port, ssl=self._context)
            for _ in range(self._count)))
        for reader, writer in opened:
            self._all.append(writer)
            self._free.put_nowait((reader, writer))
        return self

    async def __aexit__(self, *_: object) -> None:
        for writer in self._all:
            writer.close()
        for writer in self._all:
            with contextlib.suppress(OSError, ssl.SSLError):
                await writer.wait_closed()

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        """(status, body) of ``POST path`` with a JSON ``body``."""
        reader, writer = await self._free.get()
        try:
            writer.write(
                f"POST {path} HTTP/1.1\r\nhost: 127.0.0.1:{self._port}\r\n"
                f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
                .encode() + body)
            head = await reader.readuntil(b"\r\n\r\n")
            status_line, _, headers = head.partition(b"\r\n")
            length = None
            for line in headers.split(b"\r\n"):
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            if length is None:
                raise RuntimeError(f"an answer without content-length: {head!r}")
            answer = await reader.readexactly(length)
        except BaseException:
            writer.close()  # half a request or answer in flight: the connection is unusable
            raise
        self._free.put_nowait((reader, writer))
        return int(status_line.split(b" ", 2)[1]), answer


# -- PostgreSQL ----------------------------------------------------------------------------


def postgres_reachable() -> bool:
    try:
        with socket.create_connection((POSTGRES_HOST, POSTGRES_PORT), timeout=1):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def postgres_database() -> Iterator[str | None]:
    """A fresh PostgreSQL database, dropped afterwards; None when PostgreSQL is unreachable."""
    if not postgres_reachable():
        yield None
        return
    import sqlalchemy as sa

    name = f"tessera_bench_{secrets.token_hex(4)}"
    admin = sa.create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            connection.execute(sa.text(f'CREATE DATABASE "{name}"'))
        yield f"postgresql+psycopg://postgres@{POSTGRES_HOST}:{POSTGRES_PORT}/{name}"
    finally:
        with admin.connect() as connection:
            connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


# -- many entries at once --------------------------------------------------------------------


def seed_entries(url: str, entries: Sequence[tuple[str, str, str]]) -> None:
    """Insert (SPIFFE ID, parent ID, unix selector value) entries with SQL ``executemany``.

    The admin API creates one entry per request (two write transactions: the
    entry and its audit event); this is for populations of 10,000 and more. It
    may run while a server uses the database: the entries get the revisions
    after the current one, and the server's revision watcher wakes waiting
    agents as it would for an admin change. No audit event is written.
    """
    import sqlalchemy as sa

    now = datetime.now(UTC)
    engine = sa.create_engine(url)
    try:
        with engine.begin() as connection:
            last = connection.execute(
                sa.update(CounterRow).where(CounterRow.name == ENTRY_REVISION)
                .values(value=CounterRow.value + len(entries)).returning(CounterRow.value)
            ).scalar_one()
            first = last - len(entries) + 1
            ids = [str(uuid.uuid4()) for _ in entries]
            connection.execute(sa.insert(EntryRow), [
                {"id": entry_id, "spiffe_id": spiffe_id, "parent_id": parent_id,
                 "live_key": f"seeded-{entry_id}", "x509_svid_ttl": 0, "jwt_svid_ttl": 0,
                 "dns_names": [], "federates_with": [], "admin": False, "downstream": False,
                 "node": False, "hint": "", "expires_at": None, "revision": first + index,
                 "created_at": now, "deleted": False}
                for index, (entry_id, (spiffe_id, parent_id, _)) in enumerate(
                    zip(ids, entries, strict=True))
            ])
            connection.execute(sa.insert(EntrySelectorRow), [
                {"entry_id": entry_id, "type": "unix", "value": value}
                for entry_id, (_, _, value) in zip(ids, entries, strict=True)
            ])
    finally:
        engine.dispose()
