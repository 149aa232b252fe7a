"""Building a certificate signing request: the agent keeps each workload key and sends
only a PKCS#10 request::

    der = build_csr(private_key, SpiffeId("spiffe://example.org/web"), ["web.example.org"])

The server's checks of a request stay with the server (:mod:`ca.csr`).

Tessera-internal: used by the server, the agent and the sidecar, not part of the SDK's
public API (it is not in ``sdk.__all__``) and may change without notice.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from sdk.keys import PrivateKey

if TYPE_CHECKING:
    from spiffe import SpiffeId

__all__ = ["build_csr"]


def build_csr(private_key: PrivateKey, spiffe_id: SpiffeId, dns_names: Sequence[str] = ()) -> bytes:
    """A DER PKCS#10 request for ``spiffe_id`` (and ``dns_names``) signed by ``private_key``."""
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(str(spiffe_id))]
    names.extend(x509.DNSName(name) for name in dns_names)
    builder = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
    )
    csr = builder.sign(private_key, _digest_for(private_key))
    return csr.public_bytes(serialization.Encoding.DER)


def _digest_for(private_key: PrivateKey) -> hashes.SHA256 | hashes.SHA384:
    if isinstance(private_key, ec.EllipticCurvePrivateKey) and private_key.curve.key_size >= 384:
        return hashes.SHA384()
    return hashes.SHA256()
