"""A test collector: an OTLP/gRPC trace receiver on loopback, built from ``opentelemetry-proto``.

No collector binary installs here, so the tests run the receiving end of OTLP themselves:
grpcio serving ``opentelemetry.proto.collector.trace.v1.TraceService/Export`` and keeping
every span it is sent::

    with OtlpCollector.start() as collector:
        ...                                  # an Envoy with otlp_endpoint = collector.endpoint
        span = collector.wait_for_span(lambda span: span.trace_id == trace_id, "the span")
        collector.service_names()            # {"users-service", ...}

Spans are kept with their resource's ``service.name``; at most :data:`MAX_SPANS`.

``xds-protos`` ships an older copy of the same ``opentelemetry.proto`` modules, and
whichever package pip installs last provides them: the older one names a resource's
field 2 ``instrumentation_library_spans``, the newer ``scope_spans`` (same number, same
wire format). :func:`_scope_spans` reads either.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from tests.support.processes import poll

__all__ = ["MAX_SPANS", "OtlpCollector", "ReceivedSpan"]

MAX_SPANS = 10_000
DEADLINE = 30.0
"""Envoy sends its spans every 5 seconds (or 5 at a time): wait for them that long and more."""


@dataclass(frozen=True)
class ReceivedSpan:
    service_name: str
    trace_id: str
    """Hex, as in a ``traceparent``."""
    span_id: str
    parent_span_id: str
    name: str
    attributes: dict[str, Any]


class _TraceService(trace_service_pb2_grpc.TraceServiceServicer):  # type: ignore[misc]
    def __init__(self, collector: OtlpCollector) -> None:
        self._collector = collector

    def Export(self, request: Any, context: Any) -> Any:
        self._collector._take(request)
        return trace_service_pb2.ExportTraceServiceResponse()


class OtlpCollector:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._spans: list[ReceivedSpan] = []
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_TraceService(self), self._server)
        self.port = self._server.add_insecure_port("127.0.0.1:0")

    @classmethod
    def start(cls) -> OtlpCollector:
        collector = cls()
        collector._server.start()
        return collector

    @property
    def endpoint(self) -> str:
        """``HOST:PORT``, as the agent's ``otlp_endpoint`` takes it."""
        return f"127.0.0.1:{self.port}"

    def spans(self) -> list[ReceivedSpan]:
        with self._lock:
            return list(self._spans)

    def service_names(self) -> set[str]:
        return {span.service_name for span in self.spans()}

    def wait_for_span(
        self, check: Callable[[ReceivedSpan], bool], what: str, deadline: float = DEADLINE
    ) -> ReceivedSpan:
        """The first span received that ``check`` accepts, polling until ``deadline``."""

        def found() -> ReceivedSpan | None:
            return next((span for span in self.spans() if check(span)), None)

        span: ReceivedSpan = poll(found, deadline, what)
        return span

    def _take(self, request: Any) -> None:
        received = []
        for resource_spans in request.resource_spans:
            attributes = _attributes(resource_spans.resource.attributes)
            service_name = str(attributes.get("service.name", ""))
            for scope_spans in _scope_spans(resource_spans):
                for span in scope_spans.spans:
                    received.append(
                        ReceivedSpan(
                            service_name=service_name,
                            trace_id=span.trace_id.hex(),
                            span_id=span.span_id.hex(),
                            parent_span_id=span.parent_span_id.hex(),
                            name=span.name,
                            attributes=_attributes(span.attributes),
                        )
                    )
        with self._lock:
            self._spans.extend(received[: MAX_SPANS - len(self._spans)])

    def stop(self) -> None:
        self._server.stop(grace=None)

    def __enter__(self) -> OtlpCollector:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _attributes(pairs: Any) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for pair in pairs:
        kind = pair.value.WhichOneof("value")
        values[pair.key] = getattr(pair.value, kind) if kind else None
    return values


def _scope_spans(resource_spans: Any) -> Any:
    """A ResourceSpans' field 2, by whichever name the installed module gives it."""
    fields = resource_spans.DESCRIPTOR.fields_by_name
    name = "scope_spans" if "scope_spans" in fields else "instrumentation_library_spans"
    return getattr(resource_spans, name)
