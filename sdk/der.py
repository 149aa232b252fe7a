"""DER as Tessera reads and writes it: concatenated certificates, and the few encodings
the X509-SVID fast path assembles by hand.

The Workload API and the CA journal carry chains as ``cert || cert || ...``::

    certificates = split_certificates(blob)

Issuance writes certificate fields directly (see :mod:`ca.x509ca`)::

    tbs = encode(SEQUENCE, encode_integer(serial) + encode_time(not_before) + ...)
    algorithm, public_key = sequence_elements(subject_public_key_info)

Tessera-internal: used by the server, the agent and the sidecar, not part of the SDK's
public API (it is not in ``sdk.__all__``) and may change without notice.
"""

from __future__ import annotations

from datetime import UTC, datetime

from cryptography import x509

from sdk.errors import InvalidArgument

__all__ = [
    "BIT_STRING",
    "GENERALIZED_TIME",
    "INTEGER",
    "OBJECT_IDENTIFIER",
    "OCTET_STRING",
    "SEQUENCE",
    "SET",
    "UTC_TIME",
    "UTF8_STRING",
    "content_of",
    "encode",
    "encode_integer",
    "encode_oid",
    "encode_time",
    "sequence_element",
    "sequence_elements",
    "split_certificates",
]

INTEGER = 0x02
BIT_STRING = 0x03
OCTET_STRING = 0x04
OBJECT_IDENTIFIER = 0x06
UTF8_STRING = 0x0C
UTC_TIME = 0x17
GENERALIZED_TIME = 0x18
SEQUENCE = 0x30
SET = 0x31


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


def encode(tag: int, content: bytes) -> bytes:
    """One DER element: ``tag``, the definite length of ``content``, ``content``."""
    length = len(content)
    if length < 0x80:
        return bytes((tag, length)) + content
    size = (length.bit_length() + 7) // 8
    return bytes((tag, 0x80 | size)) + length.to_bytes(size, "big") + content


def encode_integer(value: int) -> bytes:
    """A DER INTEGER for a non-negative ``value``, in its fewest octets (a leading zero
    octet only where the high bit would otherwise read as a sign)."""
    return encode(INTEGER, value.to_bytes(value.bit_length() // 8 + 1, "big"))


def encode_oid(dotted: str) -> bytes:
    """A DER OBJECT IDENTIFIER for a dotted-decimal OID such as ``2.5.29.17``."""
    arcs = [int(arc) for arc in dotted.split(".")]
    if len(arcs) < 2 or arcs[0] > 2 or (arcs[0] < 2 and arcs[1] > 39):
        raise ValueError(f"{dotted!r} is not an object identifier")
    content = bytearray()
    for arc in [40 * arcs[0] + arcs[1], *arcs[2:]]:
        septets = [arc & 0x7F]
        rest = arc >> 7
        while rest:
            septets.append(0x80 | (rest & 0x7F))
            rest >>= 7
        content.extend(reversed(septets))
    return encode(OBJECT_IDENTIFIER, bytes(content))


def encode_time(moment: datetime) -> bytes:
    """A certificate validity time, as RFC 5280 section 4.1.2.5 wants it: UTCTime for
    1950 through 2049, GeneralizedTime from 2050, to the second (fractions dropped), in
    UTC. A naive ``moment`` is taken as UTC."""
    if moment.tzinfo is not None:
        moment = moment.astimezone(UTC)
    if moment.year < 1950:
        raise ValueError(f"certificate times start in 1950, not {moment.isoformat()}")
    if moment.year < 2050:
        text = b"%02d%02d%02d%02d%02d%02dZ" % (
            moment.year % 100, moment.month, moment.day,
            moment.hour, moment.minute, moment.second,
        )
        return encode(UTC_TIME, text)
    text = b"%04d%02d%02d%02d%02d%02dZ" % (
        moment.year, moment.month, moment.day, moment.hour, moment.minute, moment.second,
    )
    return encode(GENERALIZED_TIME, text)


def sequence_elements(der: bytes) -> list[bytes]:
    """The encoded elements (tag, length and content) inside one DER SEQUENCE.

    Meant for DER that a parser has already accepted (a certificate's or a
    request's to-be-signed part): it does not re-validate the encoding.
    """
    (start, end), after = _bounds(der, 0)
    if after != len(der) or der[0] != SEQUENCE:
        raise ValueError("not a single DER SEQUENCE")
    elements = []
    position = start
    while position < end:
        _, following = _bounds(der, position)
        elements.append(der[position:following])
        position = following
    return elements


def sequence_element(der: bytes, index: int) -> bytes:
    """The encoded element at ``index`` inside the DER SEQUENCE ``der`` (which, as for
    :func:`sequence_elements`, a parser has already accepted)."""
    (position, end), _ = _bounds(der, 0)
    for _ in range(index):
        _, position = _bounds(der, position)
    if position >= end:
        raise ValueError(f"the DER SEQUENCE has no element {index}")
    _, following = _bounds(der, position)
    return der[position:following]


def content_of(element: bytes) -> bytes:
    """The content octets of one encoded DER element."""
    (start, end), _ = _bounds(element, 0)
    return element[start:end]


def _bounds(der: bytes, position: int) -> tuple[tuple[int, int], int]:
    """((content start, content end), next position) of the element at ``position``."""
    first = der[position + 1]
    if first < 0x80:
        start, length = position + 2, first
    else:
        size = first & 0x7F
        start = position + 2 + size
        length = int.from_bytes(der[position + 2 : start], "big")
    return (start, start + length), start + length


def _element_length(blob: bytes, position: int) -> int:
    """Total length (header included) of the DER element starting at ``position``."""
    if len(blob) - position < 2 or blob[position] != SEQUENCE:
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
