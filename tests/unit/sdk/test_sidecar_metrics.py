"""The sidecar's metrics: byte counts added up per read and write, exact whenever read."""

from __future__ import annotations

from sdk.sidecar.metrics import ProxyMetrics


def _bytes(metrics: ProxyMetrics, direction: str) -> float | None:
    return metrics.registry.get_sample_value(
        "tessera_sidecar_bytes_total", {"listener": "inbound[0]", "direction": direction}
    )


def test_tallied_bytes_are_on_metrics_whenever_they_are_read() -> None:
    metrics = ProxyMetrics()
    metrics.register_listener("inbound[0]")
    received = metrics.bytes_tally("inbound[0]", "in")
    assert received is metrics.bytes_tally("inbound[0]", "in")  # one per series
    assert _bytes(metrics, "in") == 0.0
    received.add(120)
    received.add(5)
    metrics.bytes_tally("inbound[0]", "out").add(4096)
    assert _bytes(metrics, "in") == 125.0 and _bytes(metrics, "out") == 4096.0
    assert b'tessera_sidecar_bytes_total{direction="in",listener="inbound[0]"} 125.0' in (
        metrics.exposition()
    )
    received.add(1)  # settled once, counted once: the next read adds only what is new
    assert _bytes(metrics, "in") == 126.0


def test_decisions_are_counted_by_rule_and_result_whenever_read() -> None:
    metrics = ProxyMetrics()
    for allowed in (True, True, False):
        metrics.decision("inbound[0]", "request", "allow-web", allowed)
    labels = {"listener": "inbound[0]", "stage": "request", "rule": "allow-web"}
    value = metrics.registry.get_sample_value
    assert value("tessera_sidecar_decisions_total", {**labels, "result": "allowed"}) == 2.0
    assert value("tessera_sidecar_decisions_total", {**labels, "result": "refused"}) == 1.0
