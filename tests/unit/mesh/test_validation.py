"""One document to a resource: kind, apiVersion, metadata, and how errors read."""

from __future__ import annotations

from typing import Any

import pytest

from mesh import ConfigError, Gateway, VirtualService, parse_documents, parse_resource
from mesh.resources.virtualservice import VirtualServiceSpec
from mesh.validation import field_path
from tests.unit.mesh.documents import REMOVE, VIRTUAL_SERVICE, errors, with_field

VS = "VirtualService microservice-virtual-service"
KINDS = (
    "Gateway, VirtualService, DestinationRule, AuthorizationPolicy, RequestAuthentication, "
    "Service, RateLimit"
)
NETWORKING = "networking.istio.io/v1, networking.istio.io/v1beta1 or networking.istio.io/v1alpha3"


@pytest.mark.parametrize(
    ("document", "expected"),
    [
        pytest.param(
            ["a", "b"],
            "<stdin> is a list, not a mapping: each document is one resource with apiVersion, "
            "kind, metadata and spec",
            id="list",
        ),
        pytest.param({}, f"<stdin>: kind is required: one of {KINDS}", id="no-kind"),
        pytest.param(
            {"kind": 5}, f"<stdin>: kind must be one of {KINDS}, not an integer (5)", id="kind-int"
        ),
        pytest.param(
            {"kind": "ServiceEntry", "metadata": {"name": "x"}},
            f"<stdin>: kind must be one of {KINDS}, not 'ServiceEntry'",
            id="unsupported-kind",
        ),
        pytest.param(
            {"kind": "VirtualSevice"},
            f"<stdin>: kind must be one of {KINDS}, not 'VirtualSevice' (did you mean "
            "VirtualService?)",
            id="misspelt-kind",
        ),
        pytest.param(
            {"kind": "virtualservice"},
            f"<stdin>: kind must be one of {KINDS}, not 'virtualservice' (did you mean "
            "VirtualService?)",
            id="lower-case-kind",
        ),
        pytest.param(
            with_field(VIRTUAL_SERVICE, "apiVersion", REMOVE),
            f"{VS}: apiVersion is required: {NETWORKING}",
            id="no-api-version",
        ),
        pytest.param(
            with_field(VIRTUAL_SERVICE, "apiVersion", "security.istio.io/v1"),
            f"{VS}: apiVersion must be {NETWORKING} for a VirtualService, not "
            "'security.istio.io/v1'",
            id="api-version-of-another-group",
        ),
        pytest.param(
            with_field(VIRTUAL_SERVICE, "apiVersion", "networking.istio.io/v2"),
            f"{VS}: apiVersion must be {NETWORKING} for a VirtualService, not "
            "'networking.istio.io/v2'",
            id="unknown-api-version",
        ),
        pytest.param(
            with_field(VIRTUAL_SERVICE, "metadata", REMOVE),
            "VirtualService in <stdin>: metadata is required",
            id="no-metadata",
        ),
        pytest.param(
            with_field(VIRTUAL_SERVICE, "metadata.name", REMOVE),
            "VirtualService in <stdin>: metadata.name is required",
            id="no-name",
        ),
        pytest.param(
            with_field(VIRTUAL_SERVICE, "metadata.name", "Micro_Service"),
            "VirtualService Micro_Service: metadata.name must be a DNS-1123 subdomain: labels "
            "of lower-case letters, digits and '-' joined by '.', at most 253 characters (e.g. "
            "reviews-route)",
            id="bad-name",
        ),
        pytest.param(
            with_field(VIRTUAL_SERVICE, "metadata.uid", "1f2e"),
            f"{VS}: metadata.uid is not supported",
            id="kubectl-metadata",
        ),
        pytest.param(
            with_field(VIRTUAL_SERVICE, "status", {}), f"{VS}: status is not supported", id="status"
        ),
        pytest.param(
            with_field(VIRTUAL_SERVICE, "spec", REMOVE), f"{VS}: spec is required", id="no-spec"
        ),
        pytest.param(
            with_field(VIRTUAL_SERVICE, "spec", None),
            f"{VS}: spec must be a mapping, not empty",
            id="empty-spec",
        ),
        pytest.param(
            with_field(VIRTUAL_SERVICE, "spec.hosts", "*"),
            f"{VS}: spec.hosts must be a list, not a string ('*')",
            id="string-for-list",
        ),
        pytest.param(
            with_field(VIRTUAL_SERVICE, "spec.http", {"route": []}),
            f"{VS}: spec.http must be a list, not a mapping",
            id="mapping-for-list",
        ),
        pytest.param(
            with_field(VIRTUAL_SERVICE, "spec.http[0].route[0].destination", "users-service"),
            f"{VS}: spec.http[0].route[0].destination must be a mapping, not a string "
            "('users-service')",
            id="string-for-mapping",
        ),
        pytest.param(
            with_field(VIRTUAL_SERVICE, "spec.http[0].route[0].destination.port.number", "80"),
            f"{VS}: spec.http[0].route[0].destination.port.number must be an integer, not a "
            "string ('80')",
            id="quoted-number",
        ),
        pytest.param(
            with_field(VIRTUAL_SERVICE, "spec.http[0].route[0].weight", True),
            f"{VS}: spec.http[0].route[0].weight must be an integer, not true",
            id="bool-for-int",
        ),
        pytest.param(
            with_field(VIRTUAL_SERVICE, "spec.http[0].route[0].weight", 50.5),
            f"{VS}: spec.http[0].route[0].weight must be an integer, not a number (50.5)",
            id="float-for-int",
        ),
        pytest.param(
            with_field(VIRTUAL_SERVICE, "spec.http[0].match[0].uri.exact", 1),
            f"{VS}: spec.http[0].match[0].uri.exact must be a string, not an integer (1)",
            id="int-for-string",
        ),
        pytest.param(
            with_field(VIRTUAL_SERVICE, "spec.http[0].match[0].headers", {"x-a": {"exakt": "b"}}),
            f"{VS}: spec.http[0].match[0].headers[x-a].exakt is not supported "
            "(did you mean exact?)",
            id="misspelt-field-in-a-map",
        ),
        pytest.param(
            with_field(VIRTUAL_SERVICE, "spec.http[0].corsPolicy", {"allowOrigins": []}),
            f"{VS}: spec.http[0].corsPolicy is not supported",
            id="istio-field-outside-the-subset",
        ),
    ],
)
def test_refused(document: Any, expected: str) -> None:
    assert errors(document) == [expected]


def test_every_error_of_a_document_at_once() -> None:
    document = with_field(
        VIRTUAL_SERVICE,
        "metadata",
        {
            "name": "a",
            "namespace": "Prod",
            "resourceVersion": "1",
            "labels": {"app": "x y"},
            "annotations": {"a": 1},
        },
    )
    document = with_field(document, "apiVersion", "v1")
    document = with_field(document, "spec.http[0].timeout", 5)
    assert errors(document) == [
        "VirtualService a: apiVersion must be networking.istio.io/v1, "
        "networking.istio.io/v1beta1 or networking.istio.io/v1alpha3 for a VirtualService, "
        "not 'v1'",
        "VirtualService a: metadata.namespace must be a DNS-1123 label: lower-case letters, "
        "digits and '-', starting and ending with a letter or digit, at most 63 characters "
        "(e.g. users-service)",
        "VirtualService a: metadata.labels[app] must be a label value: empty, or letters, "
        "digits, '-', '_' and '.', starting and ending with a letter or digit, at most 63 "
        "characters",
        "VirtualService a: metadata.annotations[a] must be a string, not an integer (1)",
        "VirtualService a: metadata.resourceVersion is not supported",
        "VirtualService a: spec.http[0].timeout must be a duration such as 2s, 100ms or 1m, "
        "not an integer (5)",
    ]


def test_the_kind_picks_the_model() -> None:
    resource = parse_resource(VIRTUAL_SERVICE)
    assert isinstance(resource, VirtualService)
    assert resource.api_version == "networking.istio.io/v1"
    assert not isinstance(resource, Gateway)


def test_every_accepted_api_version() -> None:
    for api_version in VirtualService.api_versions():
        resource = parse_resource(with_field(VIRTUAL_SERVICE, "apiVersion", api_version))
        assert resource.to_document()["apiVersion"] == api_version
    assert VirtualService.api_versions() == (
        "networking.istio.io/v1",
        "networking.istio.io/v1beta1",
        "networking.istio.io/v1alpha3",
    )


def test_a_name_that_cannot_be_shown_is_not() -> None:
    document = with_field(VIRTUAL_SERVICE, "metadata.name", "evil\x1b[2J")
    assert errors(document)[0].startswith("VirtualService in <stdin>: metadata.name must be")


@pytest.mark.parametrize(
    ("loc", "path"),
    [
        (("hosts", 0), "hosts[0]"),
        (
            ("http", 0, "match", 1, "headers", "x-user", "exact"),
            "http[0].match[1].headers[x-user].exact",
        ),
        (("http", 0, "match", 0, "headers", "X_User", "[key]"), "http[0].match[0].headers[X_User]"),
        (("http", 0, "corsPolicy", "allowOrigins", 0), "http[0].corsPolicy.allowOrigins[0]"),
        (("http", 2, "mirrorPercentage", "value"), "http[2].mirrorPercentage.value"),
    ],
)
def test_field_path(loc: tuple[int | str, ...], path: str) -> None:
    assert field_path(VirtualServiceSpec, loc) == path


def test_a_typo_of_a_supported_field_is_named_with_the_field_it_is_a_typo_of() -> None:
    text = (
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: r}\n"
        "spec:\n  hosts: [r]\n  gateway: [g]\n  http:\n  - corsPolicy: {}\n    rout: []\n"
    )
    with pytest.raises(ConfigError) as refused:
        parse_documents(text)
    assert sorted(str(error) for error in refused.value.errors) == [
        "VirtualService r: spec.gateway is not supported (did you mean gateways?)",
        "VirtualService r: spec.http[0].corsPolicy is not supported",
        "VirtualService r: spec.http[0].rout is not supported (did you mean route?)",
    ]
