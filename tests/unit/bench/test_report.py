"""The benchmarks' arithmetic and output: percentiles, numbers, the table, tool output parsing."""

from __future__ import annotations

import pytest

from bench.machine import percentile
from bench.mtls_proxy import _wrk_latency
from bench.report import Figure, Outcome, format_number, render_table

WRK_OUTPUT = """Running 6s test @ http://127.0.0.1:4000/
  Latency Distribution
     50%  512.00us
     75%    1.10ms
     90%    2.00ms
     99%    1.23s
Requests/sec:  12345.67
"""


def test_percentile_is_nearest_rank() -> None:
    samples = [float(n) for n in range(1, 1001)]
    assert percentile(samples, 0.5) == 500.0
    assert percentile(samples, 0.99) == 990.0
    assert percentile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert percentile([7.0], 0.99) == 7.0
    with pytest.raises(ValueError, match="no samples"):
        percentile([], 0.5)


@pytest.mark.parametrize(("value", "shown"), [
    (0, "0"), (2840.4, "2,840"), (12.53, "12.5"), (1.0, "1.00"), (0.41234, "0.412"),
])
def test_numbers_keep_three_significant_figures(value: float, shown: str) -> None:
    assert format_number(value) == shown


def test_wrk_latencies_are_read_in_seconds() -> None:
    assert _wrk_latency(WRK_OUTPUT, "50%") == pytest.approx(512e-6)
    assert _wrk_latency(WRK_OUTPUT, "99%") == pytest.approx(1.23)
    with pytest.raises(RuntimeError, match="no 95% latency"):
        _wrk_latency(WRK_OUTPUT, "95%")


def test_the_table_shows_figures_skips_and_failures() -> None:
    table = render_table([
        Outcome("issuance", figures=[Figure("issuance", "SVIDs/s per core", 1212.0, "/s",
                                            ceiling="3,287/s bare", target=">= 3,000/s",
                                            met=False)]),
        Outcome("mtls_proxy", skipped="tessera sidecar proxy not available"),
        Outcome("handshakes", failed="RuntimeError: no connection"),
    ])
    lines = table.splitlines()
    assert lines[0].split("|")[1:-1] == [
        " scenario   ", " measure          ", " Tessera                             ",
        " ceiling (same machine, same run) ", " target     ", " met "]
    assert "| issuance   | SVIDs/s per core | 1,212/s" in table
    assert "| NO  |" in lines[2]
    assert "| mtls_proxy | skipped          | tessera sidecar proxy not available |" in table
    assert "| handshakes | FAILED           | RuntimeError: no connection" in table
