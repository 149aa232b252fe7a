"""split_certificates: concatenated DER certificates, and refusing what is not."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from sdk.der import encode_integer, encode_oid, encode_time, split_certificates
from sdk.errors import InvalidArgument
from sdk.keys import KeyType
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


@pytest.mark.parametrize(
    ("value", "encoded"),
    [(0, "020100"), (1, "020101"), (127, "02017f"), (128, "02020080"), (255, "020200ff"),
     (256, "02020100"), (2**128 - 1, "021100" + "ff" * 16), (2**127 - 1, "02107f" + "ff" * 15)],
)
def test_integers_take_the_fewest_octets(value, encoded):
    assert encode_integer(value).hex() == encoded


@pytest.mark.parametrize(
    ("moment", "encoded"),
    [
        (datetime(2049, 12, 31, 23, 59, 59, 999999, tzinfo=UTC), "170d3439313233313233353935395a"),
        (datetime(2050, 1, 1, tzinfo=UTC), "180f32303530303130313030303030305a"),
        (datetime(1950, 1, 1), "170d3530303130313030303030305a"),
        (datetime(2030, 1, 1, 1, tzinfo=timezone(timedelta(hours=2))),
         "170d3239313233313233303030305a"),
    ],
)
def test_times_are_utctime_until_2049_then_generalizedtime(moment, encoded):
    assert encode_time(moment).hex() == encoded


def test_times_before_1950_are_refused():
    with pytest.raises(ValueError, match="certificate times start in 1950, not 1949-12-31"):
        encode_time(datetime(1949, 12, 31, 23, 59, 59))


def test_object_identifiers():
    assert encode_oid("2.5.29.17").hex() == "0603551d11"
    assert encode_oid("1.2.840.113549.1.1.11").hex() == "06092a864886f70d01010b"
    with pytest.raises(ValueError, match=r"'1\.40' is not an object identifier"):
        encode_oid("1.40")
