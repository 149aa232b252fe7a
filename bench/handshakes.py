"""Handshakes: full mTLS handshakes per second of an SDK server context against
``openssl s_server`` on the same machine, with the same certificates and the same client.

The client is ``openssl s_time -new`` (a new connection and a full TLS 1.3
handshake each time, presenting a client SVID; no payload). Three servers,
each in its own process, are measured in turn:

- ``openssl s_server -www`` (the ceiling);
- an asyncio server with a plain ``ssl.SSLContext`` requiring a client
  certificate (what Python's TLS costs before the SDK does anything);
- the same server with ``sdk.tls.mtls_server_context`` over a static source
  (chain and trust-domain checks and the authorizer in the handshake), once on
  asyncio's default loop and once on uvloop, the loop Tessera's own processes
  run on (``sdk/eventloop.py``). The target is judged on uvloop;
- the same server, on uvloop, with the context the Tessera server's node API
  and bundle endpoint serve with (client certificate optional, its SVID and
  bundle re-read before each handshake), over a fixed identity.

Every figure is per CPU-second of the server process (user + system, all
threads, from /proc/<pid>/stat), the ceiling's as Tessera's: handshakes per
server CPU-second, and its inverse, the server's CPU per handshake. The rate
one s_time client achieves (per wall second) swings with the machine's load;
it is kept in the JSON only. The target is judged on handshakes per server
CPU-second.

    python bench/run.py --only handshakes
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from bench.deployment import TRUST_DOMAIN, free_port
from bench.machine import ProcessMeter, profiled
from bench.report import Figure

NAME = "handshakes"
TARGET_SHARE = 0.8
REPOSITORY = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Sizes:
    seconds: int


FULL = Sizes(seconds=6)
QUICK = Sizes(seconds=1)


@dataclass(frozen=True)
class Measured:
    rate: float
    """Handshakes per second one s_time client achieved."""
    cpu_per_handshake: float
    """Server CPU seconds per handshake."""

    @property
    def per_cpu_second(self) -> float:
        """Handshakes per server CPU-second."""
        return 1 / max(self.cpu_per_handshake, 1e-9)


def run(quick: bool = False) -> list[Figure]:
    sizes = QUICK if quick else FULL
    with tempfile.TemporaryDirectory(prefix="tessera-bench-") as tmp:
        files = write_certificates(Path(tmp))
        openssl = measure(_openssl_server(files), files, sizes, "handshakes-openssl")
        plain = measure(_python_server(files, "plain"), files, sizes, "handshakes-plain")
        on_asyncio = measure(_python_server(files, "sdk"), files, sizes, "handshakes-sdk")
        sdk = measure(_python_server(files, "sdk-uvloop"), files, sizes, "handshakes-sdk-uvloop")
        server = measure(_python_server(files, "server-uvloop"), files, sizes,
                         "handshakes-server-uvloop")
    measured = {"openssl": openssl, "plain": plain, "sdk_asyncio": on_asyncio, "sdk_uvloop": sdk,
                "server_uvloop": server}
    share = sdk.per_cpu_second / openssl.per_cpu_second
    return [
        Figure(NAME, "full mTLS handshakes per server CPU-second: SDK server context (uvloop)",
               sdk.per_cpu_second, "/s",
               ceiling=f"{openssl.per_cpu_second:,.0f}/s openssl s_server; "
               f"{plain.per_cpu_second:,.0f}/s asyncio + plain ssl; "
               f"{on_asyncio.per_cpu_second:,.0f}/s SDK on asyncio's loop",
               target=f">= {TARGET_SHARE:.0%} of openssl", met=share >= TARGET_SHARE,
               data={f"{name}_per_cpu_second": m.per_cpu_second for name, m in measured.items()}
               | {f"{name}_one_client_per_wall_second": m.rate for name, m in measured.items()}),
        Figure(NAME, "SDK per server CPU-second as a share of openssl s_server", share * 100, "%",
               ceiling=f"{on_asyncio.per_cpu_second / openssl.per_cpu_second:.1%} on asyncio's "
               "loop"),
        Figure(NAME, "server CPU per handshake: SDK server context (uvloop)",
               sdk.cpu_per_handshake * 1000, " ms",
               ceiling=f"{openssl.cpu_per_handshake * 1000:.3f} ms openssl s_server; "
               f"{plain.cpu_per_handshake * 1000:.3f} ms asyncio + plain ssl; "
               f"{on_asyncio.cpu_per_handshake * 1000:.3f} ms SDK on asyncio's loop"),
        Figure(NAME, "full mTLS handshakes per server CPU-second: the server's node API context "
               "(uvloop)", server.per_cpu_second, "/s",
               ceiling=f"{openssl.per_cpu_second:,.0f}/s openssl s_server; "
               f"{sdk.per_cpu_second:,.0f}/s SDK server context"),
    ]


def measure(server: contextlib.AbstractContextManager[tuple[int, int]], files: dict[str, Path],
            sizes: Sizes, profile_name: str) -> Measured:
    with server as (port, pid):
        if sizes.seconds > 1:
            _s_time(port, files, 1)  # warm up
        meter = ProcessMeter(pid)
        with profiled(pid, profile_name):
            connections, seconds = _s_time(port, files, sizes.seconds)
        cpu = meter.cpu_seconds()
    return Measured(rate=connections / seconds, cpu_per_handshake=cpu / connections)


def _s_time(port: int, files: dict[str, Path], seconds: int) -> tuple[int, float]:
    result = subprocess.run(
        ["openssl", "s_time", "-connect", f"127.0.0.1:{port}", "-new", "-time", str(seconds),
         "-cert", str(files["client.pem"]), "-key", str(files["client.key"]),
         "-CAfile", str(files["bundle.pem"])],
        capture_output=True, text=True, timeout=seconds + 60, check=False,
    )
    match = re.search(r"(\d+) connections in ([\d.]+) real seconds", result.stdout)
    if match is None or int(match.group(1)) == 0:
        raise RuntimeError(f"openssl s_time made no connection:\n{result.stdout}\n{result.stderr}")
    return int(match.group(1)), float(match.group(2))


@contextlib.contextmanager
def _openssl_server(files: dict[str, Path]) -> Iterator[tuple[int, int]]:
    port = free_port()
    process = subprocess.Popen(
        ["openssl", "s_server", "-accept", f"127.0.0.1:{port}", "-www", "-quiet", "-no_ticket",
         "-cert", str(files["server.pem"]), "-key", str(files["server.key"]),
         "-CAfile", str(files["bundle.pem"]), "-Verify", "2"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    with _serving(process, port):
        yield port, process.pid


@contextlib.contextmanager
def _python_server(files: dict[str, Path], kind: str) -> Iterator[tuple[int, int]]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "bench.handshakes", "--serve", kind, str(port),
         str(files["bundle.pem"].parent)],
        cwd=REPOSITORY, env={**os.environ, "PYTHONPATH": str(REPOSITORY)},
    )
    with _serving(process, port):
        yield port, process.pid


@contextlib.contextmanager
def _serving(process: subprocess.Popen[bytes], port: int) -> Iterator[None]:
    try:
        deadline = time.monotonic() + 20
        while True:
            with contextlib.suppress(OSError), socket_to(port):
                break
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the TLS server on port {port} did not start")
            time.sleep(0.05)
        yield
    finally:
        process.terminate()
        process.wait(timeout=10)


@contextlib.contextmanager
def socket_to(port: int) -> Iterator[None]:
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=1):
        yield


# -- certificates ------------------------------------------------------------------------


def write_certificates(directory: Path, names: Sequence[str] = ("server", "client")
                       ) -> dict[str, Path]:
    """A trust domain CA and an X509-SVID per name as PEM files: ``bundle.pem``, and
    ``<name>.pem`` and ``<name>.key`` for SPIFFE ID ``spiffe://bench.test/<name>``. Each SVID
    also carries DNS SAN ``<name>.bench.test``, for proxies that can check a DNS name but not
    a URI SAN (nginx's ``proxy_ssl_verify``, haproxy's ``verifyhost``)."""
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.now(UTC) - timedelta(minutes=1)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Tessera bench")])
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(now + timedelta(hours=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False,
                                     False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                       critical=False)
        .add_extension(x509.SubjectAlternativeName(
            [x509.UniformResourceIdentifier(f"spiffe://{TRUST_DOMAIN}")]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    files = {"bundle.pem": directory / "bundle.pem"}
    files["bundle.pem"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for name in names:
        key = ec.generate_private_key(ec.SECP256R1())
        leaf = (
            x509.CertificateBuilder().subject_name(x509.Name([]))
            .issuer_name(ca.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False,
                                         False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                  ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_key.public_key()), critical=False)
            .add_extension(x509.SubjectAlternativeName([
                x509.UniformResourceIdentifier(f"spiffe://{TRUST_DOMAIN}/{name}"),
                x509.DNSName(f"{name}.{TRUST_DOMAIN}")]), critical=True)
            .sign(ca_key, hashes.SHA256())
        )
        files[f"{name}.pem"] = directory / f"{name}.pem"
        files[f"{name}.pem"].write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
        files[f"{name}.key"] = directory / f"{name}.key"
        files[f"{name}.key"].write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
    return files


# -- the Python servers ------------------------------------------------------------------


def _server_context(kind: str, directory: Path) -> ssl.SSLContext:
    if kind == "plain":
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.verify_mode = ssl.CERT_REQUIRED
        context.options |= ssl.OP_NO_TICKET
        context.num_tickets = 0
        context.load_verify_locations(directory / "bundle.pem")
        context.load_cert_chain(directory / "server.pem", directory / "server.key")
        return context
    if kind == "server":
        return _node_api_context(directory)
    from spiffe import TrustDomain, X509Bundle, X509Svid

    from sdk.authorize import authorize_any
    from sdk.sources import StaticX509Source
    from sdk.tls import mtls_server_context

    svid = X509Svid.parse((directory / "server.pem").read_bytes(),
                          (directory / "server.key").read_bytes())
    bundle = X509Bundle.parse(TrustDomain(TRUST_DOMAIN), (directory / "bundle.pem").read_bytes())
    return mtls_server_context(StaticX509Source(svid, [bundle]), authorize_any())


def _node_api_context(directory: Path) -> ssl.SSLContext:
    """The context the server's node API serves with, over an identity that does not change."""
    from spiffe import TrustDomain

    from ca.api.tls import ServerIdentity, server_tls_context
    from sdk.bundle import TrustBundle

    chain = tuple(x509.load_pem_x509_certificates((directory / "server.pem").read_bytes()))
    key = serialization.load_pem_private_key((directory / "server.key").read_bytes(), None)
    anchors = tuple(x509.load_pem_x509_certificates((directory / "bundle.pem").read_bytes()))
    bundle = TrustBundle(TrustDomain(TRUST_DOMAIN), anchors, sequence=1)
    identity = ServerIdentity(chain=chain, private_key=key, bundle=bundle,  # type: ignore[arg-type]
                              version=(1, chain[0].serial_number))
    return server_tls_context(lambda: identity)


async def _serve(kind: str, port: int, directory: Path) -> None:
    context = _server_context(kind, directory)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, ssl.SSLError):
            await reader.read()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", port, ssl=context, backlog=1024)
    async with server:
        await server.serve_forever()


if __name__ == "__main__" and sys.argv[1:2] == ["--serve"]:
    kind = sys.argv[2]
    serving = _serve(kind.removesuffix("-uvloop"), int(sys.argv[3]), Path(sys.argv[4]))
    if kind.endswith("-uvloop"):
        import uvloop

        uvloop.run(serving)
    else:
        asyncio.run(serving)
