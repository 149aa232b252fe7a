"""Trust bundles, authorities and SVIDs of other trust domains, made in code for the
federation tests (no checked-in certificates)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from functools import cache

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from spiffe import SpiffeId, TrustDomain

from ca.datastore.records import FederationRelationship
from ca.federation.client import BundleFetchError
from ca.keymanager import LocalSigner
from ca.x509ca import build_ca_certificate, build_x509_svid
from sdk.bundle import TrustBundle
from sdk.keys import KeyType, PrivateKey
from tests.support.pki import TestCA
from tests.unit.ca.conftest import pooled_key

NOW = datetime.now(UTC).replace(microsecond=0)


@cache
def authority(trust_domain: str, slot: int = 0) -> tuple[x509.Certificate, LocalSigner]:
    """A self-signed CA of ``trust_domain`` (its certificate carries spiffe://<td>);
    the same one for the same arguments."""
    signer = LocalSigner(f"{trust_domain}-{slot}", pooled_key(KeyType.EC_P256, 10 + slot))
    certificate = build_ca_certificate(
        trust_domain=TrustDomain(trust_domain),
        public_key=signer.public_key(),
        signer=signer,
        issuer=None,
        not_before=NOW - timedelta(hours=1),
        not_after=NOW + timedelta(days=1),
    )
    return certificate, signer


def bundle(
    trust_domain: str,
    *slots: int,
    sequence: int = 1,
    refresh_hint: int = 300,
    jwt_slots: tuple[int, ...] = (),
) -> TrustBundle:
    """A bundle of ``trust_domain`` holding the authorities of ``slots``."""
    return TrustBundle(
        trust_domain=TrustDomain(trust_domain),
        x509_authorities=tuple(authority(trust_domain, slot)[0] for slot in slots),
        jwt_authorities={
            f"kid-{slot}": pooled_key(KeyType.EC_P256, 20 + slot).public_key()
            for slot in jwt_slots
        },
        sequence=sequence,
        refresh_hint=refresh_hint,
    )


def svid(spiffe_id: str, slot: int = 0) -> tuple[x509.Certificate, PrivateKey]:
    """An X509-SVID for ``spiffe_id`` signed by authority ``slot`` of its trust domain."""
    parsed = SpiffeId(spiffe_id)
    ca_certificate, signer = authority(parsed.trust_domain.name, slot)
    key = pooled_key(KeyType.EC_P256, 30)
    leaf = build_x509_svid(
        spiffe_id=parsed,
        public_key=key.public_key(),
        ca_certificate=ca_certificate,
        signer=signer,
        now=NOW,
        ttl=timedelta(hours=1),
    )
    return leaf, key


def relationship(
    trust_domain: str = "partner.org",
    *,
    url: str = "https://partner.example:8443",
    profile: str = "https_spiffe",
    endpoint_spiffe_id: str | None = "spiffe://partner.org/tessera/server",
    updated_at: datetime = NOW,
) -> FederationRelationship:
    return FederationRelationship(
        trust_domain=trust_domain,
        bundle_endpoint_url=url,
        profile=profile,
        endpoint_spiffe_id=endpoint_spiffe_id,
        created_at=updated_at,
        updated_at=updated_at,
    )


def web_pki(host_ip: str = "127.0.0.1") -> tuple[x509.Certificate, x509.Certificate, PrivateKey]:
    """A private web CA and a server certificate it issued for ``host_ip``."""
    web_ca = TestCA.named("Test Web CA")
    server = web_ca.issue_certificate(subject=host_ip, ip_addresses=[host_ip],
                                      extended_key_usage=[ExtendedKeyUsageOID.SERVER_AUTH])
    return web_ca.certificate, server.certificate, server.key


def call(app: object, method: str, path: str, **kwargs: object) -> object:
    """One request to an ASGI app, in process."""
    import asyncio

    import httpx

    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)  # type: ignore[arg-type]
        async with httpx.AsyncClient(transport=transport, base_url="http://tessera") as client:
            return await client.request(method, path, **kwargs)  # type: ignore[arg-type]

    return asyncio.run(go())


class FakeEndpoint:
    """Serves whatever ``answer`` is: bytes, or a BundleFetchError to raise."""

    def __init__(self) -> None:
        self.answer: bytes | BundleFetchError = BundleFetchError("not set up")
        self.calls: list[tuple[str, TrustBundle | None]] = []
        self.during_fetch: list[object] = []

    async def __call__(
        self, relationship: FederationRelationship, stored: TrustBundle | None
    ) -> bytes:
        self.calls.append((relationship.trust_domain, stored))
        for action in self.during_fetch:
            action()  # type: ignore[operator]
        if isinstance(self.answer, BundleFetchError):
            raise self.answer
        return self.answer
