"""The server's authorities and a fake node API for the agent's unit tests.

Certificates come from the test CA (``tests/support/pki.py``), made in code for each run:
nothing checked in expires.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from spiffe import SpiffeId, TrustDomain

from attestor.node.x509pop import fingerprint
from ca.csr import parse_csr
from ca.jwtsvid import mint_jwt_svid
from ca.keymanager import LocalSigner
from sdk.bundle import TrustBundle
from sdk.errors import PermissionDenied, Unavailable
from sdk.keys import KeyType, PrivateKey, generate_private_key
from tests.support.pki import TestCA
from workload_api.cache import AuthorizedEntry
from workload_api.node_client import AgentBanned, EntriesUpdate, IssuedSvid, MeshUpdate

JWT_KID = "test-jwt-key"
TOKEN = "0123456789abcdef0123"


class AuthorityForTests:
    """The X.509 authority (the test CA) and a JWT authority of one trust domain."""

    def __init__(self, trust_domain: str, now: datetime) -> None:
        self.trust_domain = TrustDomain(trust_domain)
        self.ca = TestCA(trust_domain, not_before=now - timedelta(days=1), ttl=timedelta(days=31))
        self.certificate = self.ca.certificate
        self.jwt_key = generate_private_key(KeyType.EC_P256)
        self.jwt_signer = LocalSigner(JWT_KID, self.jwt_key)

    @property
    def bundle(self) -> TrustBundle:
        return TrustBundle(
            self.trust_domain,
            (self.certificate,),
            {JWT_KID: self.jwt_key.public_key()},
            sequence=1,
        )

    def svid(
        self, spiffe_id: str, public_key: Any, now: datetime, ttl: timedelta = timedelta(hours=1)
    ) -> x509.Certificate:
        """An X509-SVID for ``public_key`` (a CSR's), valid from ``now`` for ``ttl``."""
        return self.ca.sign_x509_svid(spiffe_id, public_key, not_before=now, ttl=ttl)

    def jwt(
        self, spiffe_id: str, audience: Sequence[str], now: datetime,
        ttl: timedelta = timedelta(minutes=5),
    ) -> str:
        return mint_jwt_svid(
            spiffe_id=SpiffeId(spiffe_id), audience=list(audience), signer=self.jwt_signer,
            kid=JWT_KID, now=now, ttl=ttl,
        )


def entry(
    entry_id: str,
    spiffe_id: str,
    *selectors: str,
    created_at: int = 0,
    federates_with: Sequence[str] = (),
    hint: str = "",
    expires_at: int | None = None,
    x509_svid_ttl: int = 0,
) -> AuthorizedEntry:
    return AuthorizedEntry.from_json({
        "id": entry_id,
        "spiffe_id": spiffe_id,
        "parent_id": "spiffe://example.org/node/a",
        "selectors": [
            {"type": s.partition(":")[0], "value": s.partition(":")[2]} for s in selectors
        ],
        "federates_with": list(federates_with),
        "hint": hint,
        "expires_at": expires_at,
        "created_at": created_at,
        "x509_svid_ttl": x509_svid_ttl,
    })


def entry_json(e: AuthorizedEntry) -> dict[str, Any]:
    return {
        "id": e.id,
        "spiffe_id": e.spiffe_id,
        "parent_id": e.parent_id,
        "selectors": [{"type": s.type, "value": s.value} for s in sorted(e.selectors)],
        "dns_names": list(e.dns_names),
        "federates_with": list(e.federates_with),
        "hint": e.hint,
        "x509_svid_ttl": e.x509_svid_ttl,
        "jwt_svid_ttl": e.jwt_svid_ttl,
        "expires_at": e.expires_at,
        "revision_number": e.revision,
        "created_at": e.created_at,
    }


@dataclass
class FakeNodeApi:
    """Stands in for NodeClient: answers from memory, signs with the test authority."""

    authority: AuthorityForTests
    clock: Any
    registered: dict[str, AuthorizedEntry] = field(default_factory=dict)
    revision: int = 1
    unavailable: bool = False
    refuse_entries: set[str] = field(default_factory=set)
    calls: list[str] = field(default_factory=list)
    jwt_ttl: timedelta = timedelta(minutes=5)
    federated: Mapping[str, TrustBundle] = field(default_factory=dict)
    evicted: bool = False
    banned: bool = False
    used_tokens: set[str] = field(default_factory=set)
    bundle_sequence: int | None = None
    tainted: frozenset[str] = frozenset()
    mesh: MeshUpdate | None = None  # what the server has: None, a server without a mesh
    mesh_asked: list[tuple[str, int | None]] = field(default_factory=list)

    def _call(self, name: str) -> None:
        self.calls.append(name)
        if self.unavailable:
            raise Unavailable("no Tessera server answered: 127.0.0.1:1: connection refused")

    def configure(self, *, anchors: Any, identity: Any) -> None:
        self.calls.append("configure")

    async def aclose(self) -> None:
        pass

    async def attest(
        self, attestation_type: str, payload: Mapping[str, Any], csr_der: bytes, *, answer: Any
    ) -> dict[str, Any]:
        self._call("attest")
        self.evicted = False
        if attestation_type == "x509pop":
            # The fake asks for the signed nonce but leaves checking it to the real server half.
            node = x509.load_der_x509_certificate(base64.b64decode(payload["certificates"][0]))
            response = answer({"nonce": base64.b64encode(bytes(32)).decode()})
            assert response["signature"], response
            agent_id = f"spiffe://example.org/tessera/agent/x509pop/{fingerprint(node)}"
        else:
            token = str(payload["token"])
            if token in self.used_tokens:
                raise PermissionDenied("join token was refused: it was used already")
            self.used_tokens.add(token)
            agent_id = f"spiffe://example.org/tessera/agent/join_token/{token}"
        leaf = self.authority.svid(agent_id, parse_csr(csr_der).public_key(), self.clock.now())
        return {
            "spiffe_id": agent_id,
            "svid": {
                "spiffe_id": agent_id,
                "cert_chain": [base64.b64encode(leaf.public_bytes(serialization.Encoding.DER))
                               .decode()],
                "expires_at": int(leaf.not_valid_after_utc.timestamp()),
            },
            "bundle": json.loads(self.authority.bundle.to_spiffe_json()),
            "reattestable": attestation_type == "x509pop",
        }

    async def entries(
        self,
        since: int,
        wait: float,
        *,
        bundle_sequence: int | None = None,
        mesh_revision: int | None = None,
    ) -> EntriesUpdate:
        self._call("entries")
        self.mesh_asked.append(("entries", mesh_revision))
        if self.banned:
            raise AgentBanned(
                f"agent spiffe://example.org/tessera/agent/join_token/{TOKEN} is banned"
            )
        if self.evicted:
            raise PermissionDenied(
                "spiffe://example.org/tessera/agent/join_token/x is not an attested agent; "
                "it must attest again"
            )
        return EntriesUpdate(
            revision=self.revision,
            entries=tuple(entry_json(e) for e in self.registered.values()),
            entry_ids=frozenset(self.registered),
            bundle_sequence=self.bundle_sequence,
            tainted_authorities=self.tainted,
            mesh_revision=self.mesh.revision if self.mesh is not None else None,
        )

    async def mesh_changes(self, since: int) -> MeshUpdate:
        self._call("mesh")
        self.mesh_asked.append(("mesh", since))
        assert self.mesh is not None
        return self.mesh

    async def bundles(self) -> dict[str, Any]:
        self._call("bundles")
        return {
            "bundle": json.loads(self.authority.bundle.to_spiffe_json()),
            "federated": {td: json.loads(b.to_spiffe_json()) for td, b in self.federated.items()},
        }

    async def sign_x509(self, requests: Sequence[tuple[str, bytes]]) -> list[IssuedSvid]:
        self._call("sign_x509")
        issued = []
        for entry_id, csr_der in requests:
            if entry_id in self.refuse_entries:
                raise PermissionDenied(f"entry {entry_id} is not authorized for agent x")
            found = self.registered[entry_id]
            ttl = timedelta(seconds=found.x509_svid_ttl or 3600)
            leaf = self.authority.svid(
                found.spiffe_id, parse_csr(csr_der).public_key(), self.clock.now(), ttl
            )
            issued.append(IssuedSvid(
                entry_id=entry_id,
                spiffe_id=found.spiffe_id,
                chain_der=(leaf.public_bytes(serialization.Encoding.DER),),
                expires_at=leaf.not_valid_after_utc,
            ))
        return issued

    async def sign_jwt(self, entry_id: str, audience: Sequence[str]) -> tuple[str, str, datetime]:
        self._call("sign_jwt")
        found = self.registered[entry_id]
        now = self.clock.now()
        token = self.authority.jwt(found.spiffe_id, audience, now, self.jwt_ttl)
        return found.spiffe_id, token, now + self.jwt_ttl

    async def renew(self, csr_der: bytes) -> tuple[tuple[bytes, ...], datetime]:
        self._call("renew")
        csr = parse_csr(csr_der)
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        agent_id = san.get_values_for_type(x509.UniformResourceIdentifier)[0]
        leaf = self.authority.svid(agent_id, csr.public_key(), self.clock.now())
        return (leaf.public_bytes(serialization.Encoding.DER),), leaf.not_valid_after_utc


def agent_identity_files(
    authority: AuthorityForTests, now: datetime, token: str = "0123456789abcdef0123"
) -> tuple[x509.Certificate, PrivateKey]:
    spiffe_id = f"spiffe://{authority.trust_domain.name}/tessera/agent/join_token/{token}"
    svid = authority.ca.issue_x509_svid(spiffe_id, not_before=now)
    return svid.leaf, svid.private_key
