"""Who calls whom in the mesh, how much, how often it fails and how slowly: the console's
topology graph.

Edges come from the proxies' request metrics as Prometheus holds them (the series
every sidecar's inbound listener counts, labelled by the caller's SPIFFE ID and the
Service called, :mod:`dataplane.telemetry`), over a window (:func:`edge_queries`);
nodes are the Services of the catalog plus any caller that is not one of them (a
gateway, a workload outside the mesh). Callers are mapped to Services by the SPIFFE IDs
their instances registered with.

The layout is drawn here rather than by a graph library: a mesh view is a few dozen
nodes in call order, which columns by call depth lay out legibly (:func:`layout`), and
it keeps the console free of browser-side dependencies. The Python graph-layout
packages either need numpy (networkx's layered layouts) or are no longer maintained.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

REQUESTS = "tessera_sidecar_requests_total"
DURATIONS = "tessera_sidecar_request_duration_seconds_bucket"

NODE_WIDTH = 200
NODE_HEIGHT = 48
COLUMN_GAP = 220
ROW_GAP = 36
MARGIN = 24


def edge_queries(window: str) -> dict[str, str]:
    """The PromQL for each figure of an edge, over ``window`` (a Prometheus duration)."""
    inbound = 'listener="inbound"'
    by = "sum by (source, destination)"
    return {
        "rate": f"{by} (rate({REQUESTS}{{{inbound}}}[{window}]))",
        "errors": f'{by} (rate({REQUESTS}{{{inbound},code_class="5xx"}}[{window}]))',
        "p99": (
            "histogram_quantile(0.99, sum by (source, destination, le) "
            f"(rate({DURATIONS}{{{inbound}}}[{window}])))"
        ),
    }


@dataclass
class Edge:
    source: str
    """The calling node's name: a Service, or the caller's SPIFFE ID."""
    destination: str
    rate: float = 0.0
    """Requests per second."""
    errors: float = 0.0
    """5xx answers per second."""
    p99: float | None = None
    """Seconds; None when no request was timed."""

    @property
    def error_ratio(self) -> float:
        return self.errors / self.rate if self.rate > 0 else 0.0

    @property
    def health(self) -> str:
        """``ok``, ``degraded`` (≥1% of answers are 5xx) or ``failing`` (≥10%)."""
        if self.error_ratio >= 0.10:
            return "failing"
        return "degraded" if self.error_ratio >= 0.01 else "ok"

    def label(self) -> str:
        return f"{self.rate:.3g} req/s · {self.detail()}"

    def detail(self) -> str:
        p99 = "-" if self.p99 is None else _milliseconds(self.p99)
        return f"{self.error_ratio:.1%} 5xx · p99 {p99}"


@dataclass
class Node:
    name: str
    kind: str
    """``service`` (in the catalog or configuration) or ``caller`` (anything else)."""
    instances: int = 0
    healthy: int = 0
    unhealthy: int = 0
    x: int = 0
    y: int = 0

    @property
    def health(self) -> str:
        if self.kind != "service":
            return "external"
        if self.instances == 0:
            return "none"
        return "degraded" if self.unhealthy else "ok"

    def summary(self) -> str:
        """``2/3 healthy``; instances whose health is not checked are counted apart."""
        if self.instances == 0:
            return "no instance registered"
        unchecked = self.instances - self.healthy - self.unhealthy
        text = f"{self.healthy}/{self.instances} healthy"
        return text + (f" · {unchecked} unchecked" if unchecked else "")


@dataclass
class Graph:
    nodes: dict[str, Node] = field(default_factory=dict)
    edges: list[Edge] = field(default_factory=list)
    width: int = 0
    height: int = 0

    def path(self, edge: Edge) -> str:
        """An SVG path from the caller's right side to the callee's left (or a loop back)."""
        a, b = self.nodes[edge.source], self.nodes[edge.destination]
        x1, y1 = a.x + NODE_WIDTH, a.y + NODE_HEIGHT // 2
        x2, y2 = b.x, b.y + NODE_HEIGHT // 2
        if x2 > x1:
            bend = (x2 - x1) // 2
            return f"M{x1},{y1} C{x1 + bend},{y1} {x2 - bend},{y2} {x2},{y2}"
        # To the same column or back: around below.
        low = max(a.y, b.y) + NODE_HEIGHT + ROW_GAP // 2
        return (f"M{x1},{y1} C{x1 + 60},{y1} {x1 + 60},{low} {(x1 + x2) // 2},{low} "
                f"S{x2 - 60},{y2} {x2},{y2}")

    def label_at(self, edge: Edge) -> tuple[int, int]:
        a, b = self.nodes[edge.source], self.nodes[edge.destination]
        x = (a.x + NODE_WIDTH + b.x) // 2
        y = (a.y + b.y) // 2 + NODE_HEIGHT // 2 - 22  # two lines, above the edge
        if b.x <= a.x:
            y = max(a.y, b.y) + NODE_HEIGHT + ROW_GAP // 2 - 6
        return x, y


def service_names(instances: Iterable[Mapping[str, object]]) -> dict[str, str]:
    """SPIFFE ID → Service, from the catalog's instances (``/v1/mesh/services``)."""
    names: dict[str, str] = {}
    for instance in instances:
        spiffe_id, service = instance.get("spiffeId"), instance.get("service")
        if isinstance(spiffe_id, str) and isinstance(service, str):
            names.setdefault(spiffe_id, service)
    return names


def build(
    services: Iterable[str],
    instances: Iterable[Mapping[str, object]],
    figures: Mapping[str, list[tuple[dict[str, str], float]]],
) -> Graph:
    """The graph of ``services`` (every Service configured or registered), their
    ``instances`` and the samples of each of :func:`edge_queries`' figures."""
    instances = list(instances)
    graph = Graph()
    for name in services:
        graph.nodes[name] = Node(name, "service")
    for instance in instances:
        name = str(instance.get("service"))
        node = graph.nodes.setdefault(name, Node(name, "service"))
        node.instances += 1
        node.healthy += instance.get("health") == "healthy"
        node.unhealthy += instance.get("health") == "unhealthy"
    names = service_names(instances)
    edges: dict[tuple[str, str], Edge] = {}
    for figure, samples in figures.items():
        for labels, value in samples:
            caller = labels.get("source", "unknown")
            source = names.get(caller, caller)
            destination = labels.get("destination", "")
            if not destination or destination == "other":
                continue
            edge = edges.setdefault((source, destination), Edge(source, destination))
            if figure == "rate":
                edge.rate += value
            elif figure == "errors":
                edge.errors += value
            elif figure == "p99":
                edge.p99 = value if edge.p99 is None else max(edge.p99, value)
    for edge in edges.values():
        for name in (edge.source, edge.destination):
            graph.nodes.setdefault(name, Node(name, "service" if name in names.values()
                                              else "caller"))
    graph.edges = sorted(edges.values(), key=lambda e: (e.source, e.destination))
    layout(graph)
    return graph


def layout(graph: Graph) -> None:
    """Columns by call depth: a node sits one column right of its deepest caller
    (cycles broken by visiting order); rows in name order within a column."""
    callers: dict[str, set[str]] = {name: set() for name in graph.nodes}
    for edge in graph.edges:
        if edge.source != edge.destination:
            callers[edge.destination].add(edge.source)
    depth: dict[str, int] = {}

    def visit(name: str, seen: frozenset[str]) -> int:
        if name in depth:
            return depth[name]
        ahead = [visit(c, seen | {name}) + 1 for c in sorted(callers[name]) if c not in seen]
        depth[name] = max(ahead, default=0)
        return depth[name]

    for name in sorted(graph.nodes):
        visit(name, frozenset())
    columns: dict[int, list[str]] = {}
    for name in sorted(graph.nodes, key=lambda n: (graph.nodes[n].kind != "caller", n)):
        columns.setdefault(depth[name], []).append(name)
    tallest = max((len(c) for c in columns.values()), default=0)
    for column, names in columns.items():
        for row, name in enumerate(names):
            node = graph.nodes[name]
            node.x = MARGIN + column * (NODE_WIDTH + COLUMN_GAP)
            node.y = MARGIN + row * (NODE_HEIGHT + ROW_GAP)
    graph.width = 2 * MARGIN + max(len(columns), 1) * (NODE_WIDTH + COLUMN_GAP) - COLUMN_GAP
    # Room below the lowest row for edges that go back around it.
    graph.height = 2 * MARGIN + max(tallest, 1) * (NODE_HEIGHT + ROW_GAP)


def _milliseconds(seconds: float) -> str:
    ms = seconds * 1000
    return f"{ms:.3g} ms" if ms < 1000 else f"{seconds:.3g} s"
