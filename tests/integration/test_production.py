"""Production readiness, end to end: high availability, outages, rotation, compromise.

Every scenario runs real ``tessera server run`` and ``tessera agent run``
processes started from the CLI, and real workloads (py-spiffe, the SDK). Each
test is one scenario a production trust domain must survive:

1. two servers on one PostgreSQL database, three agents listing both, ~1,000
   SVIDs being issued while one server is killed with SIGKILL;
2. agents keep serving while no server runs at all, and catch up afterwards;
3. three minutes of mTLS between two SDK workloads, a fresh handshake every
   50 ms, while a new CA key takes over about every 25 s (``--ca-ttl 1m``) and
   every SVID is renewed every ~5 s: not one failure;
4. a suspect authority is rotated out, tainted, then revoked;
5. (last: it stops PostgreSQL) the database goes away for ~20 s.

The outage test stops and restarts the machine's PostgreSQL cluster with
``pg_ctlcluster``: anything else using that PostgreSQL at the same moment sees
the outage too. Each test prints how long it took (``pytest -s`` shows it)::

    pytest -s tests/integration/test_production.py

"""

from __future__ import annotations

import base64
import contextlib
import itertools
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import grpc  # type: ignore[import-untyped]
import httpx
import pytest
import sqlalchemy as sa
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from spiffe import TrustDomain, WorkloadApiClient

from sdk import WorkloadApiX509Source, authorize_id, mtls_client_context
from sdk.der import split_certificates
from tests.conftest import POSTGRES_ADMIN_URL, POSTGRES_HOST, POSTGRES_PORT, missing_service
from tests.integration.agent_fixtures import (  # noqa: F401  (the fixtures register by import)
    AgentProcess,
    socket_dir_fixture,
    start_agent_fixture,
)
from tests.integration.conftest import ServerProcess
from tests.integration.test_agent import create_entry, poll, spiffe_ids
from workload_api._proto import workload_pb2
from workload_api.cache import jwt_key_id, leaf_authority_id

pytestmark = pytest.mark.integration

UID = os.getuid()
TRUST_DOMAIN = TrustDomain("example.org")
SYNC_INTERVAL = 5.0
WORKLOAD_HEADER = (("workload.spiffe.io", "true"),)
pb: Any = workload_pb2  # message classes are built at import time, out of mypy's sight
StartServer = Callable[..., ServerProcess]
StartAgent = Callable[..., AgentProcess]


@pytest.fixture(autouse=True)
def _print_duration(request: pytest.FixtureRequest) -> Iterator[None]:
    began = time.monotonic()
    yield
    print(f"\n{request.node.name} took {time.monotonic() - began:.1f}s")


# -- helpers ------------------------------------------------------------------------------


def node_api(server: ServerProcess, path: str, bundle_pem: str) -> httpx.Response:
    """GET a path of the server's node API, verifying it against ``bundle_pem``.

    Servers are named by SPIFFE ID, not host name, so only the chain is checked.
    """
    context = ssl.create_default_context(cadata=bundle_pem)
    context.check_hostname = False
    return httpx.get(f"https://{server.address}{path}", verify=context, timeout=5)


def served_x509_authorities(server: ServerProcess, bundle_pem: str) -> set[str]:
    """SKIs (hex) of the X.509 authorities in the SPIFFE bundle ``server`` serves."""
    document = node_api(server, "/v1/bundle", bundle_pem).raise_for_status().json()
    skis = set()
    for key in document["keys"]:
        if key.get("use") == "x509-svid":
            cert = x509.load_der_x509_certificate(base64.b64decode(key["x5c"][0]))
            skis.add(_ski(cert))
    return skis


def pem_authorities(pem: str) -> set[str]:
    """SKIs (hex) of the certificates in a PEM bundle."""
    return {_ski(cert) for cert in x509.load_pem_x509_certificates(pem.encode())}


def _ski(cert: x509.Certificate) -> str:
    return cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest.hex()


def authorities(server: ServerProcess, kind: str = "x509") -> list[dict[str, Any]]:
    shown = server.cli_json("localauthority", kind, "show")["authorities"]
    assert isinstance(shown, list)
    return shown


def active_authority(server: ServerProcess, kind: str = "x509") -> str:
    [active] = [a for a in authorities(server, kind) if a["status"] == "active"]
    return str(active["authority_id"])


def held_svids(agent: AgentProcess) -> dict[str, tuple[int, str]]:
    """What the agent serves this process: SPIFFE ID -> (serial, signing authority).

    A plain gRPC ``FetchX509SVID`` call: py-spiffe parses hundreds of SVIDs slowly.
    """
    with grpc.insecure_channel(f"unix:{agent.socket}") as channel:
        call = channel.unary_stream(
            "/SpiffeWorkloadAPI/FetchX509SVID",
            request_serializer=pb.X509SVIDRequest.SerializeToString,
            response_deserializer=pb.X509SVIDResponse.FromString,
        )
        stream = call(pb.X509SVIDRequest(), timeout=10, metadata=WORKLOAD_HEADER)
        response = next(iter(stream))
        stream.cancel()
    held = {}
    for svid in response.svids:
        leaf = split_certificates(svid.x509_svid)[0]
        der = leaf.public_bytes(serialization.Encoding.DER)
        held[svid.spiffe_id] = (leaf.serial_number, leaf_authority_id(der))
    return held


def workload_bundle(agent: AgentProcess) -> set[str]:
    """SKIs of the X.509 authorities of the trust domain, as a workload receives them."""
    with WorkloadApiClient(socket_path=agent.endpoint, default_timeout=10) as client:
        bundle = client.fetch_x509_bundles().get_bundle_for_trust_domain(TRUST_DOMAIN)
    assert bundle is not None
    return {_ski(cert) for cert in bundle.x509_authorities}


def serves_all(server: ServerProcess, skis: set[str], bundle_pem: str) -> bool | None:
    return skis <= served_x509_authorities(server, bundle_pem) or None


def holds_all_from(agent: AgentProcess, wanted: set[str], authority: str) -> bool | None:
    """True once the agent holds SVIDs for exactly ``wanted``, each signed by ``authority``."""
    held = held_svids(agent)
    return (set(held) == wanted
            and {signer for _, signer in held.values()} == {authority}) or None


def serves(agent: AgentProcess, spiffe_id: str) -> bool | None:
    return spiffe_id in spiffe_ids(agent) or None


def logged(agent: AgentProcess, text: str) -> bool | None:
    return text in agent.log() or None


def entry_body(spiffe_id: str, parent_id: str) -> dict[str, Any]:
    return {"spiffe_id": spiffe_id, "parent_id": parent_id, "selectors": [f"unix:uid:{UID}"]}


def kill_hard(server: ServerProcess) -> None:
    """SIGKILL: no shutdown handler runs, connections and transactions are cut."""
    assert server.process is not None
    server.process.send_signal(signal.SIGKILL)
    server.process.wait(timeout=10)
    server.process = None


# -- 1. high availability -----------------------------------------------------------------

HA_ENTRIES = 999  # 333 per agent
HA_SVID_TTL = 10  # seconds: each agent re-issues its 333 SVIDs every ~5 s, without a pause
HA_FAILOVER_DEADLINE = 30.0


@pytest.mark.postgres
def test_two_servers_on_postgresql_survive_a_sigkill_during_issuance(
    postgres_url: str, start_server: StartServer, start_agent: StartAgent
) -> None:
    a = start_server("server-a", db=postgres_url)
    b = start_server("server-b", db=postgres_url)
    assert a.cli_json("healthcheck")["server_id"] != b.cli_json("healthcheck")["server_id"]
    signer = {"a": active_authority(a), "b": active_authority(b)}
    assert signer["a"] != signer["b"], "each server signs with a key of its own"

    # The bundle either server serves is the union of both servers' authorities.
    bundle_pem = b.cli("bundle", "show").stdout
    for server in (a, b):
        poll(partial(serves_all, server, set(signer.values()), bundle_pem), 5,
             f"{server.address} serving both servers' authorities")

    # ~1,000 acknowledged entries, 333 per agent, made through the admin API.
    nodes = [f"spiffe://example.org/node/ha{i}" for i in range(3)]
    expected: list[set[str]] = [set(), set(), set()]
    began = time.monotonic()
    with admin_client(b) as admin, ThreadPoolExecutor(8) as pool:
        def create(n: int) -> str:
            spiffe_id = f"spiffe://example.org/ha/w{n}"
            expected[n % 3].add(spiffe_id)
            body = {**entry_body(spiffe_id, nodes[n % 3]), "x509_svid_ttl": HA_SVID_TTL}
            return str(admin.post("/entries", json=body).raise_for_status().json()["id"])

        created = set(pool.map(create, range(HA_ENTRIES)))
    print(f"{HA_ENTRIES} entries created through the admin API in "
          f"{time.monotonic() - began:.1f}s")

    # Three agents listing both servers: two call A first, one calls B first.
    began = time.monotonic()
    orders = [[a, b], [b, a], [a, b]]
    with ThreadPoolExecutor(3) as pool:
        agents = list(pool.map(
            lambda i: start_agent(orders[i][0], alias=nodes[i], name=f"agent{i}",
                                  servers=orders[i]), range(3)))
    print(f"three agents ready, {HA_ENTRIES} SVIDs issued, in {time.monotonic() - began:.1f}s")
    engine = sa.create_engine(postgres_url)
    try:
        # Issuance never pauses: every SVID lives 10 s and is renewed at about half of it.
        # Kill A in the middle of it.
        first = issued_count(engine)
        poll(lambda: issued_count(engine) >= first + 200 or None, 15,
             "the agents renewing their SVIDs")
        # Meanwhile an operator keeps creating entries through A (for a node with no agent).
        writer = EntryWriter(a)
        poll(lambda: len(writer.acknowledged) >= 20 or None, 15, "entries created through A")
        kill_hard(a)
        killed_at = time.monotonic()
        writer.join()
        print(f"server A killed with SIGKILL after {issued_count(engine)} issuances, "
              f"{len(writer.acknowledged)} entries acknowledged by A")

        # Every workload still gets all its SVIDs, now all signed by B.
        for agent, wanted in zip(agents, expected, strict=True):
            poll(partial(holds_all_from, agent, wanted, signer["b"]), HA_FAILOVER_DEADLINE,
                 f"{agent.data_dir.name} holding an SVID from B for each of its entries")
        print(f"every SVID of the three agents came from B "
              f"{time.monotonic() - killed_at:.1f}s after the kill")

        # No acknowledged entry was lost, those A acknowledged before it died included; the
        # one request the kill cut off may or may not have been committed.
        assert len(created) == HA_ENTRIES
        with admin_client(b) as admin:
            listed = {e["id"] for e in admin.get("/entries").json()["entries"]}
        assert created <= listed and set(writer.acknowledged) <= listed
        unacknowledged = listed - created - set(writer.acknowledged)
        assert len(unacknowledged) <= 1, unacknowledged
        assert b.cli_json("entry", "count") == {"count": len(listed)}

        # Serials never repeat, and every SVID a workload holds was recorded.
        held = [held_svids(agent) for agent in agents]
        with engine.connect() as conn:
            repeated = conn.execute(sa.text(
                "SELECT serial, count(*) FROM issued_svids GROUP BY serial "
                "HAVING count(*) > 1")).all()
            recorded = {row[0] for row in conn.execute(sa.text(
                "SELECT serial FROM issued_svids"))}
        assert repeated == []
        total = issued_count(engine)
        assert total >= 2 * HA_ENTRIES
        serials = [serial for svids in held for serial, _ in svids.values()]
        assert len(serials) == len(set(serials)) == HA_ENTRIES
        assert {format(serial, "x") for serial in serials} <= recorded
        print(f"{total} workload SVIDs issued in all, no serial twice")

        # What A signed stays valid until it expires: A's authority stays in B's bundle.
        assert signer["a"] in served_x509_authorities(b, bundle_pem)
    finally:
        engine.dispose()


@pytest.mark.postgres
def test_two_servers_sign_under_one_shared_root(
    postgres_url: str, start_server: StartServer, start_agent: StartAgent, tmp_path: Path
) -> None:
    config = tmp_path / "server.toml"
    kek = tmp_path / "kek"
    kek.write_text(secrets.token_hex(32))
    kek.chmod(0o600)
    config.write_text(f'[upstream_authority.shared_root]\nkek_file = "{kek}"\n')
    a = start_server("server-a", db=postgres_url, extra=["--config", str(config)])
    b = start_server("server-b", db=postgres_url, extra=["--config", str(config)])
    assert active_authority(a) != active_authority(b), "each server signs with a key of its own"

    # One anchor for the trust domain, whichever server is asked; its key is in the
    # database, encrypted, and in no server's files.
    bundles = {server.cli("bundle", "show").stdout for server in (a, b)}
    assert len(bundles) == 1
    [bundle_pem] = bundles
    assert len(x509.load_pem_x509_certificates(bundle_pem.encode())) == 1
    engine = sa.create_engine(postgres_url)
    try:
        with engine.connect() as conn:
            [root_key] = conn.execute(sa.text("SELECT encrypted_key FROM shared_roots")).scalars()
    finally:
        engine.dispose()
    assert bytes(root_key).startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
    stored = [path.read_bytes() for server in (a, b) for path in server.data_dir.rglob("*")
              if path.is_file()]  # fmt: skip
    assert not any(bytes(root_key) in data for data in stored)
    assert not any(b"-----BEGIN PRIVATE KEY-----" in data for data in stored)

    # SVIDs minted on either server, and one a workload fetches, verify against that anchor.
    (tmp_path / "bundle.pem").write_text(bundle_pem)
    minted = []
    for server in (a, b):
        out = tmp_path / f"minted-{server.data_dir.name}"
        server.cli("x509", "mint", "--spiffe-id", "spiffe://example.org/tool", "--write",
                   str(out))  # fmt: skip
        minted.append(out / "svid.pem")
    agent = start_agent(b)
    create_entry(b, "spiffe://example.org/web", f"unix:uid:{UID}", parent=agent.alias)
    fetched = tmp_path / "fetched"
    poll(lambda: agent.cli("api", "fetch", "x509", "--write", str(fetched), check=False)
         .returncode == 0 or None, 30, "the workload's SVID")  # fmt: skip
    for svid_pem in (*minted, fetched / "svid.0.pem"):
        verified = subprocess.run(
            ["openssl", "verify", "-CAfile", str(tmp_path / "bundle.pem"),
             "-untrusted", str(svid_pem), str(svid_pem)],
            capture_output=True, text=True)  # fmt: skip
        assert verified.returncode == 0, verified.stdout + verified.stderr
    assert (fetched / "bundle.0.pem").read_text().strip() == bundle_pem.strip()


class EntryWriter:
    """Creates entries through one server's admin API, one after the other, until that server
    stops answering; keeps the IDs of those it acknowledged."""

    def __init__(self, server: ServerProcess) -> None:
        self.server = server
        self.acknowledged: list[str] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        with admin_client(self.server) as admin:
            for n in itertools.count():
                body = entry_body(f"spiffe://example.org/late/w{n}", "spiffe://example.org/late")
                try:
                    answer = admin.post("/entries", json=body)
                except httpx.HTTPError:
                    return  # the server is gone
                if answer.status_code >= 300:
                    return
                self.acknowledged.append(str(answer.json()["id"]))

    def join(self) -> None:
        self.thread.join(timeout=30)
        assert not self.thread.is_alive(), "the entry writer did not notice the server die"


def issued_count(engine: sa.Engine) -> int:
    """Workload X509-SVIDs the servers recorded."""
    with engine.connect() as conn:
        return int(conn.execute(sa.text(
            "SELECT count(*) FROM issued_svids WHERE spiffe_id LIKE 'spiffe://example.org/ha/%'"
        )).scalar_one())


def admin_client(server: ServerProcess) -> httpx.Client:
    """One client for many admin calls (``AdminClient`` opens a new one per call)."""
    return httpx.Client(transport=httpx.HTTPTransport(uds=str(server.admin_socket)),
                        base_url="http://tessera/v1", timeout=30,
                        limits=httpx.Limits(max_connections=16))


# -- 2. no server at all ------------------------------------------------------------------


@pytest.mark.postgres
def test_agents_serve_cached_svids_while_every_server_is_down(
    postgres_url: str, start_server: StartServer, start_agent: StartAgent
) -> None:
    a = start_server("server-a", db=postgres_url)
    b = start_server("server-b", db=postgres_url)
    both = {active_authority(a), active_authority(b)}
    poll(lambda: both <= pem_authorities(a.cli("bundle", "show").stdout) or None, 5,
         "server A's bundle holding both servers' authorities")
    nodes = ["spiffe://example.org/node/n0", "spiffe://example.org/node/n1"]
    agents = [start_agent(a, alias=nodes[0], name="agent0", servers=[a, b]),
              start_agent(b, alias=nodes[1], name="agent1", servers=[b, a])]
    for node, agent in zip(nodes, agents, strict=True):
        create_entry(b, f"spiffe://example.org/{agent.data_dir.name}/web", f"unix:uid:{UID}",
                     parent=node)
        poll(partial(serves, agent, f"spiffe://example.org/{agent.data_dir.name}/web"), 10,
             "the first SVID")

    a.stop()
    b.stop()
    for agent in agents:
        poll(partial(logged, agent, "serving cached SVIDs and retrying"), 3 * SYNC_INTERVAL,
             f"{agent.data_dir.name} noticing no server answers")
    for _ in range(5):  # served from cache, again and again
        for agent in agents:
            assert spiffe_ids(agent) == [f"spiffe://example.org/{agent.data_dir.name}/web"]
        time.sleep(0.2)

    a.start()  # only A comes back: agent1 lists it second
    began = time.monotonic()
    for node, agent in zip(nodes, agents, strict=True):
        create_entry(a, f"spiffe://example.org/{agent.data_dir.name}/after", f"unix:uid:{UID}",
                     parent=node)
    for agent in agents:
        poll(partial(serves, agent, f"spiffe://example.org/{agent.data_dir.name}/after"),
             4 * SYNC_INTERVAL, f"{agent.data_dir.name} catching up with the restarted server")
        assert agent.process is not None and agent.process.poll() is None
    print(f"both agents caught up {time.monotonic() - began:.1f}s after server A restarted")


# -- 3. continuous rotation ---------------------------------------------------------------

CONVERSATION_SECONDS = 150.0
"""The longest the conversation may take: it ends once it has seen what the test asks for
(three CA keys, eleven SVIDs a side: about a minute with a 30 s CA and 10 s SVIDs)."""
ENOUGH_AUTHORITIES = 3
ENOUGH_SERIALS = 11
REQUEST_INTERVAL = 0.05
ECHO_GID = 1234

# The mTLS server workload: a child running as gid 1234 (so it matches its own entry,
# not the client's), serving with the SDK and answering each request with the serial
# and authority of the client certificate it saw.
ECHO_SERVER = textwrap.dedent("""
    import asyncio, sys
    from cryptography import x509
    from sdk import WorkloadApiX509Source, authorize_id, mtls_server_context

    endpoint, client_id = sys.argv[1], sys.argv[2]
    source = WorkloadApiX509Source(endpoint, timeout=20)
    context = mtls_server_context(source, authorize_id(client_id))

    async def handle(reader, writer):
        try:
            await reader.readline()
            der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
            cert = x509.load_der_x509_certificate(der)
            aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier)
            writer.write(f"{cert.serial_number:x} {aki.value.key_identifier.hex()}\\n".encode())
            await writer.drain()
        finally:
            writer.close()

    async def main():
        server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=context)
        print(server.sockets[0].getsockname()[1], flush=True)
        await server.serve_forever()

    asyncio.run(main())
""")


@pytest.mark.timeout(CONVERSATION_SECONDS + 90)
def test_mtls_never_fails_while_ca_and_svids_rotate(
    start_server: StartServer, start_agent: StartAgent, tmp_path: Path
) -> None:
    if os.geteuid() != 0:
        missing_service("the mTLS server workload runs with another gid, which needs root")
    server = start_server(extra=["--ca-ttl", "30s", "--default-x509-svid-ttl", "10s"])
    agent = start_agent(server)
    client_id, server_id = "spiffe://example.org/echo/client", "spiffe://example.org/echo/server"
    create_entry(server, client_id, f"unix:gid:{os.getgid()}", parent=agent.alias)
    create_entry(server, server_id, f"unix:gid:{ECHO_GID}", parent=agent.alias)

    echo_log = tmp_path / "echo-server.log"
    with echo_log.open("w") as log:
        echo = subprocess.Popen(
            [sys.executable, "-c", ECHO_SERVER, agent.endpoint, client_id],
            stdout=subprocess.PIPE, stderr=log, text=True, group=ECHO_GID, extra_groups=[],
        )
    try:
        assert echo.stdout is not None
        port = int(echo.stdout.readline() or 0)
        assert port, f"the echo server did not start:\n{echo_log.read_text()}"
        with WorkloadApiX509Source(agent.endpoint, timeout=20) as source:
            context = mtls_client_context(source, authorize_id(server_id))
            seen = converse(context, port, CONVERSATION_SECONDS)
    finally:
        echo.terminate()
        echo.wait(timeout=10)

    print(f"{seen.requests} requests over {seen.elapsed:.0f}s: "
          f"{len(seen.server_serials)} server SVIDs, {len(seen.client_serials)} client SVIDs, "
          f"{len(seen.authorities)} CA keys; slowest request {seen.slowest * 1000:.0f} ms")
    assert seen.failures == [], f"{len(seen.failures)} failed requests, first: {seen.failures[:5]}"
    assert seen.enough(), (len(seen.authorities), len(seen.server_serials),
                           len(seen.client_serials))  # fmt: skip
    assert "Traceback" not in echo_log.read_text()


class Conversation:
    def __init__(self) -> None:
        self.requests = 0
        self.failures: list[str] = []
        self.server_serials: set[int] = set()
        self.client_serials: set[str] = set()
        self.authorities: set[str] = set()
        self.slowest = 0.0
        self.elapsed = 0.0

    def enough(self) -> bool:
        """Three CA keys and eleven SVIDs on each side seen: rotation of both, many times."""
        return (len(self.authorities) >= ENOUGH_AUTHORITIES
                and len(self.server_serials) >= ENOUGH_SERIALS
                and len(self.client_serials) >= ENOUGH_SERIALS)  # fmt: skip


def converse(context: ssl.SSLContext, port: int, seconds: float) -> Conversation:
    """One request per fresh mTLS connection (so each is a full handshake), every 50 ms,
    until :meth:`Conversation.enough` has been seen, or for ``seconds`` at most."""
    seen = Conversation()
    start = time.monotonic()
    end = start + seconds
    while time.monotonic() < end and not seen.enough():
        began = time.monotonic()
        seen.requests += 1
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
                    context.wrap_socket(raw, server_hostname="echo") as tls:
                tls.sendall(b"ping\n")
                answer = tls.makefile("rb").readline().decode()
                der = tls.getpeercert(binary_form=True)
            assert der is not None
            client_serial, client_authority = answer.split()
            leaf = x509.load_der_x509_certificate(der)
            seen.server_serials.add(leaf.serial_number)
            seen.authorities.update({leaf_authority_id(der), client_authority})
            seen.client_serials.add(client_serial)
        except Exception as err:  # every failure counts; keep going to see how many
            seen.failures.append(f"{time.monotonic() - end + seconds:.1f}s: {err!r}")
        took = time.monotonic() - began
        seen.slowest = max(seen.slowest, took)
        time.sleep(max(0.0, REQUEST_INTERVAL - took))
    seen.elapsed = time.monotonic() - start
    return seen


# -- 4. taint, then revoke ----------------------------------------------------------------

TAINT_DEADLINE = 2 * SYNC_INTERVAL


def test_a_tainted_authority_is_replaced_then_revoked(
    server: ServerProcess, start_agent: StartAgent
) -> None:
    agent = start_agent(server)
    for name in ("web", "api"):
        create_entry(server, f"spiffe://example.org/{name}", f"unix:uid:{UID}",
                     parent=agent.alias)
    old = active_authority(server)
    svids = poll(lambda: held if len(held := held_svids(agent)) == 2 else None, 10,
                 "both SVIDs")
    assert {authority for _, authority in svids.values()} == {old}
    with WorkloadApiClient(socket_path=agent.endpoint, default_timeout=10) as client:
        old_kid = jwt_key_id(client.fetch_jwt_svid(audience={"db"}).token)
    assert old_kid == active_authority(server, "jwt")

    # Rotate away from the suspect keys, then taint them.
    for kind in ("x509", "jwt"):
        server.cli("localauthority", kind, "prepare")
        server.cli("localauthority", kind, "activate")
    new = active_authority(server)
    assert new != old
    began = time.monotonic()
    server.cli("localauthority", "x509", "taint", "--authority-id", old)
    server.cli("localauthority", "jwt", "taint", "--authority-id", old_kid)

    def replaced() -> dict[str, tuple[int, str]] | None:
        held = held_svids(agent)
        return held if len(held) == 2 and old not in {a for _, a in held.values()} else None

    after = poll(replaced, TAINT_DEADLINE, "every SVID signed by the tainted authority replaced")
    print(f"X509-SVIDs replaced {time.monotonic() - began:.2f}s after the taint")
    assert {authority for _, authority in after.values()} == {new}
    assert all(after[i][0] != svids[i][0] for i in svids)

    def new_jwt() -> str | None:
        with WorkloadApiClient(socket_path=agent.endpoint, default_timeout=10) as client:
            kid = jwt_key_id(client.fetch_jwt_svid(audience={"db"}).token)
        return kid if kid != old_kid else None

    assert poll(new_jwt, TAINT_DEADLINE, "a JWT-SVID from the new key") == active_authority(
        server, "jwt")

    # Tainted keys stay in the bundle until revoked, then leave every bundle.
    assert old in pem_authorities(server.cli("bundle", "show").stdout)
    assert old in workload_bundle(agent)
    server.cli("localauthority", "x509", "revoke", "--authority-id", old)
    server.cli("localauthority", "jwt", "revoke", "--authority-id", old_kid)
    assert pem_authorities(server.cli("bundle", "show").stdout) == {new}
    poll(lambda: workload_bundle(agent) == {new} or None, TAINT_DEADLINE,
         "the revoked authority leaving the workload's X.509 bundle")

    def jwt_keys() -> set[str]:
        with WorkloadApiClient(socket_path=agent.endpoint, default_timeout=10) as client:
            bundle = client.fetch_jwt_bundles().get_bundle_for_trust_domain(TRUST_DOMAIN)
        assert bundle is not None
        return set(bundle.jwt_authorities)

    poll(lambda: old_kid not in jwt_keys() or None, TAINT_DEADLINE,
         "the revoked JWT key leaving the workload's JWT bundle")
    print(f"taint to revoked-everywhere: {time.monotonic() - began:.2f}s")


# -- 5. PostgreSQL outage (last: it stops the database server) ----------------------------

OUTAGE_SECONDS = 20.0
RECOVERY_DEADLINE = 30.0

def _pg_ctl(action: str, *options: str) -> subprocess.CompletedProcess[str]:
    version = sorted(os.listdir("/etc/postgresql"))[0]
    return subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", version, "main",
                           action, *options], capture_output=True, text=True, timeout=60)


def _pg_ready() -> bool:
    return subprocess.run(["pg_isready", "-h", POSTGRES_HOST, "-p", str(POSTGRES_PORT), "-q"],
                          timeout=10).returncode == 0


@pytest.fixture
def outage_database() -> Iterator[str]:
    """Like ``postgres_url``, with a pool that survives the PostgreSQL restart: the
    shared fixture's engine keeps the connection the restart cut, and its teardown
    would fail on it."""
    if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
        pytest.fail("this test stops PostgreSQL under the other workers' tests; run the "
                    "'exclusive' tests on their own, as make test does: pytest -m exclusive")
    tools = shutil.which("pg_ctlcluster") and shutil.which("pg_isready")
    if not (tools and Path("/etc/postgresql").is_dir() and POSTGRES_HOST == "127.0.0.1"):
        missing_service("this test stops and starts the local PostgreSQL with pg_ctlcluster")
    if not _pg_ready():
        missing_service(f"PostgreSQL is not reachable on {POSTGRES_HOST}:{POSTGRES_PORT}")
    name = f"tessera_test_{secrets.token_hex(6)}"
    admin = sa.create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT",
                             poolclass=sa.NullPool)
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        yield POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@contextlib.contextmanager
def postgresql_stopped() -> Iterator[None]:
    """Stop the PostgreSQL server; it is always started again, and waited for."""
    stopped = _pg_ctl("stop", "-m", "fast")
    assert stopped.returncode == 0, f"could not stop PostgreSQL: {stopped.stderr}"
    try:
        yield
    finally:
        started = _pg_ctl("start")  # exit status 2: someone else started it already
        poll(lambda: _pg_ready() or None, 60,
             f"PostgreSQL accepting connections again (pg_ctlcluster: {started.stderr})")


@pytest.mark.postgres
@pytest.mark.exclusive
def test_a_postgresql_outage_is_survived(
    outage_database: str, start_server: StartServer, start_agent: StartAgent
) -> None:
    server = start_server(db=outage_database)
    agent = start_agent(server)
    create_entry(server, "spiffe://example.org/web", f"unix:uid:{UID}", parent=agent.alias)
    poll(lambda: spiffe_ids(agent) or None, 10, "the first SVID")
    bundle_pem = server.cli("bundle", "show").stdout
    assert node_api(server, "/ready", bundle_pem).status_code == 200

    with postgresql_stopped():
        down_at = time.monotonic()
        ready = poll(lambda: r if (r := node_api(server, "/ready", bundle_pem)).status_code
                     == 503 else None, 5, "/ready answering 503")
        reason = ready.json()["reason"]
        assert reason.startswith("the datastore is unavailable: "), reason
        print(f"/ready said 503 {time.monotonic() - down_at:.2f}s into the outage: {reason}")

        for args in (("entry", "show"), ("entry", "create", "--parent-id", agent.alias,
                                         "--spiffe-id", "spiffe://example.org/nope",
                                         "--selector", "unix:uid:1")):
            began = time.monotonic()
            refused = server.cli(*args, check=False)
            took = time.monotonic() - began
            print(f"'tessera server {args[0]} {args[1]}' refused in {took:.2f}s")
            assert took < 15, f"'{' '.join(args)}' hung"
            assert refused.returncode == 1
            assert refused.stderr.startswith("Error: the datastore is unavailable: "), \
                refused.stderr
            assert "Traceback" not in refused.stderr + refused.stdout

        while time.monotonic() - down_at < OUTAGE_SECONDS:  # the workload is still served
            assert spiffe_ids(agent) == ["spiffe://example.org/web"]
            if _pg_ready():
                print("note: PostgreSQL was started again by someone else during the outage")
                break
            time.sleep(1)
        assert "serving cached SVIDs and retrying" in agent.log()

    up_at = time.monotonic()
    poll(lambda: node_api(server, "/ready", bundle_pem).status_code == 200 or None,
         RECOVERY_DEADLINE, "/ready answering 200 after PostgreSQL came back")
    print(f"/ready back to 200 {time.monotonic() - up_at:.2f}s after PostgreSQL restarted")
    create_entry(server, "spiffe://example.org/after", f"unix:uid:{UID}", parent=agent.alias)
    poll(lambda: "spiffe://example.org/after" in spiffe_ids(agent) or None, RECOVERY_DEADLINE,
         "an entry created after the outage reaching the workload")
    print(f"new entry reached the workload {time.monotonic() - up_at:.2f}s after the restart")
    assert agent.process is not None and agent.process.poll() is None
    assert server.process is not None and server.process.poll() is None
