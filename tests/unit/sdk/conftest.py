"""What the SDK tests share: the test CA, and a real Workload API on a socket.

``ca`` and ``partner_ca`` are the suite's test CAs (``tests/support/pki.py``). The
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
from pathlib import Path
from typing import Any, TypeVar

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from spiffe import X509Svid

from attestor.selector import Selector
from attestor.workload import PeerCredentials
from sdk.errors import InvalidArgument
from sdk.sources import StaticX509Source
from tests.support.pki import TestCA, x509_svid_material
from workload_api.identity import JwtSvidMaterial, ValidatedToken, X509Context
from workload_api.server import WorkloadApiServer

T = TypeVar("T")

TRUST_DOMAIN = "example.org"
PARTNER_DOMAIN = "partner.test"
WEB_ID = "spiffe://example.org/web"
API_ID = "spiffe://example.org/api"
JWT_KID = "sdk-test-key"
DEADLINE_SECONDS = 5.0


# -- the test CA --------------------------------------------------------------------------


def serial_of(svid: X509Svid) -> int:
    return svid.leaf.serial_number


@pytest.fixture
def ca(test_ca: TestCA) -> TestCA:
    """The shared test CA of example.org (TRUST_DOMAIN), by the name the SDK tests use."""
    return test_ca


@pytest.fixture
def partner_ca(partner_test_ca: TestCA) -> TestCA:
    """The shared test CA of partner.test (PARTNER_DOMAIN)."""
    return partner_test_ca


@pytest.fixture
def api_source(ca: TestCA, partner_ca: TestCA) -> StaticX509Source:
    """The server side's source: spiffe://example.org/api, trusting both trust domains."""
    return StaticX509Source(ca.issue_x509_svid(API_ID), [ca.bundle(), partner_ca.bundle()])


@pytest.fixture
def web_source(ca: TestCA) -> StaticX509Source:
    """The client side's source: spiffe://example.org/web, trusting example.org."""
    return StaticX509Source(ca.issue_x509_svid(WEB_ID), [ca.bundle()])


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
    partner_bundle = partner_ca.bundle_der()
    provider = FakeIdentityProvider(
        context=X509Context(
            svids=(x509_svid_material(ca, WEB_ID),),
            federated_bundles={f"spiffe://{PARTNER_DOMAIN}": partner_bundle},
        ),
        bundles={
            f"spiffe://{TRUST_DOMAIN}": ca.bundle_der(),
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
