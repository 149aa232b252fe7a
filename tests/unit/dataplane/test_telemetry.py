"""The built-in proxy's per-request telemetry: trace context, access log lines, metrics."""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from dataplane.telemetry import (
    ACCESS_LOG_ENV,
    ACCESS_LOG_FIELDS,
    MAX_PENDING_LINES,
    RequestRecord,
    RequestTelemetry,
    Trace,
    open_access_log,
    parse_traceparent,
)
from mesh.envoy.listeners import ACCESS_LOG_FIELDS as ENVOY_FIELDS
from sdk.sidecar.errors import SidecarConfigError

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"
USERS = "spiffe://example.org/users"


def record(**fields: object) -> RequestRecord:
    values: dict[str, object] = {
        "listener": "inbound", "start_time": 1_700_000_000.25, "duration": 0.0123,
        "method": "GET", "path": "/api/v1/users", "authority": "users-service",
        "status": 200, "source": USERS, "destination_service": "users-service",
    }  # fmt: skip
    values.update(fields)
    return RequestRecord(**values)  # type: ignore[arg-type]


def samples(registry: CollectorRegistry) -> list[tuple[str, dict[str, str], float]]:
    text = generate_latest(registry).decode()
    return [(s.name, dict(s.labels), s.value)
            for family in text_string_to_metric_families(text)
            for s in family.samples]  # fmt: skip


# -- trace context ---------------------------------------------------------------------------


def test_a_valid_traceparent_is_read() -> None:
    assert parse_traceparent(f"00-{TRACE}-{PARENT}-01") == (TRACE, PARENT, True)
    assert parse_traceparent(f"00-{TRACE}-{PARENT}-00") == (TRACE, PARENT, False)
    assert parse_traceparent(f"00-{TRACE}-{PARENT}-03") == (TRACE, PARENT, True)


@pytest.mark.parametrize("value", [
    None, "", "garbage",
    f"01-{TRACE}-{PARENT}-01",                 # another version
    f"ff-{TRACE}-{PARENT}-01",
    f"00-{TRACE.upper()}-{PARENT}-01",         # upper-case hex
    f"00-{'0' * 32}-{PARENT}-01",              # all-zero trace ID
    f"00-{TRACE}-{'0' * 16}-01",               # all-zero span ID
    f"00-{TRACE}-{PARENT}-01-extra",
    f"00-{TRACE}-{PARENT}-1",
    f"00-{TRACE[:-1]}g-{PARENT}-01",
    f" 00-{TRACE}-{PARENT}-01",
    f"00_{TRACE}_{PARENT}_01",
])  # fmt: skip
def test_an_invalid_traceparent_is_none(value: str | None) -> None:
    assert parse_traceparent(value) is None


def test_a_callers_trace_is_continued_with_a_new_span() -> None:
    telemetry = RequestTelemetry()
    trace = telemetry.start(f"00-{TRACE}-{PARENT}-01")
    assert (trace.trace_id, trace.parent_span_id, trace.sampled) == (TRACE, PARENT, True)
    assert trace.span_id != PARENT and len(trace.span_id) == 16
    assert trace.traceparent == f"00-{TRACE}-{trace.span_id}-01"
    unsampled = telemetry.start(f"00-{TRACE}-{PARENT}-00")
    assert unsampled.traceparent.endswith("-00") and not unsampled.sampled


def test_without_a_valid_traceparent_a_trace_begins() -> None:
    telemetry = RequestTelemetry()
    first, second = telemetry.start(None), telemetry.start(f"00-{TRACE}-{'0' * 16}-01")
    for trace in (first, second):
        assert trace.parent_span_id is None
        assert parse_traceparent(trace.traceparent) == (trace.trace_id, trace.span_id, False)
    assert first.trace_id != second.trace_id != TRACE
    # Sampled when spans are sent (nothing is sent here: no span is finished).
    assert RequestTelemetry(otlp_endpoint="127.0.0.1:9").start(None).sampled


# -- access log ------------------------------------------------------------------------------


def test_the_access_log_has_envoys_fields_and_a_line_per_request() -> None:
    assert ("listener", *ENVOY_FIELDS) == ACCESS_LOG_FIELDS
    out = io.StringIO()
    telemetry = RequestTelemetry(access_log=out)
    trace = Trace(TRACE, PARENT, None, False)
    telemetry.finish(record(source_address="127.0.0.1:5555", upstream_cluster="inbound|8080||u",
                            upstream_host="127.0.0.1:8080", bytes_received=120,
                            bytes_sent=345, response_code_details="via_upstream"), trace)
    telemetry.finish(record(status=403, source=None, response_code_details=(
        "rbac_access_denied_matched_policy[AuthorizationPolicy deny-all spec.rules[0]]")))
    first, second = (json.loads(line) for line in out.getvalue().splitlines())
    assert tuple(first) == ACCESS_LOG_FIELDS
    assert first == {
        "listener": "inbound", "start_time": "2023-11-14T22:13:20.250Z", "source": USERS,
        "source_address": "127.0.0.1:5555", "method": "GET", "path": "/api/v1/users",
        "authority": "users-service", "protocol": "HTTP/1.1", "route": None,
        "upstream_cluster": "inbound|8080||u", "upstream_host": "127.0.0.1:8080",
        "upstream_peer": None, "response_code": 200, "response_flags": "-",
        "response_code_details": "via_upstream", "duration_ms": 12, "bytes_received": 120,
        "bytes_sent": 345, "request_id": None, "trace_id": TRACE, "audit": None,
    }  # fmt: skip
    assert second["response_code"] == 403 and second["source"] is None
    assert second["trace_id"] is None
    assert second["response_code_details"] == (
        "rbac_access_denied_matched_policy[AuthorizationPolicy deny-all spec.rules[0]]")


def test_a_line_escapes_what_json_must_and_each_second_has_its_own_stamp() -> None:
    out = io.StringIO()
    telemetry = RequestTelemetry(access_log=out)
    odd = '/a"b\\c\x01d\tré\u2028'  # a quote, a backslash, control characters, non-ASCII
    telemetry.finish(record(path=odd, authority='h"\\', request_id="\x7f\n",
                            route='VirtualService "x" spec.http[0]'))
    telemetry.finish(record(start_time=1_700_000_001.999, method="", path=""))
    telemetry.finish(record(start_time=1_700_000_001.0004))
    lines = out.getvalue().splitlines()
    assert len(lines) == 3 and all(line.isascii() for line in lines)
    first, second, third = (json.loads(line) for line in lines)
    assert (first["path"], first["authority"], first["request_id"], first["route"]) == (
        odd, 'h"\\', "\x7f\n", 'VirtualService "x" spec.http[0]')
    assert second["start_time"] == "2023-11-14T22:13:21.999Z"
    assert second["method"] is None and second["path"] is None
    assert third["start_time"] == "2023-11-14T22:13:21.000Z"


class _CountingSink(io.StringIO):
    """An unbuffered stdout's stand-in: counts the writes it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0
        self.text = ""

    def write(self, text: str) -> int:
        self.writes += 1
        self.text += text
        return len(text)


def test_lines_are_held_and_written_together_not_one_write_a_request() -> None:
    sink = _CountingSink()
    telemetry = RequestTelemetry(access_log=sink)

    async def serve() -> None:  # in a running loop, as the proxy is
        for _ in range(MAX_PENDING_LINES - 1):
            telemetry.finish(record())
        assert sink.writes == 0  # held for the flush due within FLUSH_SECONDS
        telemetry.finish(record())  # the batch is full: written at once, in one write
        assert sink.writes == 1 and len(sink.text.splitlines()) == MAX_PENDING_LINES
        telemetry.finish(record(status=503))
        assert sink.writes == 1
        await telemetry.close()  # what is still held is written on the way out

    asyncio.run(serve())
    lines = sink.text.splitlines()  # (close closed the sink: not stdout)
    assert sink.writes == 2 and len(lines) == MAX_PENDING_LINES + 1
    assert json.loads(lines[-1])["response_code"] == 503


def test_a_failing_access_log_is_turned_off_and_the_requests_still_count() -> None:
    class Full(io.StringIO):
        def write(self, text: str) -> int:
            raise OSError(28, "No space left on device")

    registry = CollectorRegistry()
    telemetry = RequestTelemetry(registry, access_log=Full())
    telemetry.finish(record())  # no loop here: written through, and the write fails
    telemetry.finish(record())
    counted = [v for name, _, v in samples(registry) if name == "tessera_sidecar_requests_total"]
    assert counted == [2.0]


def test_new_trace_and_span_ids_are_hex_of_their_length_and_differ() -> None:
    telemetry = RequestTelemetry()
    traces = [telemetry.start(None) for _ in range(1000)]
    traces += [telemetry.start(f"00-{TRACE}-{PARENT}-01") for _ in range(1000)]
    assert all(parse_traceparent(trace.traceparent) is not None for trace in traces)
    assert len({trace.trace_id for trace in traces[:1000]}) == 1000
    assert len({trace.span_id for trace in traces}) == 2000


def test_access_log_settings(tmp_path: Path) -> None:
    assert open_access_log("off") is None
    path = tmp_path / "access.log"
    sink = open_access_log(str(path))
    assert sink is not None
    telemetry = RequestTelemetry(access_log=sink)
    telemetry.finish(record())
    assert json.loads(path.read_text())["response_code"] == 200
    with pytest.raises(SidecarConfigError, match=(
            f'^{ACCESS_LOG_ENV} must be "stdout", "off" or an absolute path, not '
            "'access.log'$")):  # fmt: skip
        open_access_log("access.log")
    with pytest.raises(SidecarConfigError, match=(
            f"^cannot open the access log {tmp_path}/missing/a.log \\({ACCESS_LOG_ENV}\\): "
            "No such file or directory$")):  # fmt: skip
        open_access_log(str(tmp_path / "missing" / "a.log"))
    with pytest.raises(SidecarConfigError, match="must be"):
        RequestTelemetry.from_environment(None, service_name="u",
                                          environ={ACCESS_LOG_ENV: "stderr"})  # fmt: skip
    quiet = RequestTelemetry.from_environment(None, service_name="u",
                                              environ={ACCESS_LOG_ENV: "off"})  # fmt: skip
    assert not quiet.sends_spans
    quiet.finish(record())  # counted, logged nowhere


# -- metrics ---------------------------------------------------------------------------------


def test_requests_are_counted_by_edge_route_and_code() -> None:
    registry = CollectorRegistry()
    telemetry = RequestTelemetry(registry)
    telemetry.finish(record())
    telemetry.finish(record(duration=0.0002))
    telemetry.finish(record(status=503, duration=2.0, route="VirtualService u spec.http[0]"))
    telemetry.finish(record(status=403, source=None, destination_service=None))
    found = samples(registry)
    counted = {tuple(sorted(labels.items())): value for name, labels, value in found
               if name == "tessera_sidecar_requests_total"}  # fmt: skip
    edge = {"listener": "inbound", "source": USERS, "destination": "users-service"}
    assert counted == {
        tuple(sorted({**edge, "route": "none", "code_class": "2xx", "code": "200"}.items())): 2,
        tuple(sorted({**edge, "route": "VirtualService u spec.http[0]", "code_class": "5xx",
                      "code": "503"}.items())): 1,
        tuple(sorted({"listener": "inbound", "source": "unknown", "destination": "unknown",
                      "route": "none", "code_class": "4xx", "code": "403"}.items())): 1,
    }
    buckets = {labels["le"]: value for name, labels, value in found
               if name == "tessera_sidecar_request_duration_seconds_bucket"
               and labels["code_class"] == "2xx"}  # fmt: skip
    assert buckets["0.0005"] == 1 and buckets["0.025"] == 2 and buckets["+Inf"] == 2
    assert "0.0005" in buckets and "10.0" in buckets
    assert not any("code" in labels for name, labels, _ in found
                   if name.startswith("tessera_sidecar_request_duration"))  # fmt: skip


def test_label_sets_past_the_cap_are_folded_into_other() -> None:
    registry = CollectorRegistry()
    telemetry = RequestTelemetry(registry, max_label_sets=3)
    for n in range(8):
        telemetry.finish(record(source=f"spiffe://example.org/minted/{n}",
                                destination_service=f"service-{n}"))  # fmt: skip
    sources = [(labels["source"], labels["destination"]) for name, labels, _ in samples(registry)
               if name == "tessera_sidecar_requests_total"]  # fmt: skip
    assert sources == [
        ("spiffe://example.org/minted/0", "service-0"),
        ("spiffe://example.org/minted/1", "service-1"),
        ("spiffe://example.org/minted/2", "service-2"),
        ("other", "service-3"), ("other", "service-4"), ("other", "service-5"),
        ("other", "other"),
    ]  # fmt: skip
