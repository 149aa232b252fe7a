"""Node attestation from the agent's side: getting, and keeping, the agent's own SVID.

Every node attestor has an agent half, which plugs in here through
:class:`~attestor.node.NodeAttestorAgent`: ``payload()`` is the evidence sent
first, and ``answer(challenge)`` answers a challenge if the server half sends
one (x509pop proves possession of the node's key this way). The agent's flags
name the half, which :data:`~attestor.node.NODE_ATTESTORS_AGENT` builds::

    attestor = load_node_attestor_agent(config)          # join_token or x509pop
    identity, bundle = await attest(client, attestor, trust_domain)
    ...
    if clock.now() >= identity.renew_at:
        identity = await renew(client, identity)

The server answers with the agent's SVID, the trust bundle (which the agent
pins from then on) and whether the agent may attest again by itself: an
x509pop agent can, a join-token agent cannot (its token worked once).
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from attestor.node import NODE_ATTESTORS_AGENT, NodeAttestorAgent
from sdk.bundle import TrustBundle
from sdk.csr import build_csr
from sdk.der import split_certificates
from sdk.errors import InvalidArgument, Unavailable
from sdk.keys import KeyType, PrivateKey, generate_private_key
from sdk.spiffeid import TrustDomain
from workload_api.config import AgentConfig
from workload_api.node_client import NodeClient
from workload_api.storage import AgentIdentity, svid_spiffe_id

__all__ = [
    "NodeAttestorAgent",
    "attest",
    "join_token_of",
    "load_node_attestor_agent",
    "renew",
]


def load_node_attestor_agent(config: AgentConfig) -> NodeAttestorAgent | None:
    """The attestor the flags name, or None when none is configured."""
    plugin = config.node_attestor_plugin
    return NODE_ATTESTORS_AGENT.load(plugin, None) if plugin is not None else None


def join_token_of(identity: AgentIdentity) -> str | None:
    """The join token a join-token agent's ID was made from."""
    prefix = "/tessera/agent/join_token/"
    path = identity.spiffe_id.path
    return path[len(prefix):] if path.startswith(prefix) else None


async def attest(
    client: NodeClient, attestor: NodeAttestorAgent, trust_domain: TrustDomain
) -> tuple[AgentIdentity, TrustBundle]:
    """Attest with ``attestor``; the agent's new identity and the bundle to pin."""
    key = generate_private_key(KeyType.EC_P256)
    answer = await client.attest(
        attestor.name, attestor.payload(), _anonymous_csr(key), answer=attestor.answer
    )
    try:
        svid = answer["svid"]
        chain = _chain(svid["cert_chain"])
        bundle = TrustBundle.from_spiffe_json(trust_domain, json.dumps(answer["bundle"]).encode())
        reattestable = bool(answer.get("reattestable", False))
    except (KeyError, TypeError) as err:
        raise Unavailable(f"the server sent a malformed attestation answer: {err}") from err
    identity = _identity(chain, key, attestor.name, reattestable, trust_domain)
    if str(identity.spiffe_id) != str(answer.get("spiffe_id", identity.spiffe_id)):
        raise Unavailable("the server's attestation answer names two different agent IDs")
    if not bundle.x509_authorities:
        raise Unavailable("the server sent a trust bundle without X.509 authorities")
    return identity, bundle


async def renew(client: NodeClient, identity: AgentIdentity) -> AgentIdentity:
    """A new SVID for the same agent ID, with a new key."""
    key = generate_private_key(KeyType.EC_P256)
    chain_der, _ = await client.renew(build_csr(key, identity.spiffe_id))
    try:
        chain = tuple(x509.load_der_x509_certificate(der) for der in chain_der)
    except ValueError as err:
        raise Unavailable("the server sent a renewed SVID that is not DER certificates") from err
    renewed = _identity(
        chain, key, identity.attestation_type, identity.reattestable,
        identity.spiffe_id.trust_domain,
    )
    if renewed.spiffe_id != identity.spiffe_id:
        raise Unavailable(
            f"the server renewed the agent SVID for {renewed.spiffe_id} instead of "
            f"{identity.spiffe_id}"
        )
    return renewed


def _anonymous_csr(key: PrivateKey) -> bytes:
    """A CSR without a SPIFFE ID: the server decides the agent's ID from the evidence."""
    csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).sign(
        key, hashes.SHA256()
    )
    return csr.public_bytes(serialization.Encoding.DER)


def _chain(encoded: Any) -> tuple[x509.Certificate, ...]:
    if not isinstance(encoded, list) or not encoded:
        raise Unavailable("the server sent an agent SVID without certificates")
    try:
        return tuple(
            certificate
            for item in encoded
            for certificate in split_certificates(base64.b64decode(item, validate=True))
        )
    except (binascii.Error, ValueError, InvalidArgument) as err:
        raise Unavailable("the server sent an agent SVID that is not DER certificates") from err


def _identity(
    chain: tuple[x509.Certificate, ...],
    key: PrivateKey,
    attestation_type: str,
    reattestable: bool,
    trust_domain: TrustDomain,
) -> AgentIdentity:
    if not chain or chain[0].public_key() != key.public_key():
        raise Unavailable("the server sent an agent SVID for another key than the agent's")
    try:
        spiffe_id = svid_spiffe_id(chain[0])
    except InvalidArgument as err:
        raise Unavailable(
            f"the server sent an agent SVID that is not valid: {err.message}"
        ) from err
    if spiffe_id.trust_domain != trust_domain:
        raise Unavailable(
            f"the server issued an agent SVID in trust domain {spiffe_id.trust_domain.name}, "
            f"not {trust_domain.name}; check --trust-domain and --server"
        )
    return AgentIdentity(
        spiffe_id=spiffe_id,
        chain=chain,
        private_key=key,
        attestation_type=attestation_type,
        reattestable=reattestable,
    )
