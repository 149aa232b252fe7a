"""Multi-document text to resources: every error of every document, duplicates."""

from __future__ import annotations

import json

import pytest

from mesh import ConfigError, Gateway, VirtualService, parse_documents
from tests.unit.mesh.documents import MISSION, USERS_SERVICE, VIRTUAL_SERVICE


def test_the_mission_s_example_parses() -> None:
    gateway, virtual_service = parse_documents(MISSION)
    assert isinstance(gateway, Gateway)
    assert isinstance(virtual_service, VirtualService)
    assert virtual_service.spec.gateways == ("microservice-gateway",)
    [route] = virtual_service.spec.http
    assert route.match is not None and route.match[0].uri is not None
    assert route.match[0].uri.exact == "/api/v1/users"
    assert route.route is not None
    destination = route.route[0].destination
    assert destination.host == "users-service"
    assert destination.port is not None and destination.port.number == 80


def test_bytes_and_json_are_read_too() -> None:
    assert len(parse_documents(MISSION.encode())) == 2
    assert parse_documents(json.dumps(VIRTUAL_SERVICE))[0].name == "microservice-virtual-service"


WRITTEN_IN_ITS_OWN_ORDER = """\
kind: DestinationRule
metadata: {labels: {tier: web, app: reviews}, name: reviews}
apiVersion: networking.istio.io/v1
spec:
  subsets:
  - labels: {version: v1}
    name: v1
  host: reviews
"""


def test_a_resource_gives_its_keys_back_in_the_order_they_were_written() -> None:
    [resource] = parse_documents(WRITTEN_IN_ITS_OWN_ORDER)
    document = resource.to_document()
    assert list(document) == ["kind", "metadata", "apiVersion", "spec"]
    assert list(document["metadata"]) == ["labels", "name"]
    assert list(document["metadata"]["labels"]) == ["tier", "app"]
    assert list(document["spec"]) == ["subsets", "host"]
    assert list(document["spec"]["subsets"][0]) == ["labels", "name"]
    # Stored as JSON text and read back, as the server does: the same order again.
    [stored] = parse_documents(json.dumps(document))
    assert json.dumps(stored.to_document()) == json.dumps(document)


def test_the_order_of_keys_is_not_content() -> None:
    [resource] = parse_documents(WRITTEN_IN_ITS_OWN_ORDER)
    [sorted_keys] = parse_documents(json.dumps(resource.to_document(), sort_keys=True))
    assert sorted_keys == resource
    assert list(sorted_keys.to_document()) == ["apiVersion", "kind", "metadata", "spec"]


def test_nothing_to_parse() -> None:
    assert parse_documents("") == []
    assert parse_documents("---\n# nothing yet\n") == []


BROKEN = """\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: microservice-virtual-service}
spec:
  hosts: ["*"]
  http:
  - corsPolicy: {allowOrigins: [{exact: "*"}]}
    route:
    - destination: {host: users-service}
      weight: 60
    - destination: {host: orders}
      weight: 30
---
- just a list
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: external}
---
apiVersion: tessera.io/v1alpha1
kind: Service
metadata: {name: users-service}
spec:
  spiffeIds: [spiffe://example.org/users]
  ports: [{number: "80", protocol: HTTP}]
"""


def test_every_error_of_every_document_at_once() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_documents(BROKEN, source="mesh.yaml")
    assert str(caught.value).splitlines() == [
        "VirtualService microservice-virtual-service: spec.http[0].route must have weights "
        "that add up to 100, not 90 (with several destinations, one without a weight counts "
        "as 0)",
        "VirtualService microservice-virtual-service: spec.http[0].corsPolicy is not supported",
        "mesh.yaml document 2 is a list, not a mapping: each document is one resource with "
        "apiVersion, kind, metadata and spec",
        "mesh.yaml document 3: kind must be one of Gateway, VirtualService, DestinationRule, "
        "AuthorizationPolicy, RequestAuthentication, Service, RateLimit, not 'ServiceEntry'",
        "Service users-service: spec.ports[0].number must be an integer, not a string ('80')",
    ]
    documents = [(error.source, error.document) for error in caught.value.errors]
    assert documents == [
        ("mesh.yaml", 1),
        ("mesh.yaml", 1),
        ("mesh.yaml", 2),
        ("mesh.yaml", 3),
        ("mesh.yaml", 4),
    ]


def test_the_same_kind_and_name_twice_is_refused() -> None:
    text = "\n---\n".join([USERS_SERVICE, MISSION, USERS_SERVICE.replace("80", "8080")])
    with pytest.raises(ConfigError) as caught:
        parse_documents(text, source="mesh.yaml")
    assert str(caught.value) == (
        "Service users-service is defined twice in mesh.yaml (documents 1 and 4)"
    )


def test_a_namespace_does_not_make_another_resource() -> None:
    other = USERS_SERVICE.replace("{name: users-service}", "{name: users-service, namespace: b}")
    with pytest.raises(ConfigError) as caught:
        parse_documents(USERS_SERVICE + "---\n" + other)
    assert str(caught.value) == (
        "Service users-service is defined twice in <stdin> (documents 1 and 2)"
    )
