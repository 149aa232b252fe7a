from __future__ import annotations

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from spiffe import SpiffeId

from ca.csr import MAX_CSR_BYTES, check_csr, checked_csr, parse_csr
from sdk import der
from sdk.csr import build_csr
from sdk.errors import InvalidArgument
from sdk.keys import KeyType

WEB = SpiffeId("spiffe://example.org/web")


def _csr(key, *names, ca=False, hash_algorithm=None):
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(names)), critical=False)
    if ca:
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(key, hash_algorithm or algorithm)


def _refusal(csr, **kwargs) -> str:
    with pytest.raises(InvalidArgument) as err:
        check_csr(csr, spiffe_id=WEB, **kwargs)
    return err.value.message


@pytest.mark.parametrize("key_type", [KeyType.EC_P256, KeyType.EC_P384, KeyType.RSA_2048])
def test_build_then_check(key_type, key_pool):
    key = key_pool(key_type)
    der = build_csr(key, WEB, ["web.example.org"])
    public_key = check_csr(parse_csr(der), spiffe_id=WEB, dns_names=["web.example.org", "w"])
    assert public_key == key.public_key()


def test_parse_accepts_pem_and_refuses_garbage(key_pool):
    csr = parse_csr(build_csr(key_pool(KeyType.EC_P256), WEB))
    pem = csr.public_bytes(serialization.Encoding.PEM)
    assert parse_csr(pem) == csr
    for garbage in (b"", b"hello", b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n", b"\x30\x03"):
        with pytest.raises(InvalidArgument) as err:
            parse_csr(garbage)
        assert err.value.message == "CSR is not a valid PKCS#10 request in DER or PEM"


def test_parse_refuses_oversized_requests():
    with pytest.raises(InvalidArgument) as err:
        parse_csr(b"\x30" * (MAX_CSR_BYTES + 1))
    assert err.value.message == "CSR is 16385 bytes; the limit is 16384 bytes"


def test_a_csr_without_sans_is_fine(key_pool):
    key = key_pool(KeyType.EC_P256)
    assert check_csr(_csr(key), spiffe_id=WEB) == key.public_key()


def test_bad_signature_is_refused(key_pool):
    good = build_csr(key_pool(KeyType.EC_P256), WEB)
    tampered = bytearray(good)
    tampered[-5] ^= 0x01  # inside the signature
    assert _refusal(parse_csr(bytes(tampered))) == (
        "CSR signature does not verify with the CSR's public key"
    )


def test_weak_or_unsupported_keys_are_refused():
    assert _refusal(_csr(rsa.generate_private_key(65537, 1024))) == (
        "CSR RSA key has 1024 bits; at least 2048 are required"
    )
    assert _refusal(_csr(ec.generate_private_key(ec.SECP521R1()))) == (
        "CSR key is on EC curve secp521r1; use P-256 (secp256r1) or P-384 (secp384r1)"
    )
    assert _refusal(_csr(ed25519.Ed25519PrivateKey.generate())) == (
        "CSR key type Ed25519PublicKey is not supported; use EC P-256, EC P-384 or RSA of at "
        "least 2048 bits"
    )


def test_uri_sans_must_be_exactly_the_spiffe_id(key_pool):
    key = key_pool(KeyType.EC_P256)
    other = x509.UniformResourceIdentifier("spiffe://example.org/db")
    mine = x509.UniformResourceIdentifier(str(WEB))
    assert _refusal(_csr(key, other)) == (
        "CSR URI SANs ['spiffe://example.org/db'] do not match the SPIFFE ID "
        "spiffe://example.org/web; a CSR may name only the SPIFFE ID of the entry it is for"
    )
    assert "do not match the SPIFFE ID" in _refusal(_csr(key, mine, other))


def test_dns_sans_must_be_allowed(key_pool):
    key = key_pool(KeyType.EC_P256)
    csr = _csr(key, x509.DNSName("db.example.org"), x509.DNSName("web.example.org"))
    assert _refusal(csr, dns_names=["web.example.org"]) == (
        "CSR asks for DNS names db.example.org that the entry for spiffe://example.org/web "
        "does not allow (allowed: web.example.org)"
    )
    assert "(allowed: none)" in _refusal(csr)


def test_other_san_types_are_refused(key_pool):
    csr = _csr(key_pool(KeyType.EC_P256), x509.RFC822Name("a@example.org"))
    assert _refusal(csr) == (
        "CSR carries subject alternative names of type RFC822Name; only a URI (the SPIFFE ID) "
        "and DNS names are allowed"
    )


def test_ca_requests_are_refused(key_pool):
    csr = _csr(key_pool(KeyType.EC_P256), ca=True)
    assert _refusal(csr) == "CSR asks for a CA certificate (cA=true); SVIDs are never CAs"


def _resigned(
    csr: x509.CertificateSigningRequest, key, info: bytes | None = None,
    algorithm: bytes | None = None,
) -> x509.CertificateSigningRequest:
    """``csr`` with its request info (and signature AlgorithmIdentifier) swapped, signed
    again by ``key`` with SHA-256."""
    original_info, original_algorithm, _ = der.sequence_elements(
        csr.public_bytes(serialization.Encoding.DER)
    )
    info = info or original_info
    if isinstance(key, ec.EllipticCurvePrivateKey):
        signature = key.sign(info, ec.ECDSA(hashes.SHA256()))
    else:
        signature = key.sign(info, padding.PKCS1v15(), hashes.SHA256())
    body = info + (algorithm or original_algorithm) + der.encode(
        der.BIT_STRING, b"\x00" + signature
    )
    return x509.load_der_x509_csr(der.encode(der.SEQUENCE, body))


@pytest.mark.parametrize(
    ("key_type", "hash_algorithm"),
    [
        (KeyType.EC_P256, hashes.SHA256()),
        (KeyType.EC_P384, hashes.SHA384()),
        (KeyType.EC_P256, hashes.SHA512()),
        (KeyType.RSA_2048, hashes.SHA256()),
        (KeyType.RSA_2048, hashes.SHA384()),
        (KeyType.RSA_2048, hashes.SHA512()),
        (KeyType.EC_P256, hashes.SHA224()),  # not one of the usual: cryptography checks it
    ],
)
def test_signatures_are_checked_for_every_hash(key_type, hash_algorithm, key_pool):
    key = key_pool(key_type)
    good = _csr(key, hash_algorithm=hash_algorithm)
    assert check_csr(good, spiffe_id=WEB) == key.public_key()
    tampered = bytearray(good.public_bytes(serialization.Encoding.DER))
    tampered[-5] ^= 0x01  # inside the signature
    assert _refusal(x509.load_der_x509_csr(bytes(tampered))) == (
        "CSR signature does not verify with the CSR's public key"
    )


def test_a_signature_algorithm_for_another_key_type_does_not_verify(key_pool):
    ec_key = key_pool(KeyType.EC_P256)
    rsa_csr = _csr(key_pool(KeyType.RSA_2048))
    _, rsa_algorithm, _ = der.sequence_elements(rsa_csr.public_bytes(serialization.Encoding.DER))
    mislabelled = _resigned(_csr(ec_key), ec_key, algorithm=rsa_algorithm)
    assert mislabelled.signature_algorithm_oid.dotted_string == "1.2.840.113549.1.1.11"
    assert _refusal(mislabelled) == "CSR signature does not verify with the CSR's public key"


def test_checked_csr_hands_over_the_spki_a_certificate_carries(key_pool):
    key = key_pool(KeyType.EC_P256)
    spki = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert checked_csr(_csr(key), spiffe_id=WEB).subject_public_key_info == spki

    # The same key as a compressed point: accepted, and re-encoded uncompressed.
    compressed_point = key.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.CompressedPoint
    )
    algorithm, _ = der.sequence_elements(spki)
    compressed = der.encode(
        der.SEQUENCE, algorithm + der.encode(der.BIT_STRING, b"\x00" + compressed_point)
    )
    version, subject, _, attributes = der.sequence_elements(_csr(key).tbs_certrequest_bytes)
    info = der.encode(der.SEQUENCE, version + subject + compressed + attributes)
    csr = _resigned(_csr(key), key, info=info)
    assert der.sequence_elements(csr.tbs_certrequest_bytes)[2] == compressed
    checked = checked_csr(csr, spiffe_id=WEB)
    assert checked.public_key == key.public_key()
    assert checked.subject_public_key_info == spki

