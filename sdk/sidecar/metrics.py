"""The sidecars' Prometheus metrics, each sidecar in a registry of its own (served on ``/metrics``).

Proxy (``tessera sidecar proxy``), labelled by ``listener`` (its ``name``, by
default ``inbound[0]``, ``outbound[1]``...):

=================================================  ==========================================
``tessera_sidecar_connections_total``              connections accepted
``tessera_sidecar_open_connections``               connections open now
``tessera_sidecar_bytes_total{direction}``         ``in``: read from the accepted connection;
                                                   ``out``: written back to it
``tessera_sidecar_handshake_seconds``              TLS handshakes that succeeded (histogram)
``tessera_sidecar_handshake_failures_total``       by ``reason``: ``refused`` (by the policy or
                                                   the upstream's ID), ``refused_by_upstream``
                                                   (the upstream closed right after the
                                                   handshake), ``unauthenticated`` (no SVID,
                                                   wrong trust domain), ``no_identity`` (this
                                                   sidecar holds none), ``tls``, ``timeout``,
                                                   ``closed``
``tessera_sidecar_decisions_total``                by ``stage`` (``handshake``, ``request``),
                                                   ``rule`` and ``result`` (``allowed``,
                                                   ``refused``)
``tessera_sidecar_forward_failures_total``         the app or the upstream could not be reached
=================================================  ==========================================

Files (``tessera sidecar files``): ``tessera_sidecar_svid_writes_total``,
``tessera_sidecar_svid_write_failures_total``, ``tessera_sidecar_reloads_total{result}``.

Both: ``tessera_sidecar_svid_expiry_timestamp_seconds``, when the SVID in use expires.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

__all__ = ["FilesMetrics", "ProxyMetrics", "SvidMetrics", "Tally"]

HANDSHAKE_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class SvidMetrics:
    """The SVID's expiry, in a registry of the process's own: what every sidecar serves."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.svid_expiry = Gauge(
            "tessera_sidecar_svid_expiry_timestamp_seconds",
            "UNIX time the SVID the sidecar uses expires",
            registry=self.registry,
        )

    def exposition(self) -> bytes:
        """The Prometheus text format of every metric."""
        return generate_latest(self.registry)


class Tally:
    """One counter series' increments added up in a plain ``int`` and handed to the counter
    whenever the registry is read (``/metrics``).

    For what moves on every read and write of a connection: a counter's ``inc`` takes a
    lock and a few calls each time, which on the built-in proxy's data path cost more than
    the rest of the bookkeeping of a request. The event loop's thread adds and reads, so no
    lock is needed.
    """

    __slots__ = ("_series", "pending")

    def __init__(self, series: Counter) -> None:
        self._series = series
        self.pending = 0

    def add(self, amount: int) -> None:
        self.pending += amount

    def settle(self) -> None:
        """Hand what was added up to the counter."""
        if amount := self.pending:
            self.pending = 0
            self._series.inc(amount)


class _Settle(Collector):
    """Registered before the counters: settles the tallies each time the registry is read,
    so what ``/metrics`` shows is never behind."""

    def __init__(self) -> None:
        self.tallies: list[Tally] = []

    def collect(self) -> Iterator[Metric]:
        for tally in self.tallies:
            tally.settle()
        return iter(())


class ProxyMetrics(SvidMetrics):
    def __init__(self) -> None:
        super().__init__()
        registry = self.registry
        self._settle = _Settle()
        registry.register(self._settle)
        self._tallies: dict[tuple[str, str], Tally] = {}
        self._decided: dict[tuple[str, str, str, bool], Tally] = {}
        """Decisions by listener, stage, rule and result: one per request on an HTTP
        listener, so tallied too (rules come from the configuration: a bounded set)."""
        self.connections = Counter(
            "tessera_sidecar_connections", "Connections accepted", ["listener"], registry=registry
        )
        self.open_connections = Gauge(
            "tessera_sidecar_open_connections", "Connections open now", ["listener"],
            registry=registry,
        )  # fmt: skip
        self.bytes = Counter(
            "tessera_sidecar_bytes",
            "Bytes read from (in) and written to (out) the accepted connections",
            ["listener", "direction"],
            registry=registry,
        )
        self.handshake_seconds = Histogram(
            "tessera_sidecar_handshake_seconds",
            "Duration of the TLS handshakes that succeeded",
            ["listener"],
            buckets=HANDSHAKE_BUCKETS,
            registry=registry,
        )
        self.handshake_failures = Counter(
            "tessera_sidecar_handshake_failures",
            "TLS handshakes that failed, by reason",
            ["listener", "reason"],
            registry=registry,
        )
        self.decisions = Counter(
            "tessera_sidecar_decisions",
            "Authorization decisions, by stage, deciding rule and result",
            ["listener", "stage", "rule", "result"],
            registry=registry,
        )
        self.forward_failures = Counter(
            "tessera_sidecar_forward_failures",
            "Connections to the local app or the upstream that could not be made",
            ["listener"],
            registry=registry,
        )

    def register_listener(self, listener: str) -> None:
        """Create the listener's series at zero, so they show before the first connection."""
        self.connections.labels(listener)
        self.open_connections.labels(listener)
        self.forward_failures.labels(listener)
        for direction in ("in", "out"):
            self.bytes.labels(listener, direction)

    def bytes_tally(self, listener: str, direction: str) -> Tally:
        """The ``tessera_sidecar_bytes_total`` series of ``listener`` and ``direction`` (``in``,
        ``out``), as a :class:`Tally`."""
        tally = self._tallies.get((listener, direction))
        if tally is None:
            tally = Tally(self.bytes.labels(listener, direction))
            self._tallies[listener, direction] = tally
            self._settle.tallies.append(tally)
        return tally

    def decision(self, listener: str, stage: str, rule: str, allowed: bool) -> None:
        tally = self._decided.get((listener, stage, rule, allowed))
        if tally is None:
            result = "allowed" if allowed else "refused"
            tally = Tally(self.decisions.labels(listener, stage, rule, result))
            self._decided[listener, stage, rule, allowed] = tally
            self._settle.tallies.append(tally)
        tally.pending += 1


class FilesMetrics(SvidMetrics):
    def __init__(self) -> None:
        super().__init__()
        self.writes = Counter(
            "tessera_sidecar_svid_writes", "Times the SVID files were written",
            registry=self.registry,
        )  # fmt: skip
        self.write_failures = Counter(
            "tessera_sidecar_svid_write_failures", "Times writing the SVID files failed",
            registry=self.registry,
        )  # fmt: skip
        self.reloads = Counter(
            "tessera_sidecar_reloads",
            "Commands run or signals sent after a write, by result (ok, failed)",
            ["result"],
            registry=self.registry,
        )
        for result in ("ok", "failed"):
            self.reloads.labels(result)
