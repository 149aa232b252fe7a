"""The ``x509pop`` node attestor: the node proves it holds the key of a certificate.

The node has a certificate, and its private key, issued by a CA that the
server trusts for node attestation. Attestation takes two requests:

1. the agent sends its chain, ``{"certificates": [leaf, intermediates...]}``
   (base64 DER). The server checks the chain against ``ca_bundle_path`` and
   answers with a challenge: a random nonce, an expiry 60 s ahead and a MAC;
2. the agent sends the same payload again with the challenge response
   ``{"challenge": <the challenge, unchanged>, "signature": <base64>}``. The
   server checks the MAC, the expiry and the signature with the leaf's public
   key, and admits the agent as
   ``spiffe://TD/tessera/agent/x509pop/<sha1 of the leaf's DER, in hex>``.

::

    # server.toml
    [node_attestors.x509pop]
    ca_bundle_path = "/etc/tessera/node-ca.pem"

    # on the node
    tessera agent run ... --x509pop-cert /etc/tessera/node.pem --x509pop-key /etc/tessera/node.key

    agent_half = X509PopAgent(Path("node.pem"), Path("node.key"))
    challenge = server_half.attest(agent_half.payload(), None)
    result = server_half.attest(agent_half.payload(), agent_half.answer(challenge.data))

The agent signs ``SIGNED_CONTEXT + nonce`` (the prefix keeps the signature
from meaning anything outside Tessera's x509pop): ECDSA with SHA-256 for P-256
keys, with SHA-384 for P-384 keys; RSA-PSS with SHA-256, MGF1-SHA-256 and a
32-byte salt for RSA keys of 2048 bits or more.

The server keeps no state per challenge: the MAC, keyed by a random secret
that lives only in this server process, binds the nonce, the expiry and the
leaf's fingerprint. A challenge is therefore answered only to the process that
issued it; answered to another one (several servers behind one address, or
after a restart) it is refused, and the agent attests again from the first
request. Each process remembers the nonces answered in the last 60 s, so a
challenge works once.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import NameOID
from cryptography.x509.verification import (
    ClientVerifier,
    Criticality,
    ExtensionPolicy,
    Policy,
    PolicyBuilder,
    Store,
    VerificationError,
)
from pydantic import Field, field_validator

from attestor.node import (
    AttestationResult,
    Challenge,
    NodeAttestationError,
    ServerContext,
    agent_id,
)
from attestor.plugin import Plugin
from attestor.selector import MAX_SELECTOR_LENGTH, Selector
from attestor.settings import FilePath, Settings
from sdk.errors import ConfigError
from sdk.keys import PrivateKey, PublicKey
from sdk.peer import uri_sans

NAME = "x509pop"
CHALLENGE_LIFETIME = timedelta(seconds=60)
NONCE_SIZE = 32
SIGNED_CONTEXT = b"tessera x509pop challenge v1\x00"
"""What the agent signs is this prefix followed by the nonce's 32 bytes."""
DEFAULT_AGENT_PATH_TEMPLATE = "tessera/agent/x509pop/{fingerprint}"
MAX_CHAIN_LENGTH = 16
MAX_CERTIFICATE_SIZE = 49152

_MAC_CONTEXT = b"tessera x509pop mac v1\x00"
_MAC_SIZE = 32
_SERVER_KEY_ID_SIZE = 8
_MAX_SIGNATURE_SIZE = 2048
_EC_HASHES: dict[str, type[hashes.SHA256 | hashes.SHA384]] = {
    "secp256r1": hashes.SHA256,
    "secp384r1": hashes.SHA384,
}
_RSA_MINIMUM_BITS = 2048
_RSA_PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
_SUPPORTED_KEYS = "ECDSA P-256, ECDSA P-384 or RSA of 2048 bits or more"

_MALFORMED_PAYLOAD = (
    'x509pop payload is malformed: send {"certificates": [leaf, intermediates...]}, '
    "each a base64 DER certificate"
)
_MALFORMED_RESPONSE = (
    'x509pop challenge response is malformed: send {"challenge": <the challenge, unchanged>, '
    '"signature": <base64>}; start attestation again'
)
_FOREIGN_CHALLENGE = (
    "the x509pop challenge was issued by another server process (another server behind "
    "the same address, or this one before a restart); start attestation again"
)
_ALTERED_CHALLENGE = (
    "the x509pop challenge was altered or was issued for another certificate; "
    "start attestation again"
)
_ANSWERED_CHALLENGE = "the x509pop challenge was answered already; start attestation again"
_BAD_SIGNATURE = (
    "the x509pop challenge signature does not verify with the node certificate's public key; "
    "sign with the private key of the certificate sent in the payload"
)
_UNTRUSTED_CHAIN = (
    "node certificate does not chain to a CA this server trusts for x509pop; send the node "
    "certificate followed by its intermediates, issued under a CA in the server's ca_bundle_path"
)


def fingerprint(certificate: x509.Certificate) -> str:
    """The SHA-1 of the certificate's DER in lower-case hex, as agent IDs and selectors use it."""
    der = certificate.public_bytes(serialization.Encoding.DER)
    return hashlib.sha1(der, usedforsecurity=False).hexdigest()


def unsupported_key_reason(key: object) -> str | None:
    """Why x509pop cannot sign or verify with ``key``, or None when it can."""
    if isinstance(key, ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey):
        if key.curve.name in _EC_HASHES:
            return None
        return f"EC curve {key.curve.name} is not supported"
    if isinstance(key, rsa.RSAPublicKey | rsa.RSAPrivateKey):
        if key.key_size >= _RSA_MINIMUM_BITS:
            return None
        return f"an RSA key of {key.key_size} bits is too short"
    return f"{type(key).__name__} keys are not supported"


def sign_challenge(key: PrivateKey, nonce: bytes) -> bytes:
    """The agent's signature over ``SIGNED_CONTEXT + nonce``."""
    message = SIGNED_CONTEXT + nonce
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key.sign(message, ec.ECDSA(_EC_HASHES[key.curve.name]()))
    return key.sign(message, _RSA_PSS, hashes.SHA256())


def challenge_signature_is_valid(key: PublicKey, nonce: bytes, signature: bytes) -> bool:
    """Whether ``signature`` is the holder of ``key``'s answer to ``nonce``."""
    message = SIGNED_CONTEXT + nonce
    try:
        if isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(signature, message, ec.ECDSA(_EC_HASHES[key.curve.name]()))
        else:
            key.verify(signature, message, _RSA_PSS, hashes.SHA256())
    except InvalidSignature:
        return False
    return True


def node_selectors(leaf: x509.Certificate, ca: x509.Certificate) -> tuple[Selector, ...]:
    """The node's selectors: subject CN, the trusted CA's fingerprint, DNS and URI SANs, serial.

    A value too long for any registration entry to name is left out.
    """
    values = [
        f"subject:cn:{attribute.value}"
        for attribute in leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        if isinstance(attribute.value, str) and attribute.value
    ]
    values.append(f"ca:fingerprint:{fingerprint(ca)}")
    try:
        names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        pass
    else:
        values += [f"san:dns:{name}" for name in names.get_values_for_type(x509.DNSName) if name]
    values += [f"san:uri:{uri}" for uri in uri_sans(leaf) if uri]
    values.append(f"serialnumber:{leaf.serial_number:x}")
    limit = MAX_SELECTOR_LENGTH - len(NAME) - 1
    unique = dict.fromkeys(value for value in values if len(value) <= limit)
    return tuple(Selector(NAME, value) for value in unique)


def load_ca_bundle(path: Path) -> list[x509.Certificate]:
    """The CA certificates in the PEM file ``path``; ConfigError saying what is wrong with it."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ConfigError(
            f"node attestor x509pop cannot read ca_bundle_path {path}: {err.strerror}; "
            "point it at the PEM file of the CAs that sign node certificates"
        ) from err
    if b"-----BEGIN CERTIFICATE-----" not in data:
        raise ConfigError(
            f"ca_bundle_path {path} holds no PEM certificate; put the PEM certificates of "
            "the CAs that sign node certificates in it"
        )
    try:
        certificates = x509.load_pem_x509_certificates(data)
    except ValueError as err:
        raise ConfigError(
            f"ca_bundle_path {path} is not a valid PEM certificate file: {err}"
        ) from err
    for index, certificate in enumerate(certificates, start=1):
        problem = _ca_problem(certificate)
        if problem:
            raise ConfigError(
                f"certificate {index} in ca_bundle_path {path} "
                f"({certificate.subject.rfc4514_string()}) {problem}; "
                "list only the CAs that sign node certificates"
            )
    return certificates


def _ca_problem(certificate: x509.Certificate) -> str | None:
    try:
        extensions = certificate.extensions
    except ValueError as err:
        return f"has malformed extensions ({err})"
    try:
        if not extensions.get_extension_for_class(x509.BasicConstraints).value.ca:
            return "is not a CA certificate (basicConstraints cA is false)"
    except x509.ExtensionNotFound:
        return "has no basicConstraints extension, which a CA certificate needs"
    try:
        if not extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign:
            return "has a keyUsage without keyCertSign, so it may not sign certificates"
    except x509.ExtensionNotFound:
        return "has no keyUsage extension, which a CA certificate needs"
    return None


def _reject_ca_leaf(
    policy: Policy, certificate: x509.Certificate, constraints: x509.BasicConstraints | None
) -> None:
    if constraints is not None and constraints.ca:
        raise ValueError("the node certificate is a CA certificate")


def _require_digital_signature(
    policy: Policy, certificate: x509.Certificate, usage: x509.KeyUsage | None
) -> None:
    if usage is not None and not usage.digital_signature:
        raise ValueError("the node certificate's key usage lacks digitalSignature")


# Node certificates need no SAN and no particular extended key usage: what they
# prove is answered by the challenge, not by a TLS handshake. Their issuers get
# the library's web PKI checks for CA certificates.
_LEAF_POLICY = (
    ExtensionPolicy.permit_all()
    .may_be_present(x509.BasicConstraints, Criticality.AGNOSTIC, _reject_ca_leaf)
    .may_be_present(x509.KeyUsage, Criticality.AGNOSTIC, _require_digital_signature)
)


def _utc(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _decode_b64(value: object, max_size: int) -> bytes | None:
    if not isinstance(value, str) or len(value) > (max_size + 2) // 3 * 4:
        return None
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return None


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _parse_chain(payload: Mapping[str, Any]) -> list[x509.Certificate]:
    encoded = payload.get("certificates") if isinstance(payload, Mapping) else None
    if not isinstance(encoded, list) or not encoded:
        raise NodeAttestationError(_MALFORMED_PAYLOAD)
    if len(encoded) > MAX_CHAIN_LENGTH:
        raise NodeAttestationError(
            f"x509pop payload carries {len(encoded)} certificates; at most {MAX_CHAIN_LENGTH} "
            "are accepted (the node certificate and its intermediates)"
        )
    chain = []
    for index, text in enumerate(encoded):
        der = _decode_b64(text, MAX_CERTIFICATE_SIZE)
        certificate = _load_der_certificate(der) if der else None
        if certificate is None:
            raise NodeAttestationError(
                f"certificate {index} of the x509pop payload is not a base64 DER certificate "
                f"of at most {MAX_CERTIFICATE_SIZE} bytes"
            )
        chain.append(certificate)
    return chain


def _load_der_certificate(der: bytes) -> x509.Certificate | None:
    try:
        return x509.load_der_x509_certificate(der)
    except ValueError:
        return None


@dataclass(frozen=True)
class _VerifiedNode:
    leaf: x509.Certificate
    ca: x509.Certificate
    public_key: PublicKey
    fingerprint: str


@dataclass(frozen=True)
class _ChallengeAnswer:
    nonce: bytes
    expires_at: int
    server_key_id: bytes
    mac: bytes
    signature: bytes


def _parse_answer(response: Mapping[str, Any]) -> _ChallengeAnswer:
    challenge = response.get("challenge") if isinstance(response, Mapping) else None
    if not isinstance(challenge, Mapping):
        raise NodeAttestationError(_MALFORMED_RESPONSE)
    nonce = _decode_b64(challenge.get("nonce"), NONCE_SIZE)
    mac = _decode_b64(challenge.get("mac"), _MAC_SIZE)
    signature = _decode_b64(response.get("signature"), _MAX_SIGNATURE_SIZE)
    server_key_id = _decode_b64(challenge.get("server_key_id"), _SERVER_KEY_ID_SIZE)
    expires_at = challenge.get("expires_at")
    if (
        nonce is None
        or len(nonce) != NONCE_SIZE
        or mac is None
        or len(mac) != _MAC_SIZE
        or server_key_id is None
        or len(server_key_id) != _SERVER_KEY_ID_SIZE
        or not signature
        or not isinstance(expires_at, int)
        or isinstance(expires_at, bool)
        or not 0 <= expires_at < 2**63
    ):
        raise NodeAttestationError(_MALFORMED_RESPONSE)
    return _ChallengeAnswer(nonce, expires_at, server_key_id, mac, signature)


class X509PopSettings(Settings):
    """``[node_attestors.x509pop]``, the server half's settings."""

    ca_bundle_path: FilePath = Field(
        description="the PEM file of the CAs that sign node certificates"
    )
    agent_path_template: str = DEFAULT_AGENT_PATH_TEMPLATE

    @field_validator("agent_path_template")
    @classmethod
    def _only_the_default_template(cls, value: str) -> str:
        if value != DEFAULT_AGENT_PATH_TEMPLATE:
            raise ValueError(
                f'only the default, "{DEFAULT_AGENT_PATH_TEMPLATE}", is supported; '
                "remove the setting"
            )
        return value


class X509PopAgentSettings(Settings):
    """The agent half's settings, from ``--x509pop-cert`` and ``--x509pop-key``."""

    cert_path: FilePath
    key_path: FilePath


class X509PopServer:
    """The server half: checks the chain, issues the challenge, checks the answer."""

    name = NAME

    def __init__(self, context: ServerContext, trusted_cas: Sequence[x509.Certificate]) -> None:
        if not trusted_cas:
            raise ConfigError("node attestor x509pop needs at least one trusted CA certificate")
        self._context = context
        self._store = Store(list(trusted_cas))
        self._mac_key = secrets.token_bytes(32)
        self._server_key_id = secrets.token_bytes(_SERVER_KEY_ID_SIZE)
        self._answered: dict[bytes, int] = {}
        self._answered_lock = threading.Lock()

    def attest(
        self, payload: Mapping[str, Any], challenge_response: Mapping[str, Any] | None
    ) -> AttestationResult | Challenge:
        node = self._verify_chain(payload)
        if challenge_response is None:
            return self._challenge_for(node)
        self._check_answer(node, challenge_response)
        return AttestationResult(
            agent_id=agent_id(self._context.trust_domain, NAME, node.fingerprint),
            selectors=node_selectors(node.leaf, node.ca),
            can_reattest=True,
        )

    # -- step 1: the chain ------------------------------------------------------------

    def _verify_chain(self, payload: Mapping[str, Any]) -> _VerifiedNode:
        leaf, *intermediates = _parse_chain(payload)
        now = self._context.clock.now()
        try:
            public_key = self._check_leaf(leaf, now)
            verified = self._verifier(now).verify(leaf, intermediates)
        except VerificationError:
            raise NodeAttestationError(_UNTRUSTED_CHAIN) from None
        except (ValueError, UnsupportedAlgorithm):
            raise NodeAttestationError(
                "node certificate could not be parsed; send a well-formed X.509 certificate"
            ) from None
        return _VerifiedNode(leaf, verified.chain[-1], public_key, fingerprint(leaf))

    @staticmethod
    def _check_leaf(leaf: x509.Certificate, now: datetime) -> PublicKey:
        """Say precisely what is wrong with the leaf before the chain is built."""
        if now < leaf.not_valid_before_utc:
            raise NodeAttestationError(
                f"node certificate is not valid before {_utc(leaf.not_valid_before_utc)}; "
                "check the clocks of the node's CA and of the server"
            )
        if now > leaf.not_valid_after_utc:
            raise NodeAttestationError(
                f"node certificate expired at {_utc(leaf.not_valid_after_utc)}; "
                "give the node a new certificate from its CA"
            )
        extensions = leaf.extensions
        try:
            if extensions.get_extension_for_class(x509.BasicConstraints).value.ca:
                raise NodeAttestationError(
                    "node certificate is a CA certificate; x509pop needs an end-entity "
                    "certificate issued to the node"
                )
        except x509.ExtensionNotFound:
            pass
        try:
            if not extensions.get_extension_for_class(x509.KeyUsage).value.digital_signature:
                raise NodeAttestationError(
                    "node certificate's keyUsage lacks digitalSignature, so its key may not "
                    "answer the challenge; issue the node a certificate with digitalSignature"
                )
        except x509.ExtensionNotFound:
            pass
        public_key = leaf.public_key()
        problem = unsupported_key_reason(public_key)
        if problem or not isinstance(public_key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
            raise NodeAttestationError(
                f"node certificate key is not usable: {problem}; x509pop needs {_SUPPORTED_KEYS}"
            )
        return public_key

    def _verifier(self, now: datetime) -> ClientVerifier:
        return (
            PolicyBuilder()
            .store(self._store)
            .time(now)
            .extension_policies(
                ca_policy=ExtensionPolicy.webpki_defaults_ca(), ee_policy=_LEAF_POLICY
            )
            .build_client_verifier()
        )

    # -- step 2: the challenge --------------------------------------------------------

    def _mac(self, server_key_id: bytes, nonce: bytes, expires_at: int, node_fp: str) -> bytes:
        message = b"".join(
            (
                _MAC_CONTEXT,
                server_key_id,
                nonce,
                expires_at.to_bytes(8, "big"),
                bytes.fromhex(node_fp),
            )
        )
        return hmac.new(self._mac_key, message, hashlib.sha256).digest()

    def _challenge_for(self, node: _VerifiedNode) -> Challenge:
        nonce = secrets.token_bytes(NONCE_SIZE)
        expires_at = int((self._context.clock.now() + CHALLENGE_LIFETIME).timestamp())
        mac = self._mac(self._server_key_id, nonce, expires_at, node.fingerprint)
        return Challenge(
            {
                "nonce": _b64(nonce),
                "expires_at": expires_at,
                "server_key_id": _b64(self._server_key_id),
                "mac": _b64(mac),
            }
        )

    def _check_answer(self, node: _VerifiedNode, response: Mapping[str, Any]) -> None:
        answer = _parse_answer(response)
        if not hmac.compare_digest(answer.server_key_id, self._server_key_id):
            raise NodeAttestationError(_FOREIGN_CHALLENGE)
        expected = self._mac(
            answer.server_key_id, answer.nonce, answer.expires_at, node.fingerprint
        )
        if not hmac.compare_digest(answer.mac, expected):
            raise NodeAttestationError(_ALTERED_CHALLENGE)
        now = self._context.clock.now().timestamp()
        if now > answer.expires_at:
            lifetime = int(CHALLENGE_LIFETIME.total_seconds())
            raise NodeAttestationError(
                f"the x509pop challenge expired; answer within {lifetime} seconds: "
                "start attestation again"
            )
        if not challenge_signature_is_valid(node.public_key, answer.nonce, answer.signature):
            raise NodeAttestationError(_BAD_SIGNATURE)
        self._remember_answered(answer.nonce, answer.expires_at, now)

    def _remember_answered(self, nonce: bytes, expires_at: int, now: float) -> None:
        with self._answered_lock:
            for seen, seen_expiry in list(self._answered.items()):
                if seen_expiry < now:
                    del self._answered[seen]
            if nonce in self._answered:
                raise NodeAttestationError(_ANSWERED_CHALLENGE)
            self._answered[nonce] = expires_at


class X509PopAgent:
    """The agent half: sends the node's chain and signs the server's nonce with its key."""

    name = NAME

    def __init__(self, cert_path: Path, key_path: Path) -> None:
        self._chain = _read_chain(cert_path)
        self._key = _read_key(key_path)
        try:
            matches = self._key.public_key() == self._chain[0].public_key()
        except (ValueError, UnsupportedAlgorithm):
            matches = False
        if not matches:
            raise ConfigError(
                f"the key in {key_path} does not belong to the certificate in {cert_path}; "
                "pass the node certificate's own key with --x509pop-key"
            )

    @property
    def fingerprint(self) -> str:
        """The leaf's fingerprint, the last segment of this agent's SPIFFE ID."""
        return fingerprint(self._chain[0])

    def payload(self) -> dict[str, Any]:
        return {
            "certificates": [
                _b64(cert.public_bytes(serialization.Encoding.DER)) for cert in self._chain
            ]
        }

    def answer(self, challenge: Mapping[str, Any]) -> dict[str, Any]:
        nonce = _decode_b64(
            challenge.get("nonce") if isinstance(challenge, Mapping) else None, NONCE_SIZE
        )
        if nonce is None or len(nonce) != NONCE_SIZE:
            raise NodeAttestationError(
                "the server's x509pop challenge carries no valid nonce; "
                "check that --server names a Tessera server"
            )
        return {"challenge": dict(challenge), "signature": _b64(sign_challenge(self._key, nonce))}


def _read_chain(path: Path) -> list[x509.Certificate]:
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ConfigError(
            f"cannot read the x509pop certificate {path}: {err.strerror}; "
            "pass the node certificate with --x509pop-cert"
        ) from err
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError:
        raise ConfigError(
            f"{path} holds no PEM certificate; --x509pop-cert needs the node certificate, "
            "then its intermediates, in PEM"
        ) from None


def _read_key(path: Path) -> PrivateKey:
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ConfigError(
            f"cannot read the x509pop key {path}: {err.strerror}; "
            "pass the node certificate's key with --x509pop-key"
        ) from err
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (TypeError, ValueError, UnsupportedAlgorithm):
        raise ConfigError(
            f"{path} is not an unencrypted PEM private key; --x509pop-key needs the node "
            "certificate's key (decrypt it first, e.g. with 'openssl pkey')"
        ) from None
    problem = unsupported_key_reason(key)
    if problem or not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise ConfigError(f"the x509pop key {path} is not usable: {problem}; use {_SUPPORTED_KEYS}")
    return key


def _build_server(settings: X509PopSettings, context: ServerContext) -> X509PopServer:
    return X509PopServer(context, load_ca_bundle(settings.ca_bundle_path))


def _build_agent(settings: X509PopAgentSettings, context: None) -> X509PopAgent:
    return X509PopAgent(settings.cert_path, settings.key_path)


SERVER_PLUGIN = Plugin(NAME, X509PopSettings, _build_server)
AGENT_PLUGIN = Plugin(NAME, X509PopAgentSettings, _build_agent)
