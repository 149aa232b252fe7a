"""The built-in proxy's per-request telemetry: CPU microseconds of a trace started and a
request recorded (metrics, the JSON access log line, no spans).

What :mod:`dataplane.telemetry` does for each request the proxy answers:
``RequestTelemetry.start`` (a new trace, or the caller's continued) and
``RequestTelemetry.finish`` of a typical outbound record, its access log line written to a
buffer (the proxy's own file or stdout is buffered as well). Each figure is the best of
five runs of ``--rounds`` iterations, in microseconds of CPU (``time.process_time``) per
iteration, in this one process.

    python bench/telemetry.py [--rounds 20000]
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from collections.abc import Callable
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dataplane.telemetry import RequestRecord, RequestTelemetry

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def _record() -> RequestRecord:
    return RequestRecord(
        listener="outbound", start_time=time.time(), duration=0.0021, method="GET",
        path="/api/v1/orders/1234?expand=items", authority="orders-service", status=200,
        source="spiffe://example.org/checkout", destination_service="orders-service",
        route="Service orders-service", upstream_cluster="outbound|80||orders-service",
        upstream_host="10.0.0.7:15006", upstream_peer="spiffe://example.org/orders",
        bytes_received=0, bytes_sent=612, request_id="5f0c2a1e-8f7d-4b36-9d2a-0b1c2d3e4f50",
    )  # fmt: skip


def _best(action: Callable[[], object], rounds: int) -> float:
    best = float("inf")
    for _ in range(5):
        start = time.process_time()
        for _ in range(rounds):
            action()
        best = min(best, time.process_time() - start)
    return best / rounds * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20000)
    rounds = parser.parse_args().rounds
    sink = io.StringIO()
    logged = RequestTelemetry(access_log=sink)
    silent = RequestTelemetry()
    record = _record()
    trace = logged.start(None)

    def finish_logged() -> None:
        logged.finish(record, trace)
        if sink.tell() > 1 << 20:
            sink.seek(0)
            sink.truncate()

    figures = (
        ("start (a new trace)", lambda: logged.start(None)),
        ("start (traceparent continued)", lambda: logged.start(TRACEPARENT)),
        ("finish (metrics + access log)", finish_logged),
        ("finish (metrics only)", lambda: silent.finish(record, trace)),
    )
    for name, action in figures:
        print(f"{name:32} {_best(action, rounds):6.2f} µs CPU")


if __name__ == "__main__":
    main()
