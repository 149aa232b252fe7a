"""The xDS state-of-the-world bookkeeping of one stream, request by request, without Envoy."""

from __future__ import annotations

from typing import Any

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2
from google.rpc import status_pb2
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from workload_api.xds import CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, ROUTE_TYPE, SECRET_TYPE
from workload_api.xds_protocol import (
    Ack,
    DiscoveryState,
    Nack,
    RequestLimits,
    Stale,
    Subscribed,
    resource_version,
)

# The generated modules build their classes at import time, out of mypy's sight.
pb: Any = discovery_pb2
MESSAGES: dict[str, Any] = {
    LISTENER_TYPE: listener_pb2.Listener, CLUSTER_TYPE: cluster_pb2.Cluster,  # type: ignore[attr-defined]
    ROUTE_TYPE: route_pb2.RouteConfiguration,  # type: ignore[attr-defined]
    ENDPOINT_TYPE: endpoint_pb2.ClusterLoadAssignment,  # type: ignore[attr-defined]
}  # fmt: skip


class Resources:
    """What the stream's ``select`` reads: type URL -> name -> packed resource."""

    def __init__(self) -> None:
        self.by_type: dict[str, dict[str, Any]] = {}

    def put(self, type_url: str, name: str, **fields: Any) -> None:
        message = MESSAGES[type_url]()
        if type_url == ENDPOINT_TYPE:
            message.cluster_name = name
        else:
            message.name = name
        for field, value in fields.items():
            setattr(message, field, value)
        packed = any_pb2.Any()
        packed.Pack(message, deterministic=True)
        self.by_type.setdefault(type_url, {})[name] = packed

    def remove(self, type_url: str, name: str) -> None:
        del self.by_type[type_url][name]

    def select(self, type_url: str, names: frozenset[str] | None) -> dict[str, Any]:
        available = self.by_type.get(type_url, {})
        if names is None:
            return dict(available)
        return {name: available[name] for name in names if name in available}


def request(type_url: str, *names: str, nonce: str = "", version: str = "",
            error: str | None = None) -> Any:
    message = pb.DiscoveryRequest(type_url=type_url, resource_names=list(names),
                                  response_nonce=nonce, version_info=version)  # fmt: skip
    if error is not None:
        message.error_detail.CopyFrom(status_pb2.Status(code=3, message=error))
    return message


def names_of(response: Any) -> list[str]:
    names = []
    for resource in response.resources:
        message = MESSAGES[response.type_url]()
        resource.Unpack(message)
        names.append(message.cluster_name if response.type_url == ENDPOINT_TYPE else message.name)
    return names


@pytest.fixture
def resources() -> Resources:
    found = Resources()
    found.put(LISTENER_TYPE, "inbound")
    found.put(LISTENER_TYPE, "outbound")
    found.put(CLUSTER_TYPE, "web")
    found.put(ENDPOINT_TYPE, "web")
    found.put(ROUTE_TYPE, "http")
    return found


def test_a_first_request_is_answered_with_every_listener_a_version_and_a_nonce(
    resources: Resources,
) -> None:
    state = DiscoveryState()
    assert state.receive(request(LISTENER_TYPE)) == [Subscribed(LISTENER_TYPE, None)]
    [response] = state.responses(resources.select)
    assert response.type_url == LISTENER_TYPE
    assert names_of(response) == ["inbound", "outbound"]
    assert response.version_info == resource_version(resources.by_type[LISTENER_TYPE].items())
    assert len(response.version_info) == 16
    assert response.nonce == "1"
    # Nothing more is due until something changes.
    assert state.responses(resources.select) == []


def test_an_ack_records_the_version_and_sends_nothing_new(resources: Resources) -> None:
    state = DiscoveryState()
    state.receive(request(CLUSTER_TYPE))
    [sent] = state.responses(resources.select)
    outcomes = state.receive(request(CLUSTER_TYPE, nonce=sent.nonce, version=sent.version_info))
    assert outcomes == [Ack(CLUSTER_TYPE, sent.version_info)]
    assert state.acked_version(CLUSTER_TYPE) == sent.version_info
    assert state.responses(resources.select) == []


def test_a_change_is_pushed_with_a_new_version_and_nonce(resources: Resources) -> None:
    state = DiscoveryState()
    state.receive(request(LISTENER_TYPE))
    [first] = state.responses(resources.select)
    state.receive(request(LISTENER_TYPE, nonce=first.nonce, version=first.version_info))
    resources.remove(LISTENER_TYPE, "outbound")

    [second] = state.responses(resources.select)
    assert names_of(second) == ["inbound"]  # a wildcard type: left out means removed
    assert second.version_info != first.version_info
    assert second.nonce == "2"


def test_a_nack_names_the_refused_and_the_kept_version_and_is_not_answered_again(
    resources: Resources,
) -> None:
    state = DiscoveryState()
    state.receive(request(LISTENER_TYPE))
    [first] = state.responses(resources.select)
    state.receive(request(LISTENER_TYPE, nonce=first.nonce, version=first.version_info))
    resources.put(LISTENER_TYPE, "broken", stat_prefix="x")
    [refused] = state.responses(resources.select)

    outcomes = state.receive(request(
        LISTENER_TYPE, nonce=refused.nonce, version=first.version_info, error="malformed IP address"
    ))
    assert outcomes == [
        Nack(LISTENER_TYPE, refused.version_info, first.version_info, "malformed IP address")
    ]
    assert state.acked_version(LISTENER_TYPE) == first.version_info
    assert state.responses(resources.select) == []  # the same resources would be refused again

    resources.remove(LISTENER_TYPE, "broken")
    [fixed] = state.responses(resources.select)
    assert fixed.version_info == first.version_info  # the same resources, the same version
    assert fixed.nonce == "3"


def test_a_request_with_an_older_nonce_is_stale_and_ignored(resources: Resources) -> None:
    state = DiscoveryState()
    state.receive(request(ENDPOINT_TYPE, "web"))
    [first] = state.responses(resources.select)
    resources.put(ENDPOINT_TYPE, "web", cluster_name="web")  # unchanged content
    resources.put(ENDPOINT_TYPE, "db")
    state.receive(request(ENDPOINT_TYPE, "web", "db", nonce=first.nonce))
    [second] = state.responses(resources.select)

    # Sent before Envoy saw the second response: its subscription counts for nothing.
    assert state.receive(request(ENDPOINT_TYPE, "other", nonce=first.nonce)) == [
        Stale(ENDPOINT_TYPE, first.nonce)
    ]
    assert state.subscriptions() == {ENDPOINT_TYPE: frozenset({"web", "db"})}
    assert names_of(second) == ["db", "web"]
    assert state.responses(resources.select) == []


def test_named_types_get_only_what_exists_of_their_names_and_nothing_while_none_does(
    resources: Resources,
) -> None:
    state = DiscoveryState()
    assert state.receive(request(ROUTE_TYPE, "missing")) == [
        Subscribed(ROUTE_TYPE, frozenset({"missing"}))
    ]
    assert state.responses(resources.select) == []  # Envoy keeps waiting

    resources.put(ROUTE_TYPE, "missing")
    [response] = state.responses(resources.select)
    assert names_of(response) == ["missing"]

    # A changed subscription is answered even when the version is the same.
    outcomes = state.receive(request(ROUTE_TYPE, "missing", "gone", nonce=response.nonce,
                                     version=response.version_info))  # fmt: skip
    assert outcomes == [Ack(ROUTE_TYPE, response.version_info),
                        Subscribed(ROUTE_TYPE, frozenset({"missing", "gone"}))]  # fmt: skip
    [again] = state.responses(resources.select)
    assert (names_of(again), again.version_info) == (["missing"], response.version_info)
    assert again.nonce != response.nonce


def test_a_wildcard_type_is_answered_even_when_empty_and_star_means_every_resource() -> None:
    empty = Resources()
    state = DiscoveryState()
    state.receive(request(CLUSTER_TYPE, "*"))
    assert state.subscriptions() == {CLUSTER_TYPE: None}
    [response] = state.responses(empty.select)
    assert list(response.resources) == []
    assert response.version_info == resource_version([])


def test_asking_again_without_a_nonce_is_answered_again(resources: Resources) -> None:
    state = DiscoveryState()
    state.receive(request(CLUSTER_TYPE))
    [first] = state.responses(resources.select)
    assert state.receive(request(CLUSTER_TYPE)) == []
    [second] = state.responses(resources.select)
    assert (second.version_info, second.nonce) == (first.version_info, "2")


def test_responses_go_out_clusters_endpoints_listeners_routes(resources: Resources) -> None:
    state = DiscoveryState()
    for type_url, names in ((ROUTE_TYPE, ["http"]), (LISTENER_TYPE, []),
                            (ENDPOINT_TYPE, ["web"]), (CLUSTER_TYPE, [])):  # fmt: skip
        state.receive(request(type_url, *names))
    assert [r.type_url for r in state.responses(resources.select)] == [
        CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, ROUTE_TYPE,
    ]  # fmt: skip


def test_the_sds_stream_reads_no_names_as_every_secret_of_its_type() -> None:
    state = DiscoveryState(wildcard_types={SECRET_TYPE}, default_type_url=SECRET_TYPE)
    assert state.receive(request("")) == [Subscribed(SECRET_TYPE, None)]
    # But an empty answer is never sent for a secret: Envoy would take it for a refusal.
    assert state.responses(Resources().select) == []


def test_a_stream_serving_only_secrets_refuses_other_types() -> None:
    state = DiscoveryState(only_types={SECRET_TYPE})
    with pytest.raises(GRPCError) as refused:
        state.receive(request(LISTENER_TYPE))
    assert (refused.value.status, refused.value.message) == (
        Status.INVALID_ARGUMENT,
        f"this discovery stream serves {SECRET_TYPE}, not {LISTENER_TYPE}; ask for it over ADS",
    )


def test_the_version_is_the_same_for_the_same_resources_on_any_stream(
    resources: Resources,
) -> None:
    versions = set()
    for _ in range(2):
        state = DiscoveryState()
        state.receive(request(LISTENER_TYPE))
        [response] = state.responses(resources.select)
        versions.add(response.version_info)
    assert len(versions) == 1


@pytest.mark.parametrize(("sent", "status", "message"), [
    (request(ENDPOINT_TYPE, *(f"c{i}" for i in range(11))), Status.RESOURCE_EXHAUSTED,
     "the request names 11 resources, more than the 10 the Tessera agent accepts in one request"),
    (request(ENDPOINT_TYPE, "x" * 21), Status.INVALID_ARGUMENT,
     "a resource name is 21 characters long, more than the 20 the Tessera agent accepts: "
     f"{'x' * 21!r}..."),
    (request("type.googleapis.com/" + "x" * 60), Status.INVALID_ARGUMENT,
     "the type_url is 80 characters long, more than the 72 the Tessera agent accepts"),
    (request(""), Status.INVALID_ARGUMENT, "a discovery request must name its type_url"),
])  # fmt: skip
def test_what_a_peer_may_ask_is_bounded(sent: Any, status: Status, message: str) -> None:
    state = DiscoveryState(limits=RequestLimits(max_resource_names=10, max_name_chars=20,
                                                max_type_url_chars=72))  # fmt: skip
    with pytest.raises(GRPCError) as refused:
        state.receive(sent)
    assert (refused.value.status, refused.value.message) == (status, message)


def test_a_stream_may_subscribe_to_a_bounded_number_of_types() -> None:
    state = DiscoveryState(limits=RequestLimits(max_types=2))
    state.receive(request(LISTENER_TYPE))
    state.receive(request(CLUSTER_TYPE))
    with pytest.raises(GRPCError) as refused:
        state.receive(request(ROUTE_TYPE, "http"))
    assert refused.value.status == Status.RESOURCE_EXHAUSTED
    assert refused.value.message == (
        "one discovery stream may subscribe to at most 2 resource types"
    )
