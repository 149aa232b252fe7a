"""X509SvidTemplate: the directly encoded X509-SVID is the certificate CertificateBuilder
would make from the same fields, byte for byte, and openssl and cryptography accept it."""

from __future__ import annotations

import os
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta, timezone

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from spiffe import SpiffeId

from ca.csr import checked_csr, parse_csr
from ca.errors import CAError
from ca.keymanager import LocalSigner, Signer
from ca.x509ca import (
    DEFAULT_BACKDATE,
    X509SvidTemplate,
    build_x509_svid,
    random_serial,
    sign_certificate,
    x509_svid_template,
)
from sdk import der
from sdk.csr import build_csr
from sdk.errors import InvalidArgument
from sdk.keys import KeyType, PublicKey
from tests.unit.ca.conftest import START

WEB = SpiffeId("spiffe://example.org/web")
SERIAL = 0x80FF_0000_0000_0000_0000_0000_0000_0001  # high bit set: DER needs a zero octet
KEY_TYPES = [KeyType.EC_P256, KeyType.EC_P384, KeyType.RSA_2048]


def _reference_svid(
    *,
    ca: x509.Certificate,
    signer: Signer,
    public_key: PublicKey,
    serial: int,
    not_before: datetime,
    not_after: datetime,
    dns_names: Sequence[str] = (),
    common_name: str | None = None,
) -> x509.Certificate:
    """The X509-SVID as x509.CertificateBuilder makes it (Tessera's encoding before the
    template): the standard the template is held to."""
    attributes = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Tessera")]
    if common_name is not None:
        attributes.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(str(WEB))]
    names += [x509.DNSName(name) for name in dns_names]
    ca_ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name(attributes))
        .issuer_name(ca.subject)
        .public_key(public_key)
        .serial_number(serial)
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=isinstance(public_key, rsa.RSAPublicKey),
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        )
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
    )
    return sign_certificate(builder, signer)


def _assert_same_as_builder(ca, signer, public_key, *, now, ttl, **fields) -> x509.Certificate:
    signed = x509_svid_template(ca, signer).sign(
        spiffe_id=WEB, public_key=public_key, now=now, ttl=ttl, serial_number=SERIAL,
        dns_names=fields.get("dns_names", ()), subject_common_name=fields.get("common_name"),
    )
    leaf = x509.load_der_x509_certificate(signed.der)
    reference = _reference_svid(
        ca=ca, signer=signer, public_key=public_key, serial=SERIAL,
        not_before=now - DEFAULT_BACKDATE, not_after=min(now + ttl, ca.not_valid_after_utc),
        **fields,
    )
    assert leaf.tbs_certificate_bytes == reference.tbs_certificate_bytes
    ours, theirs = der.sequence_elements(signed.der), der.sequence_elements(
        reference.public_bytes(serialization.Encoding.DER)
    )
    assert ours[1] == theirs[1]  # the signature AlgorithmIdentifier
    assert signed.serial_number == SERIAL == leaf.serial_number
    assert signed.not_after == leaf.not_valid_after_utc
    leaf.verify_directly_issued_by(ca)
    return leaf


@pytest.mark.parametrize("leaf_type", KEY_TYPES)
@pytest.mark.parametrize("ca_type", KEY_TYPES)
def test_template_encodes_what_the_builder_encodes(
    ca_type, leaf_type, make_root, key_pool, openssl_verify
):
    ca, signer = make_root(ca_type)
    public_key = key_pool(leaf_type, 1).public_key()

    leaf = _assert_same_as_builder(ca, signer, public_key, now=START, ttl=timedelta(hours=1))

    result = openssl_verify([ca], leaf)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    "fields",
    [
        {"dns_names": ["web.example.org"]},
        {"dns_names": ["web.example.org", "*.web.example.org"]},
        {"common_name": "web"},
        {"common_name": "é" * 32},  # 64 octets of UTF-8, the most a common name may have
        {"dns_names": ["api.example.org"], "common_name": "api"},
    ],
)
def test_template_matches_the_builder_with_dns_names_and_a_common_name(
    fields, make_root, key_pool, openssl_verify
):
    ca, signer = make_root()
    leaf = _assert_same_as_builder(
        ca, signer, key_pool(KeyType.EC_P256, 1).public_key(),
        now=START, ttl=timedelta(hours=1), **fields,
    )
    assert openssl_verify([ca], leaf).returncode == 0


def test_a_common_name_over_64_octets_is_refused_as_the_builder_refuses_it(make_root, key_pool):
    ca, signer = make_root()
    with pytest.raises(ValueError, match="length must be >= 1 and <= 64, but it was 66"):
        build_x509_svid(
            spiffe_id=WEB, public_key=key_pool(KeyType.EC_P256, 1).public_key(),
            ca_certificate=ca, signer=signer, now=START, ttl=timedelta(hours=1),
            subject_common_name="é" * 33,
        )


def test_not_after_from_2050_is_generalized_time(make_root, key_pool, openssl_verify):
    ca, signer = make_root(lifetime=timedelta(days=365 * 30))
    ttl = timedelta(days=365 * 21)

    leaf = _assert_same_as_builder(
        ca, signer, key_pool(KeyType.EC_P256, 1).public_key(), now=START, ttl=ttl
    )

    assert leaf.not_valid_after_utc == datetime(2050, 12, 27, tzinfo=UTC)
    validity = der.sequence_elements(leaf.tbs_certificate_bytes)[4]
    assert validity == bytes.fromhex("3020170d3239313233313233353935305a") + bytes.fromhex(
        "180f32303530313232373030303030305a"
    )  # UTCTime 291231235950Z, GeneralizedTime 20501227000000Z
    assert openssl_verify([ca], leaf).returncode == 0


def test_times_are_utc_whole_seconds(make_root, key_pool):
    ca, signer = make_root()
    now = datetime(2030, 1, 1, 3, 4, 5, 678901, tzinfo=UTC)
    in_paris = now.astimezone(timezone(timedelta(hours=1)))
    assert in_paris.hour == 4

    leaf = _assert_same_as_builder(
        ca, signer, key_pool(KeyType.EC_P256, 1).public_key(), now=in_paris,
        ttl=timedelta(minutes=30),
    )
    assert leaf.not_valid_before_utc == datetime(2030, 1, 1, 3, 3, 55, tzinfo=UTC)
    assert leaf.not_valid_after_utc == datetime(2030, 1, 1, 3, 34, 5, tzinfo=UTC)


@pytest.mark.parametrize("key_type", KEY_TYPES)
def test_a_remote_signer_makes_the_same_certificate(key_type, key_pool, remote_signer, make_root):
    local_ca, local_signer = make_root(key_type)
    signer = remote_signer("remote", local_signer.local_private_key())

    _assert_same_as_builder(
        local_ca, signer, key_pool(KeyType.EC_P256, 1).public_key(),
        now=START, ttl=timedelta(hours=1),
    )
    assert signer.signed == 2  # the reference certificate and the template's, nothing more


def test_a_remote_signer_with_a_wrong_signature_is_refused(make_root, key_pool, remote_signer):
    class LyingSigner(remote_signer):
        def sign(self, data: bytes) -> bytes:
            return super().sign(data + b"tampered")

    ca, local_signer = make_root()
    signer = LyingSigner("liar", local_signer.local_private_key())
    with pytest.raises(CAError) as err:
        x509_svid_template(ca, signer).sign(
            spiffe_id=WEB, public_key=key_pool(KeyType.EC_P256, 1).public_key(),
            now=START, ttl=timedelta(hours=1),
        )
    assert err.value.message == (
        "key manager signer 'liar' returned a signature that does not verify with its public "
        "key; check the key manager"
    )


@pytest.mark.parametrize("key_type", KEY_TYPES)
def test_the_spki_of_a_checked_csr_goes_into_the_certificate_unchanged(
    key_type, make_root, key_pool
):
    ca, signer = make_root()
    key = key_pool(key_type, 1)
    checked = checked_csr(parse_csr(build_csr(key, WEB)), spiffe_id=WEB)
    assert checked.subject_public_key_info == key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )

    signed = x509_svid_template(ca, signer).sign(
        spiffe_id=WEB, public_key=checked.public_key, now=START, ttl=timedelta(hours=1),
        subject_public_key_info=checked.subject_public_key_info, serial_number=SERIAL,
    )
    reference = _reference_svid(
        ca=ca, signer=signer, public_key=key.public_key(), serial=SERIAL,
        not_before=START - DEFAULT_BACKDATE, not_after=START + timedelta(hours=1),
    )
    assert x509.load_der_x509_certificate(signed.der).tbs_certificate_bytes == (
        reference.tbs_certificate_bytes
    )


def test_serials_are_random_and_minimally_encoded(make_root, key_pool):
    ca, signer = make_root()
    template = x509_svid_template(ca, signer)
    public_key = key_pool(KeyType.EC_P256, 1).public_key()
    serials = set()
    for _ in range(50):
        signed = template.sign(spiffe_id=WEB, public_key=public_key, now=START,
                               ttl=timedelta(hours=1))
        leaf = x509.load_der_x509_certificate(signed.der)
        serial_der = der.sequence_elements(leaf.tbs_certificate_bytes)[1]
        assert serial_der == der.encode_integer(leaf.serial_number)
        assert 0 < leaf.serial_number < 2**128
        serials.add(signed.serial_number)
    assert len(serials) == 50


def test_templates_are_kept_per_certificate_and_signer(make_root, key_pool):
    ca, signer = make_root()
    other_ca, other_signer = make_root(slot=1)
    template = x509_svid_template(ca, signer)

    assert x509_svid_template(ca, signer) is template
    assert x509_svid_template(other_ca, other_signer) is not template
    assert isinstance(x509_svid_template(ca, other_signer), X509SvidTemplate)


def test_a_template_with_the_wrong_signer_refuses_only_after_the_earlier_checks(
    make_root, key_pool
):
    ca, _ = make_root()
    wrong = LocalSigner("other", key_pool(KeyType.EC_P256, 3))
    public_key = key_pool(KeyType.EC_P256, 1).public_key()
    template = x509_svid_template(ca, wrong)

    with pytest.raises(InvalidArgument) as err:
        template.sign(spiffe_id=SpiffeId("spiffe://example.org"), public_key=public_key,
                      now=START, ttl=timedelta(hours=1))
    assert err.value.message == (
        "an X509-SVID needs a SPIFFE ID with a path, not the trust domain ID spiffe://example.org"
    )
    with pytest.raises(InvalidArgument) as err:
        template.sign(spiffe_id=WEB, public_key=public_key, now=START, ttl=timedelta(hours=1))
    assert err.value.message == (
        "signer key 'other' does not hold the private key of the signing authority"
    )


def test_build_x509_svid_returns_the_template_certificate(make_root, key_pool):
    ca, signer = make_root(KeyType.EC_P384)
    svid = build_x509_svid(
        spiffe_id=WEB, public_key=key_pool(KeyType.RSA_2048, 1).public_key(),
        ca_certificate=ca, signer=signer, now=START, ttl=timedelta(hours=1),
        dns_names=["web.example.org"],
    )
    svid.verify_directly_issued_by(ca)
    san = svid.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["web.example.org"]
    assert svid.issuer == ca.subject


def test_a_forked_child_does_not_repeat_its_parents_serials():
    random_serial()  # the pool holds the next serials now
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        os.write(write_end, random_serial().to_bytes(16, "big"))
        os._exit(0)
    os.close(write_end)
    _, status = os.waitpid(child, 0)
    child_serial = int.from_bytes(os.read(read_end, 16), "big")
    os.close(read_end)
    assert status == 0
    assert child_serial != 0
    assert child_serial != random_serial()
