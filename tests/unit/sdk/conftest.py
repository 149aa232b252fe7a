"""What the SDK tests share: a test CA made in code, and a real Workload API on a socket.

``TestCA`` mints X509-SVIDs (optionally through an intermediate). The
Workload API is the real ``workload_api.server.WorkloadApiServer`` on its own
event loop in a thread, serving what ``FakeIdentityProvider`` holds; tests
rotate by calling ``RunningWorkloadApi.replace``.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Coroutine, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from spiffe import SpiffeId, TrustDomain, X509Bundle, X509Svid

from attestor.selector import Selector
from attestor.workload import PeerCredentials
from sdk.errors import InvalidArgument
from sdk.sources import StaticX509Source
from workload_api.identity import JwtSvidMaterial, ValidatedToken, X509Context, X509SvidMaterial
from workload_api.server import WorkloadApiServer

T = TypeVar("T")

TRUST_DOMAIN = "example.org"
PARTNER_DOMAIN = "partner.test"
WEB_ID = "spiffe://example.org/web"
API_ID = "spiffe://example.org/api"
JWT_KID = "sdk-test-key"
DEADLINE_SECONDS = 5.0


# -- a test CA ----------------------------------------------------------------------------


class TestCA:
    """A CA for one trust domain; with ``parent`` an intermediate under that CA."""

    __test__ = False
    cert: x509.Certificate

    def __init__(self, trust_domain: str, *, parent: TestCA | None = None) -> None:
        self.trust_domain = TrustDomain(trust_domain)
        self.parent = parent
        self.key = ec.generate_private_key(ec.SECP256R1())
        serial = x509.random_serial_number()
        kind = "intermediate" if parent else "root"
        name = x509.Name(
            [
                x509.NameAttribute(x509.NameOID.ORGANIZATION_NAME, f"Tessera test {trust_domain}"),
                x509.NameAttribute(x509.NameOID.SERIAL_NUMBER, f"{kind}-{serial}"),
            ]
        )
        signer = parent.key if parent else self.key
        now = datetime.now(UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(parent.cert.subject if parent else name)
            .public_key(self.key.public_key())
            .serial_number(serial)
            .not_valid_before(now - timedelta(minutes=1))
            .not_valid_after(now + timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(_key_usage(ca=True), critical=True)
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False
            )
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.UniformResourceIdentifier(f"spiffe://{trust_domain}")]
                ),
                critical=False,
            )
        )
        if parent is not None:
            builder = builder.add_extension(_authority_key_id(parent), critical=False)
        self.cert = builder.sign(signer, hashes.SHA256())

    @property
    def root(self) -> TestCA:
        return self.parent.root if self.parent else self

    def bundle(self) -> X509Bundle:
        """The bundle relying parties hold: the root's certificate."""
        return X509Bundle(self.trust_domain, {self.root.cert})

    def issue(self, spiffe_id: str, *, dns_names: Sequence[str] = ()) -> X509Svid:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.now(UTC)
        names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(spiffe_id)]
        names += [x509.DNSName(name) for name in dns_names]
        leaf = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(seconds=10))
            .not_valid_after(now + timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(ca=False), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(x509.SubjectAlternativeName(names), critical=True)
            .add_extension(_authority_key_id(self), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        chain = [leaf] + ([self.cert] if self.parent else [])
        return X509Svid(SpiffeId(spiffe_id), chain, key)

    def material(self, spiffe_id: str) -> X509SvidMaterial:
        """An SVID the way the Workload API sends it."""
        svid = self.issue(spiffe_id)
        return X509SvidMaterial(
            spiffe_id=spiffe_id,
            cert_chain_der=b"".join(
                c.public_bytes(serialization.Encoding.DER) for c in svid.cert_chain
            ),
            private_key_der=svid.private_key.private_bytes(
                serialization.Encoding.DER,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
            bundle_der=self.root.cert.public_bytes(serialization.Encoding.DER),
        )


def _authority_key_id(issuer: TestCA) -> x509.AuthorityKeyIdentifier:
    return x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key())


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not ca,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def serial_of(svid: X509Svid) -> int:
    return svid.leaf.serial_number


@pytest.fixture
def ca() -> TestCA:
    return TestCA(TRUST_DOMAIN)


@pytest.fixture
def partner_ca() -> TestCA:
    return TestCA(PARTNER_DOMAIN)


@pytest.fixture
def api_source(ca: TestCA, partner_ca: TestCA) -> StaticX509Source:
    """The server side's source: spiffe://example.org/api, trusting both trust domains."""
    return StaticX509Source(ca.issue(API_ID), [ca.bundle(), partner_ca.bundle()])


@pytest.fixture
def web_source(ca: TestCA) -> StaticX509Source:
    """The client side's source: spiffe://example.org/web, trusting example.org."""
    return StaticX509Source(ca.issue(WEB_ID), [ca.bundle()])


# -- an event loop in a thread ------------------------------------------------------------


class LoopThread:
    """An asyncio loop in a daemon thread; ``run`` executes a coroutine there and waits."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = DEADLINE_SECONDS) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close_server(self, server: asyncio.Server) -> None:
        """Close a server made on this loop, on this loop (asyncio is not thread-safe)."""

        async def close() -> None:
            server.close()
            await server.wait_closed()

        self.run(close())

    def stop(self) -> None:
        async def cancel_leftovers() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        self.run(cancel_leftovers())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(DEADLINE_SECONDS)
        self.loop.close()


@pytest.fixture
def loop_thread() -> Iterator[LoopThread]:
    loop = LoopThread()
    yield loop
    loop.stop()


# -- a fake agent behind the real Workload API server -------------------------------------


@dataclass
class FakeIdentityProvider:
    """An IdentityProvider holding fixed material; ``replace`` swaps it (on the server's loop)."""

    context: X509Context
    bundles: dict[str, bytes]
    jwt_key: ec.EllipticCurvePrivateKey = field(
        default_factory=lambda: ec.generate_private_key(ec.SECP256R1())
    )
    _version: int = 0
    _changed: asyncio.Condition | None = None

    async def attest(self, peer: PeerCredentials) -> frozenset[Selector]:
        return frozenset({Selector("unix", f"uid:{peer.uid}")})

    def x509_context(self, selectors: frozenset[Selector]) -> X509Context:
        return self.context

    def x509_bundles(self, selectors: frozenset[Selector]) -> Mapping[str, bytes]:
        return self.bundles

    def jwt_bundles(self, selectors: frozenset[Selector]) -> Mapping[str, bytes]:
        jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(self.jwt_key.public_key()))
        jwk.update({"kid": JWT_KID, "use": "jwt-svid"})
        return {f"spiffe://{TRUST_DOMAIN}": json.dumps({"keys": [jwk]}).encode()}

    async def fetch_jwt_svids(
        self, selectors: frozenset[Selector], audience: Sequence[str], spiffe_id: str | None
    ) -> list[JwtSvidMaterial]:
        ids = [spiffe_id] if spiffe_id else [svid.spiffe_id for svid in self.context.svids]
        return [JwtSvidMaterial(spiffe_id=i, token=self.mint_jwt(i, audience)) for i in ids]

    def mint_jwt(self, spiffe_id: str, audience: Sequence[str], *, lifetime: int = 300) -> str:
        now = int(time.time())
        claims = {"sub": spiffe_id, "aud": list(audience), "iat": now, "exp": now + lifetime}
        return jwt.encode(
            claims, self.jwt_key, algorithm="ES256", headers={"kid": JWT_KID, "typ": "JWT"}
        )

    def validate_jwt_svid(self, token: str, audience: str) -> ValidatedToken:
        raise InvalidArgument("the SDK validates JWT-SVIDs itself")

    def version(self) -> int:
        return self._version

    async def wait_for_change(self, seen_version: int) -> int:
        async with self._condition():
            await self._condition().wait_for(lambda: self._version != seen_version)
            return self._version

    async def replace(self, context: X509Context) -> None:
        async with self._condition():
            self.context = context
            self._version += 1
            self._condition().notify_all()

    def _condition(self) -> asyncio.Condition:
        if self._changed is None:
            self._changed = asyncio.Condition()
        return self._changed


@dataclass
class RunningWorkloadApi:
    loop: LoopThread
    provider: FakeIdentityProvider
    socket_path: Path
    ca: TestCA

    @property
    def address(self) -> str:
        return f"unix://{self.socket_path}"

    def replace(self, context: X509Context) -> None:
        self.loop.run(self.provider.replace(context))


@pytest.fixture
def workload_api(
    loop_thread: LoopThread, ca: TestCA, partner_ca: TestCA, tmp_path: Path
) -> Iterator[RunningWorkloadApi]:
    """The Workload API serving spiffe://example.org/web, trusting example.org and partner.test."""
    partner_bundle = partner_ca.root.cert.public_bytes(serialization.Encoding.DER)
    provider = FakeIdentityProvider(
        context=X509Context(
            svids=(ca.material(WEB_ID),),
            federated_bundles={f"spiffe://{PARTNER_DOMAIN}": partner_bundle},
        ),
        bundles={
            f"spiffe://{TRUST_DOMAIN}": ca.root.cert.public_bytes(serialization.Encoding.DER),
            f"spiffe://{PARTNER_DOMAIN}": partner_bundle,
        },
    )
    socket_path = tmp_path / "agent.sock"
    server = WorkloadApiServer(provider, shutdown_grace=DEADLINE_SECONDS)
    loop_thread.run(server.start(socket_path))
    yield RunningWorkloadApi(loop_thread, provider, socket_path, ca)
    loop_thread.run(server.close())


def wait_until(condition: Any, what: str, timeout: float = DEADLINE_SECONDS) -> None:
    """Wait for something another thread does (not for time to pass)."""
    deadline = time.monotonic() + timeout
    event = threading.Event()
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        event.wait(0.01)
