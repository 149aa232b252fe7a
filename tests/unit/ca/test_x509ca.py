from __future__ import annotations

from datetime import timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID
from spiffe import SpiffeId, TrustDomain, X509Svid

from ca.keymanager import LocalSigner
from ca.x509ca import (
    DEFAULT_BACKDATE,
    build_ca_certificate,
    build_x509_svid,
    random_serial,
    sign_certificate,
)
from sdk.errors import FailedPrecondition, InvalidArgument
from sdk.keys import KeyType, private_key_to_pkcs8_der
from tests.unit.ca.conftest import START, TRUST_DOMAIN

WEB = SpiffeId("spiffe://example.org/web")


def _der_chain(*certificates: x509.Certificate) -> bytes:
    return b"".join(cert.public_bytes(serialization.Encoding.DER) for cert in certificates)


def _svid(ca, signer, key, **kwargs):
    options = {"spiffe_id": WEB, "now": START, "ttl": timedelta(hours=1)}
    options.update(kwargs)
    return build_x509_svid(public_key=key.public_key(), ca_certificate=ca, signer=signer, **options)


@pytest.mark.parametrize("key_type", list(KeyType))
def test_self_signed_ca_and_svid_pass_openssl_spiffe_and_pkilint(
    key_type, make_root, key_pool, openssl_verify, pkilint
):
    ca, signer = make_root(key_type)
    workload_key = key_pool(key_type, 1)
    svid = _svid(ca, signer, workload_key, dns_names=["web.example.org"])

    result = openssl_verify([ca], svid)
    assert result.returncode == 0, result.stdout + result.stderr
    parsed = X509Svid.parse_raw(_der_chain(svid), private_key_to_pkcs8_der(workload_key))
    assert parsed.spiffe_id == WEB
    assert pkilint(ca) == []
    assert pkilint(svid) == []


@pytest.mark.parametrize("key_type", list(KeyType))
def test_svid_extensions_follow_the_x509_svid_standard(key_type, make_root, key_pool):
    ca, signer = make_root()
    svid = _svid(ca, signer, key_pool(key_type, 1), dns_names=["web.example.org"])
    extensions = svid.extensions

    constraints = extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca is False
    usage = extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical
    assert usage.value.digital_signature
    assert not usage.value.key_cert_sign and not usage.value.crl_sign
    assert usage.value.key_encipherment is key_type.value.startswith("rsa")
    assert list(extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.SERVER_AUTH,
        ExtendedKeyUsageOID.CLIENT_AUTH,
    ]
    san = extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [str(WEB)]
    assert san.get_values_for_type(x509.DNSName) == ["web.example.org"]
    ca_ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    aki = extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == ca_ski.digest
    assert extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value == (
        x509.SubjectKeyIdentifier.from_public_key(svid.public_key())
    )


def test_ca_extensions(make_root):
    ca, _ = make_root()
    extensions = ca.extensions
    constraints = extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca is True
    usage = extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.key_cert_sign and usage.value.crl_sign
    san = extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert list(san) == [x509.UniformResourceIdentifier("spiffe://example.org")]
    ski = extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    aki = extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == ski.digest
    assert ca.subject == ca.issuer
    assert f"CN=authority {ski.digest[:8].hex()}" in ca.subject.rfc4514_string()


def test_authorities_for_different_keys_have_different_subjects(make_root):
    first, _ = make_root(slot=0)
    second, _ = make_root(slot=1)
    assert first.subject != second.subject


@pytest.mark.parametrize("key_type", [KeyType.EC_P384, KeyType.RSA_2048])
def test_intermediate_chain_verifies_with_untrusted(
    key_type, make_root, key_pool, openssl_verify, pkilint
):
    root, root_signer = make_root()
    intermediate_signer = LocalSigner("intermediate", key_pool(key_type, 2))
    intermediate = build_ca_certificate(
        trust_domain=TRUST_DOMAIN,
        public_key=intermediate_signer.public_key(),
        signer=root_signer,
        issuer=root,
        not_before=START,
        not_after=START + timedelta(hours=12),
    )
    workload_key = key_pool(KeyType.EC_P256, 1)
    svid = _svid(intermediate, intermediate_signer, workload_key)

    result = openssl_verify([root], svid, untrusted=[intermediate])
    assert result.returncode == 0, result.stdout + result.stderr
    assert openssl_verify([root], svid).returncode != 0  # the intermediate is needed
    X509Svid.parse_raw(_der_chain(svid, intermediate), private_key_to_pkcs8_der(workload_key))
    assert pkilint(intermediate) == []
    aki = intermediate.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    root_ski = root.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == root_ski.digest
    assert intermediate.issuer == root.subject


def test_intermediate_does_not_outlive_its_issuer(make_root, key_pool):
    root, root_signer = make_root()
    key = key_pool(KeyType.EC_P256, 2)
    intermediate = build_ca_certificate(
        trust_domain=TRUST_DOMAIN,
        public_key=key.public_key(),
        signer=root_signer,
        issuer=root,
        not_before=START,
        not_after=START + timedelta(days=30),
    )
    assert intermediate.not_valid_after_utc == root.not_valid_after_utc


@pytest.mark.parametrize("key_type", list(KeyType))
def test_remote_signer_path_makes_valid_certificates(
    key_type, key_pool, remote_signer, openssl_verify, pkilint
):
    signer = remote_signer("remote", key_pool(key_type))
    ca = build_ca_certificate(
        trust_domain=TRUST_DOMAIN,
        public_key=signer.public_key(),
        signer=signer,
        issuer=None,
        not_before=START,
        not_after=START + timedelta(days=1),
    )
    svid = _svid(ca, signer, key_pool(KeyType.EC_P256, 1))

    assert signer.signed == 2
    ca.verify_directly_issued_by(ca)
    svid.verify_directly_issued_by(ca)
    result = openssl_verify([ca], svid)
    assert result.returncode == 0, result.stdout + result.stderr
    assert pkilint(ca) == []
    assert pkilint(svid) == []


def test_remote_signer_with_a_wrong_signature_is_refused(key_pool, remote_signer):
    class LyingSigner(remote_signer):
        def sign(self, data: bytes) -> bytes:
            return super().sign(data + b"tampered")

    signer = LyingSigner("liar", key_pool(KeyType.EC_P256))
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(x509.Name([]))
        .public_key(signer.public_key())
        .serial_number(1)
        .not_valid_before(START)
        .not_valid_after(START + timedelta(hours=1))
    )
    with pytest.raises(Exception, match="returned a signature that does not verify"):
        sign_certificate(builder, signer)


def test_svid_lifetime_is_backdated_and_capped_at_the_ca(make_root, key_pool):
    ca, signer = make_root(lifetime=timedelta(hours=2))
    key = key_pool(KeyType.EC_P256, 1)

    svid = _svid(ca, signer, key, now=START, ttl=timedelta(hours=1))
    assert svid.not_valid_before_utc == START - DEFAULT_BACKDATE
    assert svid.not_valid_after_utc == START + timedelta(hours=1)

    late = START + timedelta(hours=1, minutes=30)
    capped = _svid(ca, signer, key, now=late, ttl=timedelta(hours=1), backdate=timedelta(0))
    assert capped.not_valid_before_utc == late
    assert capped.not_valid_after_utc == ca.not_valid_after_utc


def test_svid_after_the_ca_expired_is_refused(make_root, key_pool):
    ca, signer = make_root(lifetime=timedelta(hours=2))
    with pytest.raises(FailedPrecondition, match="the signing authority expired at"):
        _svid(ca, signer, key_pool(KeyType.EC_P256, 1), now=START + timedelta(hours=3))


def test_serials_are_random_positive_and_fit_in_20_octets(make_root, key_pool):
    serials = {random_serial() for _ in range(1000)}
    assert len(serials) == 1000
    assert all(0 < serial < 2**128 for serial in serials)
    ca, signer = make_root()
    key = key_pool(KeyType.EC_P256, 1)
    issued = {_svid(ca, signer, key).serial_number for _ in range(20)}
    assert len(issued) == 20


def test_svid_needs_a_path_and_the_ca_trust_domain(make_root, key_pool):
    ca, signer = make_root()
    key = key_pool(KeyType.EC_P256, 1)
    with pytest.raises(InvalidArgument) as err:
        _svid(ca, signer, key, spiffe_id=SpiffeId("spiffe://example.org"))
    assert err.value.message == (
        "an X509-SVID needs a SPIFFE ID with a path, not the trust domain ID spiffe://example.org"
    )
    with pytest.raises(InvalidArgument) as err:
        _svid(ca, signer, key, spiffe_id=SpiffeId("spiffe://other.org/web"))
    assert err.value.message == (
        "SPIFFE ID spiffe://other.org/web is not in trust domain example.org of the signing "
        "authority"
    )


def test_signer_must_hold_the_ca_key(make_root, key_pool):
    ca, _ = make_root()
    other = LocalSigner("other", key_pool(KeyType.EC_P256, 3))
    with pytest.raises(InvalidArgument) as err:
        _svid(ca, other, key_pool(KeyType.EC_P256, 1))
    assert err.value.message == (
        "signer key 'other' does not hold the private key of the signing authority"
    )
    with pytest.raises(InvalidArgument, match="of the new self-signed authority"):
        build_ca_certificate(
            trust_domain=TrustDomain("example.org"),
            public_key=key_pool(KeyType.EC_P256, 1).public_key(),
            signer=other,
            issuer=None,
            not_before=START,
            not_after=START + timedelta(days=1),
        )


def test_bad_dns_name_and_common_name_are_refused(make_root, key_pool):
    ca, signer = make_root()
    key = key_pool(KeyType.EC_P256, 1)
    with pytest.raises(InvalidArgument, match="DNS name 'bad name' is not valid"):
        _svid(ca, signer, key, dns_names=["bad name"])
    with pytest.raises(InvalidArgument, match="subject common name must have 1 to 64"):
        _svid(ca, signer, key, subject_common_name="x" * 65)
    svid = _svid(ca, signer, key, subject_common_name="web")
    assert svid.subject.rfc4514_string() == "CN=web,O=Tessera"


def test_the_pkilint_judge_can_fail(key_pool, pkilint):
    key = key_pool(KeyType.EC_P256)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "x")]))
        .issuer_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "x")]))
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(START)
        .not_valid_after(START + timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, False, False, False),
            critical=True,
        )
    )
    certificate = sign_certificate(builder, LocalSigner("k", key))
    assert any(problem.startswith("ERROR") for problem in pkilint(certificate))
