"""Per-request telemetry of the built-in proxy: what Envoy's stats, access log and tracer give.

Every request a built-in proxy answers (inbound, outbound, gateway) ends in one
:class:`RequestRecord`, handed to :meth:`RequestTelemetry.finish`::

    telemetry = RequestTelemetry(registry, access_log=sys.stdout, service_name="users")
    trace = telemetry.start(incoming_traceparent)     # continued, or a new trace
    upstream_headers.append(("traceparent", trace.traceparent))
    ...
    telemetry.finish(RequestRecord(...), trace)
    await telemetry.close()                           # flush the log, send the last spans

What each request leaves:

**Metrics** on the sidecar's registry (its ``/metrics``):

=========================================================  ===================================
``tessera_sidecar_requests_total``                         requests answered, by ``listener``
                                                           (``inbound``, ``outbound``, a
                                                           gateway's), ``source`` (the
                                                           caller's SPIFFE ID, ``unknown``
                                                           without one), ``destination`` (the
                                                           Service called), ``route`` (the
                                                           route's source, ``none``),
                                                           ``code_class`` (``2xx``..``5xx``)
                                                           and ``code``
``tessera_sidecar_request_duration_seconds``               request head to the response's
                                                           last byte (histogram, 0.5 ms to
                                                           10 s), by the same labels but
                                                           ``code``
=========================================================  ===================================

Labels stay bounded: SPIFFE IDs are the mesh's workloads, routes and Services come
from its configuration, codes from HTTP; and past :data:`MAX_LABEL_SETS` distinct label
sets a new one is counted with its ``source`` and ``route`` as ``other`` (and, past
twice that, its ``destination`` too), so a caller minting IDs cannot grow ``/metrics``.

**An access log line**, JSON, with the field names of Envoy's
(:data:`mesh.envoy.listeners.ACCESS_LOG_FIELDS`, plus ``listener``): on stdout, in a
file, or nowhere (:func:`open_access_log`). Lines are held by the telemetry itself and
written together, at least every :data:`FLUSH_SECONDS` and whenever
:data:`MAX_PENDING_LINES` are waiting, as Envoy's are: not a ``write`` system call per
request, whatever buffering the file has (``PYTHONUNBUFFERED``, common in containers,
leaves ``sys.stdout`` with none).

**Trace context** (W3C ``traceparent``): a valid version-00 ``traceparent`` is continued
(its trace, its sampling flag) with a new span; a missing or invalid one starts a trace,
sampled when spans are sent. **Spans** go over OTLP/gRPC (``opentelemetry-sdk``, imported
only then) when an endpoint is given: one SERVER span per sampled request, with the
request's own trace and span IDs, in batches.

Cost: :meth:`RequestTelemetry.finish` looks the request's metric cells up in a dict, adds
to them (no lock: the metrics are read out of plain lists when ``/metrics`` is asked for)
and puts the log line together in one f-string (``strftime`` once a second); see
``bench/telemetry.py`` for its microseconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import re
import sys
import time
from bisect import bisect_left
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from json.encoder import encode_basestring_ascii as _json_string
from pathlib import Path
from typing import Any, Final, TextIO

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from sdk.sidecar.errors import SidecarConfigError
from sdk.sidecar.http_exchange import ExchangeRecord

__all__ = [
    "ACCESS_LOG_ENV",
    "ACCESS_LOG_FIELDS",
    "DURATION_BUCKETS",
    "MAX_LABEL_SETS",
    "OTLP_ENDPOINT_ENV",
    "InboundObserver",
    "RequestRecord",
    "RequestTelemetry",
    "Trace",
    "open_access_log",
    "parse_traceparent",
]

_log = logging.getLogger("tessera.sidecar")

ACCESS_LOG_ENV: Final = "TESSERA_ACCESS_LOG"
"""``stdout`` (the default), ``off`` or an absolute path: the built-in proxy's access log."""
OTLP_ENDPOINT_ENV: Final = "OTEL_EXPORTER_OTLP_ENDPOINT"
"""OpenTelemetry's own variable: ``HOST:PORT`` (or ``http://HOST:PORT``) of an OTLP/gRPC
receiver. Unset: no spans are sent."""

ACCESS_LOG_FIELDS: Final = (
    "listener", "start_time", "source", "source_address", "method", "path", "authority",
    "protocol", "route", "upstream_cluster", "upstream_host", "upstream_peer",
    "response_code", "response_flags", "response_code_details", "duration_ms",
    "bytes_received", "bytes_sent", "request_id", "trace_id", "audit",
)  # fmt: skip
"""An access log line's fields: Envoy's (``mesh.envoy.listeners``), same names, same order."""

DURATION_BUCKETS: Final = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
MAX_LABEL_SETS: Final = 2000
"""Distinct label sets counted as they are; more are folded into ``other``."""
OTHER: Final = "other"
UNKNOWN: Final = "unknown"
NO_ROUTE: Final = "none"
MAX_ROUTE_LABEL: Final = 200
"""A route's source longer than this is cut in the ``route`` label (not in the log)."""
FLUSH_SECONDS: Final = 1.0
MAX_PENDING_LINES: Final = 256
"""Access log lines held before they are written without waiting for :data:`FLUSH_SECONDS`."""
SPAN_EXPORT_TIMEOUT_SECONDS: Final = 5.0

_TRACEPARENT: Final = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_ZERO_TRACE: Final = "0" * 32
_ZERO_SPAN: Final = "0" * 16
_CLASSES: Final = {1: "1xx", 2: "2xx", 3: "3xx", 4: "4xx", 5: "5xx"}


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
    source_address: str | None = None
    """``HOST:PORT`` the request came from."""
    protocol: str = "HTTP/1.1"


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


def parse_traceparent(value: str | None) -> tuple[str, str, bool] | None:
    """(trace ID, parent span ID, sampled) of a version-00 ``traceparent``, or None if
    ``value`` is missing or not exactly one (lower-case hex, IDs not all zeros)."""
    if value is None or len(value) != 55:
        return None
    match = _TRACEPARENT.fullmatch(value)
    if match is None:
        return None
    trace_id, parent, flags = match.groups()
    if trace_id == _ZERO_TRACE or parent == _ZERO_SPAN:
        return None
    return trace_id, parent, bool(int(flags, 16) & 1)


def open_access_log(setting: str) -> TextIO | None:
    """Where the access log goes: ``stdout``, ``off`` (None) or an absolute path (appended
    to); SidecarConfigError in one sentence otherwise, or if the file cannot be opened."""
    if setting == "stdout":
        return sys.stdout
    if setting == "off":
        return None
    if not setting.startswith("/"):
        raise SidecarConfigError(
            f'{ACCESS_LOG_ENV} must be "stdout", "off" or an absolute path, not {setting!r}'
        )
    try:
        return Path(setting).open("a", encoding="utf-8", buffering=64 * 1024)
    except OSError as err:
        raise SidecarConfigError(
            f"cannot open the access log {setting} ({ACCESS_LOG_ENV}): {err.strerror or err}"
        ) from err


class RequestTelemetry:
    """Counts, logs and traces the requests of one proxy (see the module)."""

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        access_log: TextIO | None = None,
        otlp_endpoint: str | None = None,
        service_name: str = "tessera-proxy",
        max_label_sets: int = MAX_LABEL_SETS,
    ) -> None:
        """``registry``: where the metrics go (None: a registry of its own);
        ``access_log``: where the lines go (None: nowhere); ``otlp_endpoint``: where spans go
        (None: nowhere), as ``service_name``."""
        self.registry = registry if registry is not None else CollectorRegistry()
        self._series = _RequestSeries()
        self.registry.register(self._series)
        self._cells: dict[tuple[Any, ...], tuple[list[int], list[float]]] = {}
        """Each request's key (listener, source, destination, route, status) to its counter
        and histogram cells in :attr:`_series`."""
        self._max_label_sets = max_label_sets
        self._access_log = access_log
        self._flush_scheduled = False
        self._pending: list[str] = []
        """Access log lines not yet written (see :meth:`flush`)."""
        self._stamp_second = -1
        self._stamp = ""
        """The access log's ``start_time`` to the second, made once a second."""
        self._spans: _SpanSender | None = (
            _SpanSender(otlp_endpoint, service_name) if otlp_endpoint else None
        )

    @classmethod
    def from_environment(
        cls,
        registry: CollectorRegistry | None,
        *,
        service_name: str,
        environ: Mapping[str, str] = os.environ,
    ) -> RequestTelemetry:
        """As :data:`ACCESS_LOG_ENV` and :data:`OTLP_ENDPOINT_ENV` say; SidecarConfigError
        in one sentence for a setting that does not read."""
        access_log = open_access_log(environ.get(ACCESS_LOG_ENV, "stdout").strip() or "stdout")
        endpoint = environ.get(OTLP_ENDPOINT_ENV, "").strip() or None
        return cls(registry, access_log=access_log, otlp_endpoint=endpoint,
                   service_name=service_name)  # fmt: skip

    @property
    def sends_spans(self) -> bool:
        return self._spans is not None

    def start(self, traceparent: str | None) -> Trace:
        """This request's trace: the caller's continued with a new span, else a new one
        (sampled when spans are sent)."""
        parsed = parse_traceparent(traceparent)
        if parsed is not None:
            trace_id, parent, sampled = parsed
            return Trace(trace_id, _new_span_id(), parent, sampled)
        ids = _ids.getrandbits(192).to_bytes(24).hex()
        trace_id, span_id = ids[:32], ids[32:]
        if trace_id == _ZERO_TRACE or span_id == _ZERO_SPAN:  # 2**-64 odds: draw again
            return self.start(None)
        return Trace(trace_id, span_id, None, self._spans is not None)

    def finish(self, record: RequestRecord, trace: Trace | None = None) -> None:
        """Count, log and trace one answered request."""
        status = record.status
        key = (record.listener, record.source, record.destination_service, record.route,
               status)  # fmt: skip
        cells = self._cells.get(key)
        if cells is None:
            cells = self._cells_for(key)
        count, histogram = cells
        count[0] += 1
        duration = record.duration
        histogram[0] += duration
        histogram[1 + bisect_left(DURATION_BUCKETS, duration)] += 1
        if self._access_log is not None:
            self._log(record, trace)
        if self._spans is not None and trace is not None and trace.sampled:
            self._spans.send(record, trace)

    def _cells_for(self, key: tuple[Any, ...]) -> tuple[list[int], list[float]]:
        listener, source, destination, route, status = key
        source = source or UNKNOWN
        destination = destination or UNKNOWN
        route = (route or NO_ROUTE)[:MAX_ROUTE_LABEL]
        if len(self._cells) >= self._max_label_sets:
            source = route = OTHER
            if len(self._cells) >= 2 * self._max_label_sets:
                destination = OTHER
        code_class = _CLASSES.get(status // 100, OTHER)
        code = str(status) if 100 <= status <= 599 else OTHER
        cells = self._series.cells((listener, source, destination, route, code_class), code)
        if len(self._cells) < 3 * self._max_label_sets:
            self._cells[key] = cells
        return cells

    def _log(self, record: RequestRecord, trace: Trace | None) -> None:
        assert self._access_log is not None
        # The line is put together by hand rather than by json.dumps of a dict (a third of
        # the cost of a line): every string goes through json's own escaper (the same
        # output as json.dumps, non-ASCII as \u escapes); the numbers are ints.
        millis = int(record.start_time * 1000)
        second, fraction = divmod(millis, 1000)
        if second != self._stamp_second:
            self._stamp_second = second
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        text = _json_string
        line = (
            f'{{"listener":{text(record.listener)},'
            f'"start_time":"{self._stamp}.{fraction:03d}Z",'
            f'"source":{_json_or_null(record.source)},'
            f'"source_address":{_json_or_null(record.source_address)},'
            f'"method":{text(record.method) if record.method else "null"},'
            f'"path":{text(record.path) if record.path else "null"},'
            f'"authority":{_json_or_null(record.authority)},'
            f'"protocol":{text(record.protocol)},'
            f'"route":{_json_or_null(record.route)},'
            f'"upstream_cluster":{_json_or_null(record.upstream_cluster)},'
            f'"upstream_host":{_json_or_null(record.upstream_host)},'
            f'"upstream_peer":{_json_or_null(record.upstream_peer)},'
            f'"response_code":{record.status},'
            f'"response_flags":{text(record.response_flags)},'
            f'"response_code_details":'
            f'{text(record.response_code_details) if record.response_code_details else "null"},'
            f'"duration_ms":{int(record.duration * 1000)},'
            f'"bytes_received":{record.bytes_received},'
            f'"bytes_sent":{record.bytes_sent},'
            f'"request_id":{_json_or_null(record.request_id)},'
            f'"trace_id":{text(trace.trace_id) if trace is not None else "null"},'
            '"audit":null}'
        )
        pending = self._pending
        pending.append(line)
        if len(pending) >= MAX_PENDING_LINES:
            self.flush()
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            try:
                asyncio.get_running_loop().call_later(FLUSH_SECONDS, self._flush_due)
            except RuntimeError:  # no loop (a test, a tool): write through
                self._flush_due()

    def _flush_due(self) -> None:
        self._flush_scheduled = False
        self.flush()

    def flush(self) -> None:
        """Write the access log lines held so far (in one write)."""
        log, pending = self._access_log, self._pending
        if log is None or not pending:
            pending.clear()
            return
        text = "\n".join(pending) + "\n"
        pending.clear()
        try:
            log.write(text)
            log.flush()
        except (OSError, ValueError) as err:  # a full disk, a closed file: the requests stand
            _log.warning("cannot write the access log: %s; turning it off", err)
            self._access_log = None

    async def close(self) -> None:
        """Flush the access log (closing a file of its own) and send the spans still held."""
        self.flush()
        if self._access_log is not None and self._access_log not in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError):
                self._access_log.close()
        self._access_log = None
        if self._spans is not None:
            spans, self._spans = self._spans, None
            await asyncio.to_thread(spans.shutdown)

    def inbound(self, listener: str, *, destination_service: str,
                upstream_cluster: str | None = None) -> InboundObserver:  # fmt: skip
        """The observer an inbound listener's exchanges report to (:mod:`sdk.sidecar`)."""
        return InboundObserver(self, listener, destination_service, upstream_cluster)


class InboundObserver:
    """An inbound listener's :class:`~sdk.sidecar.http_exchange.RequestObserver`: the
    exchange's record, with the Service it serves, to :class:`RequestTelemetry`."""

    def __init__(self, telemetry: RequestTelemetry, listener: str, destination_service: str,
                 upstream_cluster: str | None) -> None:  # fmt: skip
        self.telemetry = telemetry
        self.listener = listener
        self.destination_service = destination_service
        self.upstream_cluster = upstream_cluster

    def start(self, traceparent: str | None) -> Trace:
        return self.telemetry.start(traceparent)

    def finish(self, exchange: ExchangeRecord, trace: Any) -> None:
        self.telemetry.finish(
            RequestRecord(
                listener=self.listener, start_time=exchange.start_time,
                duration=exchange.duration, method=exchange.method, path=exchange.path,
                authority=exchange.authority, status=exchange.status,
                source=str(exchange.peer_id) if exchange.peer_id is not None else None,
                destination_service=self.destination_service,
                upstream_cluster=self.upstream_cluster if exchange.forwarded else None,
                upstream_host=exchange.upstream_host if exchange.forwarded else None,
                response_flags=exchange.response_flags,
                response_code_details=exchange.response_code_details,
                bytes_received=exchange.bytes_received, bytes_sent=exchange.bytes_sent,
                request_id=exchange.request_id, source_address=exchange.source_address,
                protocol=exchange.protocol,
            ),
            trace if isinstance(trace, Trace) else None,
        )


class _RequestSeries(Collector):
    """``tessera_sidecar_requests_total`` and ``tessera_sidecar_request_duration_seconds``,
    kept in plain lists and read out when the registry is collected.

    A ``prometheus_client`` counter's ``inc`` and a histogram's ``observe`` take a lock
    apiece (the histogram two) and a few calls each: per request, on the proxy's data
    path, more than the rest of the telemetry. Here a request adds to an ``int`` and a
    bucket found by ``bisect``; only the event loop's thread writes the cells.
    """

    def __init__(self) -> None:
        self._counts: dict[tuple[str, ...], list[int]] = {}
        """(listener, source, destination, route, code_class, code) to [requests]."""
        self._histograms: dict[tuple[str, ...], list[float]] = {}
        """(listener, source, destination, route, code_class) to [sum, one count per bucket
        of :data:`DURATION_BUCKETS`, then +Inf's], not cumulative."""

    def cells(self, labels: tuple[str, ...], code: str) -> tuple[list[int], list[float]]:
        """The counter's and the histogram's cells of one label set (made at zero)."""
        count = self._counts.setdefault((*labels, code), [0])
        histogram = self._histograms.get(labels)
        if histogram is None:
            histogram = self._histograms[labels] = [0.0] * (len(DURATION_BUCKETS) + 2)
        return count, histogram

    def describe(self) -> Iterator[Metric]:
        return iter(self._families())

    def collect(self) -> Iterator[Metric]:
        requests, duration = self._families()
        for labels, (count,) in list(self._counts.items()):
            requests.add_metric(labels, count)
        for labels, cells in list(self._histograms.items()):
            running, buckets = 0.0, []
            for bound, observed in zip(_BUCKET_NAMES, cells[1:], strict=True):
                running += observed
                buckets.append((bound, running))
            duration.add_metric(labels, buckets, cells[0])
        return iter((requests, duration))

    @staticmethod
    def _families() -> tuple[CounterMetricFamily, HistogramMetricFamily]:
        return (
            CounterMetricFamily(
                "tessera_sidecar_requests",
                "Requests answered, by listener, source, destination, route and response code",
                labels=["listener", "source", "destination", "route", "code_class", "code"],
            ),
            HistogramMetricFamily(
                "tessera_sidecar_request_duration_seconds",
                "From a request's head to its response's last byte, by listener, source, "
                "destination, route and response code class",
                labels=["listener", "source", "destination", "route", "code_class"],
            ),
        )


_BUCKET_NAMES: Final = (
    *(floatToGoString(b) for b in DURATION_BUCKETS),  # type: ignore[no-untyped-call]
    "+Inf",
)


def _new_span_id() -> str:
    span_id = _ids.getrandbits(64).to_bytes(8).hex()
    return span_id if span_id != _ZERO_SPAN else _new_span_id()


_ids = random.Random(os.urandom(32))
"""Where trace and span IDs come from. They must be unique, not secret (they travel in
clear in ``traceparent``), so a generator seeded once from the system's entropy will do,
as OpenTelemetry's own does: ``os.urandom`` per request is a system call each time.
:func:`_reseed_after_fork` gives a forked worker a sequence of its own."""


def _reseed_after_fork() -> None:
    _ids.seed(os.urandom(32))


os.register_at_fork(after_in_child=_reseed_after_fork)


def _json_or_null(value: str | None) -> str:
    return "null" if value is None else _json_string(value)


class _SpanSender:
    """Spans over OTLP/gRPC with ``opentelemetry-sdk``, each with the request's own IDs."""

    def __init__(self, endpoint: str, service_name: str) -> None:
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor
            from opentelemetry.sdk.trace.id_generator import IdGenerator
            from opentelemetry.trace import (
                NonRecordingSpan,
                SpanContext,
                SpanKind,
                TraceFlags,
                set_span_in_context,
            )
        except ImportError as err:
            raise SidecarConfigError(
                f"{OTLP_ENDPOINT_ENV} is set, but spans cannot be sent: {err}; install "
                "tessera[mesh] (and, if xds-protos is installed, opentelemetry-proto after it)"
            ) from err

        sender = self

        class _GivenIds(IdGenerator):
            """The IDs the request already has (its traceparent was sent with them)."""

            def generate_span_id(self) -> int:
                return sender._next_span_id

            def generate_trace_id(self) -> int:
                return sender._next_trace_id

        self._next_span_id = 0
        self._next_trace_id = 0
        scheme, _, rest = endpoint.partition("://")
        insecure = not rest or scheme != "https"
        exporter = OTLPSpanExporter(endpoint=endpoint, insecure=insecure,
                                    timeout=int(SPAN_EXPORT_TIMEOUT_SECONDS))  # fmt: skip
        self._provider = TracerProvider(
            resource=Resource.create({"service.name": service_name}), id_generator=_GivenIds()
        )
        self._provider.add_span_processor(BatchSpanProcessor(exporter))
        self._tracer = self._provider.get_tracer("tessera.sidecar")
        self._server = SpanKind.SERVER
        self._parent_context = (NonRecordingSpan, SpanContext, TraceFlags, set_span_in_context)

    def send(self, record: RequestRecord, trace: Trace) -> None:
        non_recording, span_context, flags, in_context = self._parent_context
        self._next_trace_id = int(trace.trace_id, 16)
        self._next_span_id = int(trace.span_id, 16)
        context = None
        if trace.parent_span_id is not None:
            parent = span_context(self._next_trace_id, int(trace.parent_span_id, 16),
                                  is_remote=True, trace_flags=flags(1))  # fmt: skip
            context = in_context(non_recording(parent))
        start = int(record.start_time * 1e9)
        attributes: dict[str, Any] = {
            "component": "proxy",
            "http.method": record.method,
            "http.url": f"http://{record.authority or '-'}{record.path}",
            "http.protocol": record.protocol,
            "http.status_code": record.status,
            "response_flags": record.response_flags,
            "request_size": record.bytes_received,
            "response_size": record.bytes_sent,
        }
        for name, value in (
            ("upstream_cluster", record.upstream_cluster),
            ("upstream_address", record.upstream_host),
            ("peer.address", record.source_address),
            ("peer.spiffe_id", record.source),
            ("upstream.spiffe_id", record.upstream_peer),
            ("route", record.route),
        ):
            if value is not None:
                attributes[name] = value
        if record.status >= 500:
            attributes["error"] = True
        span = self._tracer.start_span(
            f"{record.method} {record.path}" if record.method else record.listener,
            context=context, kind=self._server, attributes=attributes, start_time=start,
        )  # fmt: skip
        span.end(end_time=start + int(record.duration * 1e9))

    def shutdown(self) -> None:
        """Send the spans held (waiting at most a few seconds), then stop."""
        self._provider.force_flush(int(SPAN_EXPORT_TIMEOUT_SECONDS * 1000))
        self._provider.shutdown()
