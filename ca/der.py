"""Concatenated DER certificates, as the Workload API and the CA journal carry them."""

from __future__ import annotations

from cryptography import x509

from ca.errors import InvalidArgument


def split_certificates(blob: bytes) -> list[x509.Certificate]:
    """Parse ``cert || cert || ...`` (each a DER SEQUENCE) into certificates."""
    certificates = []
    position = 0
    while position < len(blob):
        end = position + _element_length(blob, position)
        try:
            certificates.append(x509.load_der_x509_certificate(blob[position:end]))
        except ValueError:
            raise InvalidArgument(
                "certificate data holds an element that is not a certificate"
            ) from None
        position = end
    return certificates


def _element_length(blob: bytes, position: int) -> int:
    """Total length (header included) of the DER element starting at ``position``."""
    if len(blob) - position < 2 or blob[position] != 0x30:
        raise InvalidArgument("certificate data is not a sequence of DER certificates")
    first = blob[position + 1]
    if first < 0x80:
        return 2 + first
    octets = first & 0x7F
    if octets == 0 or octets > 4 or len(blob) - position < 2 + octets:
        raise InvalidArgument("certificate data has a malformed DER length")
    length = int.from_bytes(blob[position + 2 : position + 2 + octets], "big")
    if position + 2 + octets + length > len(blob):
        raise InvalidArgument("certificate data is truncated")
    return 2 + octets + length
