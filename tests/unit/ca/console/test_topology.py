"""The console's topology graph from the proxies' request metrics."""

from __future__ import annotations

from ca.console import topology

INSTANCES = [
    {"service": "web", "spiffeId": "spiffe://td/web", "health": "healthy"},
    {"service": "users", "spiffeId": "spiffe://td/users", "health": "healthy"},
    {"service": "users", "spiffeId": "spiffe://td/users", "health": "unhealthy"},
]


def test_callers_are_mapped_to_services_and_figures_joined_per_edge() -> None:
    figures = {
        "rate": [({"source": "spiffe://td/web", "destination": "users"}, 10.0),
                 ({"source": "spiffe://td/gateway", "destination": "web"}, 4.0),
                 ({"source": "other", "destination": "other"}, 1.0)],
        "errors": [({"source": "spiffe://td/web", "destination": "users"}, 0.5)],
        "p99": [({"source": "spiffe://td/web", "destination": "users"}, 0.0123)],
    }
    graph = topology.build(["billing", "users", "web"], INSTANCES, figures)
    edges = {(e.source, e.destination): e for e in graph.edges}
    assert set(edges) == {("spiffe://td/gateway", "web"), ("web", "users")}
    web_users = edges["web", "users"]
    assert (web_users.rate, web_users.errors, web_users.p99) == (10.0, 0.5, 0.0123)
    assert web_users.health == "degraded"
    assert web_users.label() == "10 req/s · 5.0% 5xx · p99 12.3 ms"
    assert edges["spiffe://td/gateway", "web"].label() == "4 req/s · 0.0% 5xx · p99 -"
    nodes = graph.nodes
    assert (nodes["users"].instances, nodes["users"].healthy, nodes["users"].health) == (
        2, 1, "degraded")
    assert nodes["users"].summary() == "1/2 healthy"
    assert nodes["billing"].health == "none"
    assert nodes["billing"].summary() == "no instance registered"
    unchecked = topology.build([], [{"service": "web", "health": "unknown"}], {})
    assert unchecked.nodes["web"].health == "ok"
    assert unchecked.nodes["web"].summary() == "0/1 healthy · 1 unchecked"
    assert nodes["spiffe://td/gateway"].kind == "caller"


def test_columns_follow_call_depth_and_cycles_end() -> None:
    figures = {"rate": [
        ({"source": "spiffe://td/web", "destination": "users"}, 1.0),
        ({"source": "spiffe://td/users", "destination": "web"}, 1.0),  # a cycle
        ({"source": "spiffe://td/users", "destination": "db"}, 1.0),
    ]}
    instances = [*INSTANCES, {"service": "db", "spiffeId": "spiffe://td/db",
                              "health": "healthy"}]
    graph = topology.build([], instances, figures)
    columns = {name: node.x for name, node in graph.nodes.items()}
    assert columns["web"] < columns["users"] < columns["db"]
    assert graph.width >= columns["db"] + topology.NODE_WIDTH
    # A call back to an earlier column goes around below both nodes.
    back = next(e for e in graph.edges if e.source == "users" and e.destination == "web")
    assert " S" in graph.path(back)


def test_the_queries_read_the_inbound_listeners_over_the_window() -> None:
    queries = topology.edge_queries("30s")
    assert queries["rate"] == ('sum by (source, destination) (rate('
                               'tessera_sidecar_requests_total{listener="inbound"}[30s]))')
    assert 'code_class="5xx"' in queries["errors"]
    assert queries["p99"].startswith("histogram_quantile(0.99, sum by (source, destination, le)")
