"""The server's memory of the NACKs agents report: replaced by each report, gone with the
agent's lease, and found for a Service from its sidecars and the gateways routing to it."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from ca.proxy_rejections import ProxyRejection, ProxyRejections, type_name
from mesh import Config, parse_documents
from mesh.catalog import Catalog
from sdk.clock import ManualClock
from tests.unit.mesh.documents import MISSION, USERS_SERVICE

START = datetime(2030, 1, 1, tzinfo=UTC)
LEASE = timedelta(seconds=30)
AGENT_A = "spiffe://example.org/tessera/agent/x509pop/a"
AGENT_B = "spiffe://example.org/tessera/agent/x509pop/b"
LISTENERS = "type.googleapis.com/envoy.config.listener.v3.Listener"
ROUTES = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
ORDERS = USERS_SERVICE.replace("users-service", "orders").replace("/users]", "/orders]")


def rejection(agent: str = AGENT_A, *, proxy: str = "sidecar", service: str = "users-service",
              labels: dict[str, str] | None = None, type_url: str = LISTENERS,
              node_id: str = "sidecar~n1~users-service~15006", seconds: int = 0
              ) -> ProxyRejection:  # fmt: skip
    return ProxyRejection(
        agent=agent, node_id=node_id, proxy=proxy, service=service, labels=labels or {},
        spiffe_id="", type_url=type_url, version="7",
        reason="malformed IP address: localhost", at=START + timedelta(seconds=seconds),
    )  # fmt: skip


def config(text: str) -> Config:
    return Config(parse_documents(text, source="mesh.yaml"))


def test_each_report_replaces_the_agents_list_and_it_goes_with_the_lease() -> None:
    clock = ManualClock(START)
    kept = ProxyRejections(clock)
    first, second = rejection(), rejection(type_url=ROUTES, seconds=1)
    kept.report(AGENT_A, [first, second], lease=LEASE)
    kept.report(AGENT_B, [rejection(AGENT_B, seconds=2)], lease=LEASE)
    assert kept.current() == [first, second, rejection(AGENT_B, seconds=2)]

    # The listeners' NACK was superseded by an ACK: A's next report leaves it out.
    kept.report(AGENT_A, [second], lease=LEASE)
    assert [(r.agent, r.type_url) for r in kept.current()] == [
        (AGENT_A, ROUTES),
        (AGENT_B, LISTENERS),
    ]
    clock.advance(timedelta(seconds=20))
    kept.report(AGENT_B, [rejection(AGENT_B, seconds=2)], lease=LEASE)  # B renews
    clock.advance(timedelta(seconds=10))  # A's lease runs out: it stopped reporting
    assert [r.agent for r in kept.current()] == [AGENT_B]
    kept.report(AGENT_B, [], lease=LEASE)  # nothing standing any more
    assert kept.current() == []


def test_a_service_sees_its_sidecars_and_the_gateways_routing_to_it() -> None:
    kept = ProxyRejections(ManualClock(START))
    mine = rejection()
    other_service = rejection(service="orders", node_id="sidecar~n1~orders~15007")
    gateway = rejection(
        proxy="gateway",
        service="",
        labels={"istio": "ingressgateway"},
        node_id="gateway~n1",
        seconds=1,
    )
    other_gateway = rejection(
        proxy="gateway", service="", labels={"istio": "egress"}, node_id="gateway~n2", seconds=2
    )
    unknown = rejection(proxy="", node_id="handwritten")
    kept.report(AGENT_A, [mine, other_service, gateway, other_gateway, unknown], lease=LEASE)
    mesh = config(USERS_SERVICE + "---\n" + ORDERS + "---\n" + MISSION)

    assert kept.of_service(mesh, Catalog(), "users-service") == [mine, gateway]
    assert kept.of_service(mesh, Catalog(), "orders") == [other_service]


def test_the_json_describe_answers_with() -> None:
    assert rejection().to_json() == {
        "agent": AGENT_A,
        "node_id": "sidecar~n1~users-service~15006",
        "proxy": "sidecar",
        "service": "users-service",
        "labels": {},
        "spiffe_id": "",
        "type": "listeners",
        "type_url": LISTENERS,
        "version": "7",
        "reason": "malformed IP address: localhost",
        "at": START.isoformat(),
    }
    assert type_name(ROUTES) == "routes"
    assert type_name("type.googleapis.com/envoy.Other") == "envoy.Other"
