"""The secrets a caller gets by name: its own SVIDs, the bundles it may see, nothing else."""

from __future__ import annotations

from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from envoy.extensions.transport_sockets.tls.v3 import tls_spiffe_validator_config_pb2

from tests.support.pki import TestCA, x509_svid_material
from workload_api.identity import X509Context
from workload_api.sds import IdentitySecrets

WEB = "spiffe://example.org/web"
DB = "spiffe://example.org/db"
OWN = "spiffe://example.org"
PARTNER = "spiffe://partner.test"


@pytest.fixture
def secrets(test_ca: TestCA, partner_test_ca: TestCA) -> IdentitySecrets:
    context = X509Context(
        svids=(x509_svid_material(test_ca, WEB), x509_svid_material(test_ca, DB)),
        federated_bundles={PARTNER: partner_test_ca.bundle_der()},
    )
    bundles = {OWN: test_ca.bundle_der(), PARTNER: partner_test_ca.bundle_der()}
    return IdentitySecrets(context, bundles, "example.org")


def leaf_of(secret: Any) -> x509.Certificate:
    return x509.load_pem_x509_certificates(secret.tls_certificate.certificate_chain.inline_bytes)[0]


def uri(certificate: x509.Certificate) -> list[str]:
    names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return names.get_values_for_type(x509.UniformResourceIdentifier)


def test_an_svid_is_named_by_its_spiffe_id_with_chain_and_key_as_pem(
    secrets: IdentitySecrets,
) -> None:
    secret = secrets.secret(DB)
    assert secret.name == DB
    assert uri(leaf_of(secret)) == [DB]
    key = serialization.load_pem_private_key(
        secret.tls_certificate.private_key.inline_bytes, password=None
    )
    assert key.public_key() == leaf_of(secret).public_key()


def test_default_is_the_first_svid(secrets: IdentitySecrets) -> None:
    secret = secrets.secret("default")
    assert secret.name == "default"
    assert uri(leaf_of(secret)) == [WEB]


def test_rootca_is_the_own_trust_domain_and_a_trust_domain_id_its_bundle(
    secrets: IdentitySecrets, test_ca: TestCA, partner_test_ca: TestCA
) -> None:
    own = secrets.secret("ROOTCA").validation_context.trusted_ca.inline_bytes
    assert x509.load_pem_x509_certificates(own) == [test_ca.certificate]
    partner = secrets.secret(PARTNER)
    assert partner.name == PARTNER
    assert x509.load_pem_x509_certificates(
        partner.validation_context.trusted_ca.inline_bytes
    ) == [partner_test_ca.certificate]


def test_all_uses_the_spiffe_validator_with_every_trust_domain(
    secrets: IdentitySecrets, test_ca: TestCA, partner_test_ca: TestCA
) -> None:
    custom = secrets.secret("ALL").validation_context.custom_validator_config
    assert custom.name == "envoy.tls.cert_validator.spiffe"
    config: Any = tls_spiffe_validator_config_pb2.SPIFFECertValidatorConfig()  # type: ignore[attr-defined]
    assert custom.typed_config.Unpack(config)
    assert [(td.name, x509.load_pem_x509_certificates(td.trust_bundle.inline_bytes))
            for td in config.trust_domains] == [
        ("example.org", [test_ca.certificate]), ("partner.test", [partner_test_ca.certificate]),
    ]  # fmt: skip


@pytest.mark.parametrize("name", [
    "spiffe://example.org/someone-else", "spiffe://other.test", "spiffe://example.org/",
    "anything", "",
])  # fmt: skip
def test_what_the_caller_may_not_have_has_no_secret(secrets: IdentitySecrets, name: str) -> None:
    assert secrets.secret(name) is None


def test_a_caller_without_an_svid_gets_nothing(test_ca: TestCA) -> None:
    secrets = IdentitySecrets(X509Context(svids=(), federated_bundles={}),
                              {OWN: test_ca.bundle_der()}, "example.org")  # fmt: skip
    assert [secrets.secret(n) for n in ("default", "ROOTCA", "ALL", OWN)] == [None] * 4
    assert secrets.names() == []


def test_names_are_every_svid_and_every_bundle(secrets: IdentitySecrets) -> None:
    assert secrets.names() == [WEB, DB, OWN, PARTNER]
    assert secrets.spiffe_ids == (WEB, DB)
