"""split_certificates: concatenated DER certificates, and refusing what is not."""

from __future__ import annotations

from datetime import timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ca.der import split_certificates
from ca.errors import InvalidArgument
from ca.keys import KeyType
from tests.unit.ca.conftest import pooled_key


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


@pytest.fixture
def three(make_root) -> list[x509.Certificate]:
    return [
        make_root(KeyType.EC_P256, 0)[0],
        make_root(KeyType.EC_P384, 0)[0],
        make_root(KeyType.RSA_2048, 0, lifetime=timedelta(days=2))[0],
    ]


def test_no_certificates():
    assert split_certificates(b"") == []


def test_one_certificate(three):
    assert split_certificates(der(three[0])) == [three[0]]


def test_three_certificates_in_order(three):
    assert split_certificates(b"".join(der(c) for c in three)) == three


def test_a_long_form_length_of_two_octets(three):
    rsa = der(three[2])
    assert rsa[1] == 0x82  # an RSA certificate is longer than 255 bytes

    assert split_certificates(rsa + der(three[0])) == [three[2], three[0]]


@pytest.mark.parametrize("cut", [1, 2, 3, 10, -1])
def test_truncated_data(three, cut):
    blob = der(three[0]) + der(three[1])
    end = len(blob) + cut if cut < 0 else cut

    with pytest.raises(InvalidArgument):
        split_certificates(blob[:end])


def test_truncated_after_a_whole_certificate(three):
    second = der(three[1])
    with pytest.raises(InvalidArgument) as refused:
        split_certificates(der(three[0]) + second[: len(second) // 2])

    assert refused.value.message == "certificate data is truncated"


NOT_DER = "certificate data is not a sequence of DER certificates"


@pytest.mark.parametrize(
    ("blob", "message"),
    [
        (b"\x00", NOT_DER),
        (b"hello world", NOT_DER),
        (b"-----BEGIN CERTIFICATE-----\n", NOT_DER),
        (b"\x30", NOT_DER),
        (b"\x30\x80" + b"\x00" * 8, "certificate data has a malformed DER length"),
        (b"\x30\x85" + b"\x00" * 8, "certificate data has a malformed DER length"),
        (b"\x30\x82\x01", "certificate data has a malformed DER length"),
        (b"\x30\x82\xff\xff\x00", "certificate data is truncated"),
    ],
)
def test_garbage_data(blob, message):
    with pytest.raises(InvalidArgument) as refused:
        split_certificates(blob)

    assert refused.value.message == message


def test_a_der_sequence_that_is_not_a_certificate():
    not_a_cert = b"\x30\x03\x02\x01\x05"  # SEQUENCE { INTEGER 5 }

    with pytest.raises(InvalidArgument) as refused:
        split_certificates(not_a_cert)

    assert refused.value.message == "certificate data holds an element that is not a certificate"


def test_a_public_key_is_not_a_certificate():
    spki = (
        pooled_key(KeyType.EC_P256)
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )

    with pytest.raises(InvalidArgument):
        split_certificates(spki)
