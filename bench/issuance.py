"""Issuance: X509-SVIDs per second through the node API's batch endpoint.

One ``tessera server run`` process on SQLite, then on a fresh PostgreSQL
database; a client attested with a join token sends batches of CSRs (one per
authorized entry) to ``POST /v1/agent/svids/x509`` from two connections, and
every SVID issued is recorded in the datastore (checked afterwards). The
per-core figure divides SVIDs/s by the server process's CPU seconds per wall
second, read from /proc/<pid>/stat.

Ceilings from the same run: ``openssl speed ecdsap256`` (one sign and one
verify per SVID: the CSR's signature is checked, the certificate signed) and a
bare ``cryptography`` loop doing CSR-to-certificate in this process.

    python bench/run.py --only issuance
"""

from __future__ import annotations

import asyncio
import base64
import json
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from spiffe import SpiffeId

from bench.deployment import (
    TRUST_DOMAIN,
    NodeSession,
    entry_body,
    postgres_database,
    running_server,
)
from bench.machine import ProcessMeter, openssl_ecdsa_p256, profiled
from bench.report import Figure
from ca.csr import build_csr
from ca.datastore.store import Datastore

NAME = "issuance"
TARGET_PER_CORE = 3000.0
ALIAS = f"spiffe://{TRUST_DOMAIN}/node/issuer"


@dataclass(frozen=True)
class Sizes:
    batch: int
    seconds: float
    connections: int
    openssl_seconds: int
    loop_seconds: float


FULL = Sizes(batch=500, seconds=8.0, connections=2, openssl_seconds=3, loop_seconds=3.0)
QUICK = Sizes(batch=10, seconds=0.5, connections=2, openssl_seconds=1, loop_seconds=0.2)


@dataclass(frozen=True)
class Measured:
    svids: int
    wall: float
    server_cpu: float
    recorded: int

    @property
    def per_second(self) -> float:
        return self.svids / self.wall

    @property
    def per_core(self) -> float:
        return self.svids / self.server_cpu


def run(quick: bool = False) -> list[Figure]:
    sizes = QUICK if quick else FULL
    sign, verify = openssl_ecdsa_p256(sizes.openssl_seconds)
    openssl_ceiling = 1 / (1 / sign + 1 / verify)
    loop_rate = cryptography_loop(sizes.loop_seconds)
    ceiling = (f"{openssl_ceiling:,.0f}/s openssl (sign {sign:,.0f}/s + verify "
               f"{verify:,.0f}/s); {loop_rate:,.0f}/s bare cryptography")
    figures: list[Figure] = []
    with tempfile.TemporaryDirectory(prefix="tessera-bench-") as tmp:
        sqlite = measure(Path(tmp) / "sqlite", None, sizes)
        figures += _figures("SQLite", sqlite, ceiling)
        with postgres_database() as url:
            if url is None:
                print("  issuance: skipped PostgreSQL: nothing answers on 127.0.0.1:5432")
                figures.append(Figure(NAME, "X509-SVIDs/s (PostgreSQL)", None, "",
                                      note="skipped: PostgreSQL unreachable"))
            else:
                postgres = measure(Path(tmp) / "postgres", url, sizes)
                figures += _figures("PostgreSQL", postgres, ceiling)
    return figures


def _figures(backend: str, measured: Measured, ceiling: str) -> list[Figure]:
    recorded = f"all {measured.svids:,} recorded" if measured.recorded >= measured.svids else (
        f"ONLY {measured.recorded:,} of {measured.svids:,} recorded")
    return [
        Figure(NAME, f"X509-SVIDs/s, 1 server process ({backend})", measured.per_second, "/s",
               ceiling=f"server busy {measured.server_cpu / measured.wall:.2f} cores; {recorded}",
               met=None if measured.recorded >= measured.svids else False),
        Figure(NAME, f"X509-SVIDs/s per server core ({backend})", measured.per_core, "/s",
               ceiling=ceiling, target=f">= {TARGET_PER_CORE:,.0f}/s",
               met=measured.per_core >= TARGET_PER_CORE),
    ]


def measure(data_dir: Path, db: str | None, sizes: Sizes) -> Measured:
    with running_server(data_dir / "server", db=db) as server:
        entries = server.create_entries([
            entry_body(f"spiffe://{TRUST_DOMAIN}/workload/{n}", ALIAS, [f"unix:uid:{n}"])
            for n in range(sizes.batch)
        ])
        session = NodeSession(server, server.join_token(ALIAS))
        try:
            body = _batch_body(entries)
            with profiled(server.pid, f"issuance-{'postgres' if db else 'sqlite'}"):
                svids, wall, cpu = asyncio.run(_drive(session, server.pid, body, sizes))
        finally:
            session.close()
        url = server.database_url
    with Datastore.open(url) as store:
        # Less the agent SVID of the attestation and the warm-up batches.
        recorded = store.count_issued_svids() - 1 - sizes.connections * sizes.batch
    return Measured(svids=svids, wall=wall, server_cpu=cpu, recorded=recorded)


def _batch_body(entries: list[dict[str, object]]) -> bytes:
    """One request body signing every entry; CSRs may be reused (each SVID gets a new serial)."""
    requests = []
    for entry in entries:
        key = ec.generate_private_key(ec.SECP256R1())
        csr = build_csr(key, SpiffeId(str(entry["spiffe_id"])))
        requests.append({"entry_id": entry["id"], "csr": base64.b64encode(csr).decode()})
    return json.dumps({"requests": requests}).encode()


async def _drive(session: NodeSession, server_pid: int, body: bytes, sizes: Sizes
                 ) -> tuple[int, float, float]:
    """Send the batch from ``sizes.connections`` connections for ``sizes.seconds``."""
    headers = {"content-type": "application/json"}
    async with session.async_client() as client:

        async def once() -> int:
            response = await client.post("/v1/agent/svids/x509", content=body, headers=headers)
            if response.status_code != 200:
                raise RuntimeError(f"batch refused: {response.status_code} {response.text}")
            return len(response.json()["svids"])

        for _ in range(sizes.connections):  # warm up: connections, caches
            await once()
        meter = ProcessMeter(server_pid)
        deadline = time.perf_counter() + sizes.seconds
        issued = 0

        async def loop() -> None:
            nonlocal issued
            while time.perf_counter() < deadline:
                issued += await once()

        await asyncio.gather(*(loop() for _ in range(sizes.connections)))
        wall, cpu = meter.wall_seconds(), meter.cpu_seconds()
    # The warm-up batches are recorded too: count them for the check, not for the rate.
    return issued, wall, max(cpu, 1e-9)


def cryptography_loop(seconds: float) -> float:
    """CSRs to certificates per second on one core with ``cryptography`` alone."""
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
    began = time.perf_counter()
    while (elapsed := time.perf_counter() - began) < seconds:
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
