"""The x509pop node attestor: both halves, made to talk to each other with certificates
issued in code by the test CA (a node PKI: a root, an intermediate, node certificates)."""

from __future__ import annotations

import base64
import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from spiffe import TrustDomain

from attestor.node import (
    AttestationResult,
    Challenge,
    NodeAttestationError,
    ServerContext,
    load_node_attestor_server,
)
from attestor.node.x509pop import (
    MAX_CHAIN_LENGTH,
    SIGNED_CONTEXT,
    X509PopAgent,
    X509PopServer,
)
from attestor.selector import Selector
from sdk.clock import SYSTEM_CLOCK, ManualClock
from sdk.errors import ConfigError
from tests.support.pki import KEYS, IssuedCertificate, TestCA, key_pem, pem

TRUST_DOMAIN = TrustDomain("example.org")
START = datetime(2030, 1, 1, tzinfo=UTC)
UNTRUSTED = (
    "node certificate does not chain to a CA this server trusts for x509pop; send the node "
    "certificate followed by its intermediates, issued under a CA in the server's ca_bundle_path"
)
FOREIGN = (
    "the x509pop challenge was issued by another server process (another server behind "
    "the same address, or this one before a restart); start attestation again"
)
ALTERED = (
    "the x509pop challenge was altered or was issued for another certificate; "
    "start attestation again"
)
MALFORMED_RESPONSE = (
    'x509pop challenge response is malformed: send {"challenge": <the challenge, unchanged>, '
    '"signature": <base64>}; start attestation again'
)
BAD_SIGNATURE = (
    "the x509pop challenge signature does not verify with the node certificate's public key; "
    "sign with the private key of the certificate sent in the payload"
)

# Node certificates and their CAs are valid from a day before START to 30 days after it.
VALIDITY: dict[str, Any] = {"not_before": START - timedelta(days=1), "ttl": timedelta(days=31)}


def sha1_hex(certificate: x509.Certificate) -> str:
    return hashlib.sha1(certificate.public_bytes(serialization.Encoding.DER)).hexdigest()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def issue(subject: str, key: Any, issuer: TestCA, **options: Any) -> IssuedCertificate:
    """A node certificate for ``key`` signed by ``issuer`` (options: TestCA.issue_certificate's)."""
    return issuer.issue_certificate(subject=subject, key=key, **VALIDITY, **options)


@dataclass
class NodePki:
    """A root CA, an intermediate under it, and a node certificate under the intermediate."""

    root: TestCA
    intermediate: TestCA
    node: IssuedCertificate


@pytest.fixture
def pki() -> NodePki:
    root = TestCA.named("Node Root CA", key=KEYS("ec-p256", 1), **VALIDITY)
    intermediate = root.intermediate(common_name="Node Issuing CA", key=KEYS("ec-p256", 2),
                                     **VALIDITY)  # fmt: skip
    node = issue(
        "node-1",
        KEYS("ec-p256", 3),
        intermediate,
        dns_names=["node-1.example.org", "web.example.org"],
        uris=["urn:tessera:node:1"],
        serial_number=0x1234ABCD,
    )
    return NodePki(root, intermediate, node)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(START)


def refuse_join_token(token: str) -> str | None:
    raise AssertionError("x509pop never redeems join tokens")


@pytest.fixture
def context(clock: ManualClock) -> ServerContext:
    return ServerContext(TRUST_DOMAIN, refuse_join_token, clock)


@pytest.fixture
def make_server(
    tmp_path: Path, context: ServerContext, pki: NodePki
) -> Callable[..., X509PopServer]:
    def make(*cas: x509.Certificate) -> X509PopServer:
        bundle = tmp_path / "node-ca.pem"
        bundle.write_bytes(pem(*(cas or (pki.root.certificate,))))
        server = load_node_attestor_server("x509pop", {"ca_bundle_path": str(bundle)}, context)
        assert isinstance(server, X509PopServer)
        return server

    return make


@pytest.fixture
def server(make_server: Callable[..., X509PopServer]) -> X509PopServer:
    return make_server()


@pytest.fixture
def make_agent(tmp_path: Path, pki: NodePki) -> Callable[..., X509PopAgent]:
    counter = iter(range(1000))

    def make(node: IssuedCertificate | TestCA | None = None, *chain: x509.Certificate,
             ) -> X509PopAgent:  # fmt: skip
        node = node or pki.node
        chain = chain or (pki.intermediate.certificate,)
        index = next(counter)
        cert_path = tmp_path / f"node-{index}.pem"
        key_path = tmp_path / f"node-{index}.key"
        cert_path.write_bytes(pem(node.certificate, *chain))
        key_path.write_bytes(key_pem(node.key))
        return X509PopAgent(cert_path, key_path)

    return make


@pytest.fixture
def agent(make_agent: Callable[..., X509PopAgent]) -> X509PopAgent:
    return make_agent()


def challenge_of(server: X509PopServer, payload: dict[str, Any]) -> dict[str, Any]:
    outcome = server.attest(payload, None)
    assert isinstance(outcome, Challenge)
    return dict(outcome.data)


def attest(server: X509PopServer, agent: X509PopAgent) -> AttestationResult:
    challenge = challenge_of(server, agent.payload())
    result = server.attest(agent.payload(), agent.answer(challenge))
    assert isinstance(result, AttestationResult)
    return result


def refused(server: X509PopServer, payload: Any, response: Any = None) -> str:
    with pytest.raises(NodeAttestationError) as caught:
        server.attest(payload, response)
    assert caught.value.status == 401
    return caught.value.message


# -- the happy path ------------------------------------------------------------------------


def test_agent_answers_the_server_challenge_and_is_admitted(
    server: X509PopServer, agent: X509PopAgent, pki: NodePki
) -> None:
    result = attest(server, agent)

    fingerprint = sha1_hex(pki.node.certificate)
    assert str(result.agent_id) == f"spiffe://example.org/tessera/agent/x509pop/{fingerprint}"
    assert agent.fingerprint == fingerprint
    assert result.can_reattest is True
    assert result.aliases == ()


def test_selectors_name_the_cn_the_trusted_ca_the_sans_and_the_serial(
    server: X509PopServer, agent: X509PopAgent, pki: NodePki
) -> None:
    result = attest(server, agent)

    assert result.selectors == (
        Selector("x509pop", "subject:cn:node-1"),
        Selector("x509pop", f"ca:fingerprint:{sha1_hex(pki.root.certificate)}"),
        Selector("x509pop", "san:dns:node-1.example.org"),
        Selector("x509pop", "san:dns:web.example.org"),
        Selector("x509pop", "san:uri:urn:tessera:node:1"),
        Selector("x509pop", "serialnumber:1234abcd"),
    )


def test_ca_selector_names_the_bundle_ca_the_chain_ends_in(
    make_server: Callable[..., X509PopServer],
    make_agent: Callable[..., X509PopAgent],
    pki: NodePki,
) -> None:
    other_root = TestCA.named("Other Root CA", key=KEYS("ec-p384", 1), **VALIDITY)
    node = issue("node-2", KEYS("ec-p256", 4), other_root)
    server = make_server(pki.root.certificate, other_root.certificate)

    result = attest(server, make_agent(node, other_root.certificate))

    assert result.selectors == (
        Selector("x509pop", "subject:cn:node-2"),
        Selector("x509pop", f"ca:fingerprint:{sha1_hex(other_root.certificate)}"),
        Selector("x509pop", f"serialnumber:{node.certificate.serial_number:x}"),
    )


@pytest.mark.parametrize("kind", ["ec-p256", "ec-p384", "rsa-2048"])
def test_every_supported_node_key_type_attests(
    kind: str,
    server: X509PopServer,
    make_agent: Callable[..., X509PopAgent],
    pki: NodePki,
) -> None:
    node = issue("node-k", KEYS(kind, 5), pki.intermediate)
    result = attest(server, make_agent(node))
    assert str(result.agent_id).endswith(sha1_hex(node.certificate))


def test_node_certificate_signed_by_a_bundle_ca_directly_attests(
    server: X509PopServer, make_agent: Callable[..., X509PopAgent], pki: NodePki
) -> None:
    node = issue("node-direct", KEYS("ec-p256", 6), pki.root)
    result = attest(server, make_agent(node, pki.root.certificate))
    assert Selector("x509pop", "subject:cn:node-direct") in result.selectors


def test_signature_is_over_the_context_and_the_nonce(
    server: X509PopServer, agent: X509PopAgent, pki: NodePki
) -> None:
    challenge = challenge_of(server, agent.payload())
    answer = agent.answer(challenge)

    nonce = base64.b64decode(challenge["nonce"])
    pki.node.key.public_key().verify(
        base64.b64decode(answer["signature"]), SIGNED_CONTEXT + nonce, ec.ECDSA(hashes.SHA256())
    )
    assert answer["challenge"] == challenge
    assert len(nonce) == 32
    assert challenge["expires_at"] == int(START.timestamp()) + 60


def test_load_node_attestor_server_knows_x509pop(context: ServerContext) -> None:
    with pytest.raises(ConfigError) as caught:
        load_node_attestor_server("tpm", {}, context)
    assert caught.value.message == (
        "unknown node attestor 'tpm'; known node attestors: join_token, x509pop"
    )


def test_server_context_reads_the_system_clock_by_default() -> None:
    assert ServerContext(TRUST_DOMAIN, refuse_join_token).clock is SYSTEM_CLOCK


# -- the chain -----------------------------------------------------------------------------


def test_node_certificate_from_another_ca_is_refused(
    server: X509PopServer, make_agent: Callable[..., X509PopAgent]
) -> None:
    stranger_ca = TestCA.named("Stranger CA", key=KEYS("ec-p256", 7), **VALIDITY)
    node = issue("node-1", KEYS("ec-p256", 3), stranger_ca)
    agent = make_agent(node, stranger_ca.certificate)

    assert refused(server, agent.payload()) == UNTRUSTED


def test_chain_without_its_intermediate_is_refused(
    server: X509PopServer, agent: X509PopAgent
) -> None:
    payload = agent.payload()
    payload["certificates"] = payload["certificates"][:1]
    assert refused(server, payload) == UNTRUSTED


def test_expired_node_certificate_is_refused(
    server: X509PopServer, agent: X509PopAgent, clock: ManualClock
) -> None:
    clock.set(START + timedelta(days=31))
    assert refused(server, agent.payload()) == (
        "node certificate expired at 2030-01-31T00:00:00Z; "
        "give the node a new certificate from its CA"
    )


def test_certificate_expiring_between_the_two_steps_is_refused(
    server: X509PopServer, agent: X509PopAgent, clock: ManualClock
) -> None:
    clock.set(START + timedelta(days=30) - timedelta(seconds=10))
    challenge = challenge_of(server, agent.payload())
    clock.advance(timedelta(seconds=20))
    message = refused(server, agent.payload(), agent.answer(challenge))
    assert message.startswith("node certificate expired at 2030-01-31T00:00:00Z")


def test_node_certificate_not_yet_valid_is_refused(
    server: X509PopServer, agent: X509PopAgent, clock: ManualClock
) -> None:
    clock.set(START - timedelta(days=2))
    assert refused(server, agent.payload()) == (
        "node certificate is not valid before 2029-12-31T00:00:00Z; "
        "check the clocks of the node's CA and of the server"
    )


def test_ca_certificate_as_node_certificate_is_refused(
    server: X509PopServer, make_agent: Callable[..., X509PopAgent], pki: NodePki
) -> None:
    agent = make_agent(pki.intermediate, pki.root.certificate)
    assert refused(server, agent.payload()) == (
        "node certificate is a CA certificate; x509pop needs an end-entity certificate "
        "issued to the node"
    )


def test_node_certificate_without_digital_signature_is_refused(
    server: X509PopServer, make_agent: Callable[..., X509PopAgent], pki: NodePki
) -> None:
    node = issue("node-1", KEYS("ec-p256", 3), pki.intermediate, digital_signature=False)
    assert refused(server, make_agent(node).payload()) == (
        "node certificate's keyUsage lacks digitalSignature, so its key may not answer the "
        "challenge; issue the node a certificate with digitalSignature"
    )


def test_node_certificate_without_key_usage_attests(
    server: X509PopServer, make_agent: Callable[..., X509PopAgent], pki: NodePki
) -> None:
    node = issue("node-1", KEYS("ec-p256", 3), pki.intermediate, key_usage=False)
    assert isinstance(attest(server, make_agent(node)), AttestationResult)


@pytest.mark.parametrize(
    ("kind", "problem"),
    [
        ("ed25519", "Ed25519PublicKey keys are not supported"),
        ("ec-p521", "EC curve secp521r1 is not supported"),
        ("rsa-1024", "an RSA key of 1024 bits is too short"),
    ],
)
def test_node_certificate_with_an_unsupported_key_is_refused(
    kind: str, problem: str, server: X509PopServer, pki: NodePki
) -> None:
    node = issue("node-1", KEYS(kind, 8), pki.intermediate)
    payload = {
        "certificates": [
            b64(c.public_bytes(serialization.Encoding.DER))
            for c in (node.certificate, pki.intermediate.certificate)
        ]
    }
    assert refused(server, payload) == (
        f"node certificate key is not usable: {problem}; x509pop needs ECDSA P-256, "
        "ECDSA P-384 or RSA of 2048 bits or more"
    )


# -- the challenge -------------------------------------------------------------------------


def test_challenge_answered_at_its_expiry_is_accepted(
    server: X509PopServer, agent: X509PopAgent, clock: ManualClock
) -> None:
    challenge = challenge_of(server, agent.payload())
    clock.advance(timedelta(seconds=60))
    assert isinstance(server.attest(agent.payload(), agent.answer(challenge)), AttestationResult)


def test_expired_challenge_is_refused(
    server: X509PopServer, agent: X509PopAgent, clock: ManualClock
) -> None:
    challenge = challenge_of(server, agent.payload())
    clock.advance(timedelta(seconds=61))
    assert refused(server, agent.payload(), agent.answer(challenge)) == (
        "the x509pop challenge expired; answer within 60 seconds: start attestation again"
    )


@pytest.mark.parametrize(
    "tamper",
    [
        lambda c: {**c, "expires_at": c["expires_at"] + 3600},
        lambda c: {**c, "nonce": b64(bytes(32))},
        lambda c: {**c, "mac": b64(bytes(32))},
    ],
    ids=["expiry", "nonce", "mac"],
)
def test_altered_challenge_is_refused(
    tamper: Callable[[dict[str, Any]], dict[str, Any]],
    server: X509PopServer,
    agent: X509PopAgent,
) -> None:
    challenge = tamper(challenge_of(server, agent.payload()))
    # The agent signs what it is given, so only the MAC can tell.
    assert refused(server, agent.payload(), agent.answer(challenge)) == ALTERED


def test_challenge_issued_for_another_certificate_is_refused(
    server: X509PopServer,
    agent: X509PopAgent,
    make_agent: Callable[..., X509PopAgent],
    pki: NodePki,
) -> None:
    other = make_agent(issue("node-9", KEYS("ec-p256", 9), pki.intermediate))
    challenge = challenge_of(server, agent.payload())
    assert refused(server, other.payload(), other.answer(challenge)) == ALTERED


def test_challenge_from_another_server_process_is_refused(
    make_server: Callable[..., X509PopServer], agent: X509PopAgent
) -> None:
    first, second = make_server(), make_server()
    challenge = challenge_of(first, agent.payload())
    assert refused(second, agent.payload(), agent.answer(challenge)) == FOREIGN
    assert isinstance(first.attest(agent.payload(), agent.answer(challenge)), AttestationResult)


def test_challenge_works_once(server: X509PopServer, agent: X509PopAgent) -> None:
    challenge = challenge_of(server, agent.payload())
    answer = agent.answer(challenge)
    server.attest(agent.payload(), answer)
    assert refused(server, agent.payload(), answer) == (
        "the x509pop challenge was answered already; start attestation again"
    )


def test_answered_challenges_are_forgotten_once_expired(
    server: X509PopServer, agent: X509PopAgent, clock: ManualClock
) -> None:
    for _ in range(3):
        attest(server, agent)
    clock.advance(timedelta(seconds=61))
    attest(server, agent)
    assert len(server._answered) == 1


def test_signature_by_another_key_is_refused(
    server: X509PopServer, agent: X509PopAgent, make_agent: Callable[..., X509PopAgent]
) -> None:
    challenge = challenge_of(server, agent.payload())
    nonce = base64.b64decode(challenge["nonce"])
    forged = KEYS("ec-p256", 10).sign(SIGNED_CONTEXT + nonce, ec.ECDSA(hashes.SHA256()))
    response = {"challenge": challenge, "signature": b64(forged)}
    assert refused(server, agent.payload(), response) == BAD_SIGNATURE


def test_signature_over_the_bare_nonce_is_refused(
    server: X509PopServer, agent: X509PopAgent, pki: NodePki
) -> None:
    challenge = challenge_of(server, agent.payload())
    nonce = base64.b64decode(challenge["nonce"])
    bare = pki.node.key.sign(nonce, ec.ECDSA(hashes.SHA256()))
    response = {"challenge": challenge, "signature": b64(bare)}
    assert refused(server, agent.payload(), response) == BAD_SIGNATURE


def test_garbage_signature_is_refused(server: X509PopServer, agent: X509PopAgent) -> None:
    challenge = challenge_of(server, agent.payload())
    response = {"challenge": challenge, "signature": b64(b"\x30\x03garbage")}
    assert refused(server, agent.payload(), response) == BAD_SIGNATURE


# -- garbage in, 401 out -------------------------------------------------------------------

MALFORMED_PAYLOAD = (
    'x509pop payload is malformed: send {"certificates": [leaf, intermediates...]}, '
    "each a base64 DER certificate"
)
NOT_DER = (
    "certificate 0 of the x509pop payload is not a base64 DER certificate of at most 49152 bytes"
)


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({}, MALFORMED_PAYLOAD),
        ({"certificates": None}, MALFORMED_PAYLOAD),
        ({"certificates": "MIIB"}, MALFORMED_PAYLOAD),
        ({"certificates": []}, MALFORMED_PAYLOAD),
        ({"certificates": {"0": "MIIB"}}, MALFORMED_PAYLOAD),
        ({"certificates": [1]}, NOT_DER),
        ({"certificates": [None]}, NOT_DER),
        ({"certificates": [""]}, NOT_DER),
        ({"certificates": ["not base64!"]}, NOT_DER),
        ({"certificates": ["é"]}, NOT_DER),
        ({"certificates": [b64(b"\x30\x82\x01\x00" + bytes(100))]}, NOT_DER),
        ({"certificates": ["A" * 70000]}, NOT_DER),
        (
            {"certificates": ["MIIB"] * (MAX_CHAIN_LENGTH + 1)},
            "x509pop payload carries 17 certificates; at most 16 are accepted "
            "(the node certificate and its intermediates)",
        ),
    ],
)
def test_malformed_payload_is_refused(server: X509PopServer, payload: Any, message: str) -> None:
    assert refused(server, payload) == message


def test_payload_that_is_not_a_mapping_is_refused(server: X509PopServer) -> None:
    assert refused(server, ["certificates"]) == MALFORMED_PAYLOAD


def test_random_bytes_as_certificates_are_refused(server: X509PopServer) -> None:
    rng = random.Random(1234)
    for _ in range(200):
        junk = rng.randbytes(rng.randrange(1, 600))
        assert refused(server, {"certificates": [b64(junk)]}) == NOT_DER


def test_bit_flipped_certificates_never_crash(server: X509PopServer, agent: X509PopAgent) -> None:
    rng = random.Random(99)
    der = base64.b64decode(agent.payload()["certificates"][0])
    intermediate = agent.payload()["certificates"][1]
    for _ in range(300):
        flipped = bytearray(der)
        position = rng.randrange(len(flipped))
        flipped[position] ^= 1 << rng.randrange(8)
        payload = {"certificates": [b64(bytes(flipped)), intermediate]}
        try:
            outcome = server.attest(payload, None)
        except NodeAttestationError as err:
            assert err.status == 401
        else:  # a flip the signature does not cover, e.g. in the outer algorithm's NULL
            assert isinstance(outcome, Challenge)


@pytest.mark.parametrize(
    "response",
    [
        "signature",
        [],
        {},
        {"challenge": "nonce", "signature": "AAAA"},
        {"challenge": {}, "signature": "AAAA"},
        {"signature": "AAAA"},
    ],
)
def test_malformed_challenge_response_is_refused(
    server: X509PopServer, agent: X509PopAgent, response: Any
) -> None:
    assert refused(server, agent.payload(), response) == MALFORMED_RESPONSE


@pytest.mark.parametrize(
    "change",
    [
        {"nonce": None},
        {"nonce": "short"},
        {"nonce": b64(bytes(31))},
        {"nonce": 7},
        {"mac": b64(bytes(16))},
        {"mac": "!!"},
        {"server_key_id": b64(bytes(4))},
        {"server_key_id": None},
        {"expires_at": True},
        {"expires_at": -1},
        {"expires_at": 2**64},
        {"expires_at": "1893456060"},
        {"expires_at": 1.5},
    ],
)
def test_challenge_with_malformed_fields_is_refused(
    server: X509PopServer, agent: X509PopAgent, change: dict[str, Any]
) -> None:
    challenge = {**challenge_of(server, agent.payload()), **change}
    response = {"challenge": challenge, "signature": b64(b"sig")}
    assert refused(server, agent.payload(), response) == MALFORMED_RESPONSE


@pytest.mark.parametrize("signature", [None, "", "***", 12, b64(bytes(4096))])
def test_malformed_signature_is_refused(
    server: X509PopServer, agent: X509PopAgent, signature: Any
) -> None:
    response = {"challenge": challenge_of(server, agent.payload()), "signature": signature}
    assert refused(server, agent.payload(), response) == MALFORMED_RESPONSE


def test_random_challenge_responses_never_crash(server: X509PopServer, agent: X509PopAgent) -> None:
    rng = random.Random(7)
    challenge = challenge_of(server, agent.payload())
    values: list[Any] = [None, True, 0, -5, 2**70, 1.5, "", "AAAA", [], {}, [1, "a"], {"a": 1}]
    for _ in range(300):
        fields = dict(challenge)
        for name in rng.sample(sorted(fields), rng.randrange(1, len(fields) + 1)):
            fields[name] = rng.choice([*values, b64(rng.randbytes(rng.randrange(0, 64)))])
        response = {"challenge": fields, "signature": rng.choice([*values, b64(b"x" * 70)])}
        with pytest.raises(NodeAttestationError):
            server.attest(agent.payload(), response)


# -- server configuration ------------------------------------------------------------------


def config_error(config: dict[str, Any], context: ServerContext) -> str:
    with pytest.raises(ConfigError) as caught:
        load_node_attestor_server("x509pop", config, context)
    return caught.value.message


def test_config_needs_a_ca_bundle_path(context: ServerContext) -> None:
    assert config_error({}, context) == (
        "[node_attestors.x509pop] ca_bundle_path: is required (the PEM file of the CAs that "
        "sign node certificates)"
    )


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        (42, "must be a file path (a string), got 42"),
        ("", "must be a file path, not an empty string"),
        (["a.pem"], "must be a file path (a string), got ['a.pem']"),
    ],
)
def test_config_ca_bundle_path_must_be_a_path(
    context: ServerContext, value: Any, problem: str
) -> None:
    assert config_error({"ca_bundle_path": value}, context) == (
        f"[node_attestors.x509pop] ca_bundle_path: {problem}"
    )


def test_config_refuses_unknown_settings(context: ServerContext) -> None:
    assert config_error({"ca_bundle_path": "x", "trust_all": True, "ttl": 1}, context) == (
        "[node_attestors.x509pop] trust_all: unknown setting; ttl: unknown setting; "
        "known settings: agent_path_template, ca_bundle_path"
    )


def test_config_accepts_only_the_default_agent_path_template(
    context: ServerContext, tmp_path: Path, pki: NodePki
) -> None:
    bundle = tmp_path / "ca.pem"
    bundle.write_bytes(pem(pki.root.certificate))
    default = {
        "ca_bundle_path": str(bundle),
        "agent_path_template": "tessera/agent/x509pop/{fingerprint}",
    }
    assert isinstance(load_node_attestor_server("x509pop", default, context), X509PopServer)
    custom = {**default, "agent_path_template": "node/{subject_cn}"}
    assert config_error(custom, context) == (
        "[node_attestors.x509pop] agent_path_template: only the default, "
        '"tessera/agent/x509pop/{fingerprint}", is supported; remove the setting'
    )


def test_config_bundle_that_cannot_be_read(context: ServerContext, tmp_path: Path) -> None:
    missing = tmp_path / "missing.pem"
    assert config_error({"ca_bundle_path": str(missing)}, context) == (
        f"node attestor x509pop cannot read ca_bundle_path {missing}: No such file or directory; "
        "point it at the PEM file of the CAs that sign node certificates"
    )


@pytest.mark.parametrize("content", [b"", b"hello\n", b"-----BEGIN PRIVATE KEY-----\n"])
def test_config_bundle_without_certificates(
    context: ServerContext, tmp_path: Path, content: bytes
) -> None:
    bundle = tmp_path / "ca.pem"
    bundle.write_bytes(content)
    assert config_error({"ca_bundle_path": str(bundle)}, context) == (
        f"ca_bundle_path {bundle} holds no PEM certificate; put the PEM certificates of the "
        "CAs that sign node certificates in it"
    )


def test_config_bundle_with_a_broken_certificate(context: ServerContext, tmp_path: Path) -> None:
    bundle = tmp_path / "ca.pem"
    bundle.write_bytes(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    message = config_error({"ca_bundle_path": str(bundle)}, context)
    assert message.startswith(f"ca_bundle_path {bundle} is not a valid PEM certificate file: ")


def test_config_bundle_with_a_non_ca_certificate(
    context: ServerContext, tmp_path: Path, pki: NodePki
) -> None:
    bundle = tmp_path / "ca.pem"
    bundle.write_bytes(pem(pki.root.certificate, pki.node.certificate))
    assert config_error({"ca_bundle_path": str(bundle)}, context) == (
        f"certificate 2 in ca_bundle_path {bundle} (CN=node-1) is not a CA certificate "
        "(basicConstraints cA is false); list only the CAs that sign node certificates"
    )


def test_config_bundle_with_a_ca_without_key_usage(context: ServerContext, tmp_path: Path) -> None:
    root = TestCA.named("Bare Root", key=KEYS("ec-p256", 11), key_usage=False, **VALIDITY)
    bundle = tmp_path / "ca.pem"
    bundle.write_bytes(pem(root.certificate))
    assert config_error({"ca_bundle_path": str(bundle)}, context) == (
        f"certificate 1 in ca_bundle_path {bundle} (CN=Bare Root) has no keyUsage extension, "
        "which a CA certificate needs; list only the CAs that sign node certificates"
    )


# -- the agent half ------------------------------------------------------------------------


def test_agent_payload_is_the_chain_in_base64_der(agent: X509PopAgent, pki: NodePki) -> None:
    assert agent.payload() == {
        "certificates": [
            b64(pki.node.certificate.public_bytes(serialization.Encoding.DER)),
            b64(pki.intermediate.certificate.public_bytes(serialization.Encoding.DER)),
        ]
    }


def test_agent_with_an_unreadable_certificate(tmp_path: Path) -> None:
    missing = tmp_path / "node.pem"
    with pytest.raises(ConfigError) as caught:
        X509PopAgent(missing, tmp_path / "node.key")
    assert caught.value.message == (
        f"cannot read the x509pop certificate {missing}: No such file or directory; "
        "pass the node certificate with --x509pop-cert"
    )


def test_agent_with_a_certificate_file_that_is_not_pem(tmp_path: Path, pki: NodePki) -> None:
    cert_path = tmp_path / "node.der"
    cert_path.write_bytes(pki.node.certificate.public_bytes(serialization.Encoding.DER))
    with pytest.raises(ConfigError) as caught:
        X509PopAgent(cert_path, tmp_path / "node.key")
    assert caught.value.message == (
        f"{cert_path} holds no PEM certificate; --x509pop-cert needs the node certificate, "
        "then its intermediates, in PEM"
    )


def write_node_files(
    tmp_path: Path, certificate: x509.Certificate, key_bytes: bytes
) -> tuple[Path, Path]:
    cert_path, key_path = tmp_path / "node.pem", tmp_path / "node.key"
    cert_path.write_bytes(pem(certificate))
    key_path.write_bytes(key_bytes)
    return cert_path, key_path


def test_agent_with_an_unreadable_key(tmp_path: Path, pki: NodePki) -> None:
    cert_path = tmp_path / "node.pem"
    cert_path.write_bytes(pem(pki.node.certificate))
    missing = tmp_path / "node.key"
    with pytest.raises(ConfigError) as caught:
        X509PopAgent(cert_path, missing)
    assert caught.value.message == (
        f"cannot read the x509pop key {missing}: No such file or directory; "
        "pass the node certificate's key with --x509pop-key"
    )


@pytest.mark.parametrize("encrypted", [True, False])
def test_agent_with_a_key_it_cannot_load(tmp_path: Path, pki: NodePki, encrypted: bool) -> None:
    content = (
        pki.node.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
        if encrypted
        else b"not a key"
    )
    cert_path, key_path = write_node_files(tmp_path, pki.node.certificate, content)
    with pytest.raises(ConfigError) as caught:
        X509PopAgent(cert_path, key_path)
    assert caught.value.message == (
        f"{key_path} is not an unencrypted PEM private key; --x509pop-key needs the node "
        "certificate's key (decrypt it first, e.g. with 'openssl pkey')"
    )


def test_agent_with_a_key_of_another_certificate(tmp_path: Path, pki: NodePki) -> None:
    other_key = key_pem(KEYS("ec-p256", 12))
    cert_path, key_path = write_node_files(tmp_path, pki.node.certificate, other_key)
    with pytest.raises(ConfigError) as caught:
        X509PopAgent(cert_path, key_path)
    assert caught.value.message == (
        f"the key in {key_path} does not belong to the certificate in {cert_path}; "
        "pass the node certificate's own key with --x509pop-key"
    )


def test_agent_with_an_unsupported_key(tmp_path: Path, pki: NodePki) -> None:
    node = issue("node-ed", KEYS("ed25519", 13), pki.intermediate)
    cert_path, key_path = write_node_files(tmp_path, node.certificate, key_pem(node.key))
    with pytest.raises(ConfigError) as caught:
        X509PopAgent(cert_path, key_path)
    assert caught.value.message == (
        f"the x509pop key {key_path} is not usable: Ed25519PrivateKey keys are not supported; "
        "use ECDSA P-256, ECDSA P-384 or RSA of 2048 bits or more"
    )


@pytest.mark.parametrize(
    "challenge", [{}, {"nonce": "AAAA"}, {"nonce": 5}, {"nonce": "%%%"}, "nonce"]
)
def test_agent_refuses_to_sign_a_malformed_challenge(agent: X509PopAgent, challenge: Any) -> None:
    with pytest.raises(NodeAttestationError) as caught:
        agent.answer(challenge)
    assert caught.value.message == (
        "the server's x509pop challenge carries no valid nonce; "
        "check that --server names a Tessera server"
    )
