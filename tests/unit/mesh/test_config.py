"""The configuration an apply leaves: created / configured / unchanged, nothing on error."""

from __future__ import annotations

import pytest

from mesh import (
    Change,
    Config,
    ConfigError,
    DestinationRule,
    Gateway,
    Service,
    VirtualService,
    parse_documents,
)
from tests.unit.mesh.documents import MISSION, USERS_SERVICE


def applied(*texts: str) -> Config:
    config = Config()
    for text in texts:
        config, _ = config.apply(parse_documents(text))
    return config


def test_apply_reports_created_configured_unchanged() -> None:
    config, changes = Config().apply(parse_documents(USERS_SERVICE + "---\n" + MISSION))
    assert [str(change) for change in changes] == [
        "Service users-service created",
        "Gateway microservice-gateway created",
        "VirtualService microservice-virtual-service created",
    ]
    changed_gateway = MISSION.replace('hosts: ["*"]\n---', 'hosts: ["*"]\n    name: web\n---')
    assert changed_gateway != MISSION
    config, changes = config.apply(parse_documents(USERS_SERVICE + "---\n" + changed_gateway))
    assert changes == [
        Change("Service", "users-service", "unchanged"),
        Change("Gateway", "microservice-gateway", "configured"),
        Change("VirtualService", "microservice-virtual-service", "unchanged"),
    ]
    assert len(config) == 3


def test_the_same_document_written_differently_is_unchanged() -> None:
    config = applied(USERS_SERVICE)
    flow = (
        "{apiVersion: tessera.io/v1alpha1, kind: Service, metadata: {name: users-service},"
        " spec: {healthCheck: {interval: 2s, http: {path: /healthz}},"
        " ports: [{protocol: HTTP, name: http, number: 80}],"
        " spiffeIds: ['spiffe://example.org/users']}}"
    )
    _, changes = config.apply(parse_documents(flow))
    assert changes == [Change("Service", "users-service", "unchanged")]


def test_a_reference_to_something_missing_changes_nothing() -> None:
    config = applied()
    with pytest.raises(ConfigError) as caught:
        config.apply(parse_documents(MISSION))
    assert str(caught.value) == (
        "VirtualService microservice-virtual-service: spec.http[0].route[0].destination.host: "
        "host users-service names no Service"
    )
    assert len(config) == 0


def test_a_reference_may_be_to_what_was_applied_before() -> None:
    config = applied(USERS_SERVICE, MISSION)
    assert config.get(Service, "users-service") is not None
    assert config.get(VirtualService, "microservice-virtual-service") is not None


def test_one_resource_twice_in_one_apply() -> None:
    [service] = parse_documents(USERS_SERVICE)
    with pytest.raises(ConfigError) as caught:
        Config().apply([service, service])
    assert str(caught.value) == "Service users-service is defined twice in this apply"


def test_delete_refuses_what_is_still_referred_to() -> None:
    config = applied(USERS_SERVICE, MISSION)
    with pytest.raises(ConfigError) as caught:
        config.delete(Service, "users-service")
    assert str(caught.value) == (
        "VirtualService microservice-virtual-service: spec.http[0].route[0].destination.host: "
        "host users-service names no Service"
    )
    with pytest.raises(ConfigError) as caught:
        config.delete(Gateway, "microservice-gateway")
    assert str(caught.value) == (
        "VirtualService microservice-virtual-service: spec.gateways[0]: Gateway "
        "microservice-gateway does not exist"
    )
    smaller = config.delete(VirtualService, "microservice-virtual-service")
    smaller = smaller.delete(Service, "users-service")
    assert [resource.key for resource in smaller] == [("Gateway", "microservice-gateway")]
    assert len(config) == 3  # unchanged


def test_delete_of_what_does_not_exist() -> None:
    with pytest.raises(ConfigError) as caught:
        Config().delete(DestinationRule, "reviews")
    assert str(caught.value) == "DestinationRule reviews does not exist"


def test_a_problem_already_stored_does_not_block_an_unrelated_apply() -> None:
    # As a configuration stored before a check existed would be.
    stored = Config(parse_documents(MISSION))
    assert [str(error) for error in stored.check()] == [
        "VirtualService microservice-virtual-service: spec.http[0].route[0].destination.host: "
        "host users-service names no Service"
    ]
    rate_limit = USERS_SERVICE.replace("users-service", "orders")
    config, changes = stored.apply(parse_documents(rate_limit))
    assert changes == [Change("Service", "orders", "created")]
    assert len(config.check()) == 1


def test_documents_in_kind_then_name_order() -> None:
    config = applied(USERS_SERVICE, MISSION)
    documents = config.to_documents()
    assert [(d["kind"], d["metadata"]["name"]) for d in documents] == [
        ("Gateway", "microservice-gateway"),
        ("VirtualService", "microservice-virtual-service"),
        ("Service", "users-service"),
    ]
    assert Config(parse_documents(USERS_SERVICE + "---\n" + MISSION)) == config
    assert Config() != config


def test_typed_access() -> None:
    config = applied(USERS_SERVICE, MISSION)
    service = config.get(Service, "users-service")
    assert service is not None and service.spec.ports[0].number == 80
    assert config.get(Gateway, "users-service") is None
    assert config.of_kind(Gateway)[0].name == "microservice-gateway"
    assert ("Service", "users-service") in config
    assert repr(config) == "Config(3 resources)"


def test_a_stored_configuration_with_a_name_twice_is_refused() -> None:
    with pytest.raises(ConfigError) as caught:
        Config(parse_documents(USERS_SERVICE) * 2)
    assert str(caught.value) == "Service users-service is defined twice"
