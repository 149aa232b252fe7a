"""The caller's identity comes from the TLS handshake's client certificate and nothing else."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from spiffe import SpiffeId

from ca.api.tls import peer_spiffe_id
from ca.x509ca import build_x509_svid
from sdk.errors import Unauthenticated
from sdk.integrations.asgi import _with_peer_certificate
from sdk.keys import KeyType, PrivateKey
from tests.support.pki import self_signed
from tests.unit.ca.conftest import START, pooled_key

AGENT = SpiffeId("spiffe://example.org/tessera/agent/join_token/one")


def pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def scope_with(*chain: str) -> dict[str, Any]:
    return {"type": "http", "extensions": {"tls": {"client_cert_chain": list(chain)}}}


@pytest.fixture
def key() -> PrivateKey:
    return pooled_key(KeyType.EC_P256, 1)


@pytest.fixture
def agent_svid(make_root, key) -> x509.Certificate:
    root, signer = make_root()
    return build_x509_svid(
        spiffe_id=AGENT,
        public_key=key.public_key(),
        ca_certificate=root,
        signer=signer,
        now=START,
        ttl=timedelta(hours=1),
    )


def refusal(scope: dict[str, Any]) -> str:
    with pytest.raises(Unauthenticated) as refused:
        peer_spiffe_id(scope)
    return refused.value.message


# -- peer_spiffe_id ---------------------------------------------------------------------


NO_CERTIFICATE = "no client certificate was presented; agents must call with their SVID"
NOT_AN_SVID = "the client certificate is not an X509-SVID (needs one URI SAN)"


@pytest.mark.parametrize(
    "scope",
    [
        {"type": "http"},
        {"type": "http", "extensions": None},
        {"type": "http", "extensions": {}},
        {"type": "http", "extensions": {"tls": {}}},
        scope_with(),
    ],
    ids=["no-extensions", "none", "empty", "no-chain", "empty-chain"],
)
def test_no_client_certificate(scope):
    assert refusal(scope) == NO_CERTIFICATE


def test_a_certificate_without_a_uri_san(key):
    no_san = self_signed(subject="peer", key=key).certificate
    dns_only = self_signed(subject="peer", key=key, dns_names=["agent.example.org"]).certificate

    assert refusal(scope_with(pem(no_san))) == NOT_AN_SVID
    assert refusal(scope_with(pem(dns_only))) == NOT_AN_SVID


def test_a_certificate_with_two_uri_sans(key):
    two = self_signed(
        subject="peer", key=key, uris=[str(AGENT), "spiffe://example.org/tessera/server"]
    ).certificate

    assert refusal(scope_with(pem(two))) == NOT_AN_SVID


def test_a_uri_san_that_is_not_a_spiffe_id(key):
    web = self_signed(subject="peer", key=key, uris=["https://example.org/agent"]).certificate

    assert refusal(scope_with(pem(web))) == "the client certificate's URI SAN is not a SPIFFE ID"


def test_a_good_svid(agent_svid):
    spiffe_id, cert = peer_spiffe_id(scope_with(pem(agent_svid)))

    assert spiffe_id == AGENT
    assert cert == agent_svid


def test_only_the_leaf_names_the_caller(agent_svid, make_root):
    root, _ = make_root()

    spiffe_id, cert = peer_spiffe_id(scope_with(pem(agent_svid), pem(root)))

    assert (spiffe_id, cert) == (AGENT, agent_svid)


def test_a_connection_s_certificate_is_parsed_once(agent_svid, monkeypatch):
    # Every request of a connection carries the same PEM string.
    scope = scope_with(pem(agent_svid))
    first = peer_spiffe_id(scope)
    monkeypatch.setattr(x509, "load_pem_x509_certificate", _must_not_parse)

    again = peer_spiffe_id(scope)

    assert again == first and again[1] is first[1]


def test_a_refused_certificate_stays_refused_on_the_next_request(key):
    web = scope_with(pem(self_signed(subject="peer", key=key, uris=["https://example.org/a"])
                         .certificate))

    assert refusal(web) == refusal(web) == "the client certificate's URI SAN is not a SPIFFE ID"


def test_a_connection_without_a_certificate_is_refused_after_one_with(agent_svid):
    assert peer_spiffe_id(scope_with(pem(agent_svid)))[0] == AGENT

    assert refusal(scope_with()) == NO_CERTIFICATE


def _must_not_parse(*_: Any) -> None:
    raise AssertionError("the certificate was parsed again")


# -- _with_peer_certificate -------------------------------------------------------------


class Recorder:
    """An ASGI app that keeps the scope it was called with."""

    def __init__(self) -> None:
        self.scopes: list[dict[str, Any]] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        self.scopes.append(scope)


def call(app: Any, scope: dict[str, Any]) -> None:
    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    async def send(message: Any) -> None:
        pass

    asyncio.run(app(scope, receive, send))


def test_the_handshake_certificate_replaces_any_tls_extension(agent_svid, key):
    forged = self_signed(
        subject="peer", key=key, uris=["spiffe://example.org/tessera/server"]
    ).certificate
    inner = Recorder()
    scope = {
        "type": "http",
        "extensions": {"tls": {"client_cert_chain": [pem(forged)]}, "http.response.trailers": {}},
    }

    call(_with_peer_certificate(inner, [pem(agent_svid)]), scope)

    seen = inner.scopes[0]
    assert seen["extensions"]["tls"] == {"client_cert_chain": [pem(agent_svid)]}
    assert seen["extensions"]["http.response.trailers"] == {}
    assert peer_spiffe_id(seen)[0] == AGENT
    assert scope["extensions"]["tls"] == {"client_cert_chain": [pem(forged)]}  # not mutated


def test_without_a_handshake_certificate_a_forged_one_is_dropped(key):
    forged = self_signed(subject="peer", key=key, uris=[str(AGENT)]).certificate
    inner = Recorder()

    call(_with_peer_certificate(inner, []), scope_with(pem(forged)))

    assert refusal(inner.scopes[0]) == NO_CERTIFICATE


def test_a_scope_without_extensions_gets_the_handshake_certificate(agent_svid):
    inner = Recorder()

    call(_with_peer_certificate(inner, [pem(agent_svid)]), {"type": "http"})

    assert peer_spiffe_id(inner.scopes[0])[0] == AGENT


def test_non_http_scopes_pass_through_untouched():
    inner = Recorder()
    scope = {"type": "lifespan"}

    call(_with_peer_certificate(inner, ["x"]), scope)

    assert inner.scopes == [scope]
