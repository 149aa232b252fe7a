"""Per-request telemetry of the built-in proxy: what Envoy's stats, access log and tracer give.

Every request a built-in proxy answers (inbound, outbound, gateway) ends in one
:class:`RequestRecord`, handed to :meth:`RequestTelemetry.finish`::

    telemetry = RequestTelemetry(registry, access_log=sys.stdout)
    trace = telemetry.start(incoming_traceparent)     # continued, or a new trace
    upstream_headers.append(("traceparent", trace.traceparent))
    ...
    telemetry.finish(RequestRecord(...), trace)

SKELETON: records nothing yet.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TextIO

__all__ = ["RequestRecord", "RequestTelemetry", "Trace"]


@dataclass
class RequestRecord:
    """One request as the proxy handled it (the access log's fields, Envoy's names)."""

    listener: str
    """``inbound``, ``outbound`` or a gateway listener's name."""
    start_time: float
    """Wall-clock seconds since the epoch when the request head was read."""
    duration: float
    """Seconds from the request head to the last byte of the response."""
    method: str
    path: str
    authority: str | None
    status: int
    source: str | None = None
    """The caller's SPIFFE ID (inbound, gateway with mTLS), else None."""
    destination_service: str | None = None
    route: str | None = None
    """The route's source (``VirtualService users spec.http[0]``), or None."""
    upstream_cluster: str | None = None
    upstream_host: str | None = None
    upstream_peer: str | None = None
    """The upstream's SPIFFE ID as its certificate proved it."""
    response_flags: str = "-"
    """Envoy's flags: ``UF`` connect failure, ``UO`` overflow (circuit breaker), ``UT``
    timeout, ``URX`` retries exhausted, ``RL`` rate limited, ``NR`` no route, ``UH`` no
    healthy upstream, ``UC`` upstream connection termination, ``DC`` downstream closed."""
    response_code_details: str = ""
    bytes_received: int = 0
    bytes_sent: int = 0
    request_id: str | None = None
    attempts: int = 1


@dataclass(frozen=True)
class Trace:
    """One request's place in a trace (W3C Trace Context)."""

    trace_id: str
    span_id: str
    parent_span_id: str | None
    sampled: bool

    @property
    def traceparent(self) -> str:
        """The ``traceparent`` to send upstream: this request's span as the parent."""
        return f"00-{self.trace_id}-{self.span_id}-{'01' if self.sampled else '00'}"


class RequestTelemetry:
    def __init__(self, registry: Any = None, *, access_log: TextIO | None = None) -> None:
        self._access_log = access_log

    def start(self, traceparent: str | None) -> Trace:
        return Trace("0" * 31 + "1", "0" * 15 + "1", None, False)

    def finish(self, record: RequestRecord, trace: Trace | None = None) -> None:
        pass
