"""The benchmarks' arithmetic and output: percentiles, numbers, the table, tool output parsing."""

from __future__ import annotations

import pytest

from bench.machine import percentile
from bench.mtls_proxy import der_uri_pattern
from bench.report import Figure, Outcome, format_number, render_table
from bench.wrk import parse_wrk, wrk_latency

WRK_OUTPUT = """Running 6s test @ http://127.0.0.1:4000/
  1 threads and 32 connections
  Latency Distribution
     50%  512.00us
     75%    1.10ms
     90%    2.00ms
     99%    1.23s
  74074 requests in 6.00s, 11.23MB read
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
    assert wrk_latency(WRK_OUTPUT, "50%") == pytest.approx(512e-6)
    assert wrk_latency(WRK_OUTPUT, "99%") == pytest.approx(1.23)
    with pytest.raises(RuntimeError, match="no 95% latency"):
        wrk_latency(WRK_OUTPUT, "95%")


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


def test_wrk_requests_are_divided_by_the_cpu_seconds_metered() -> None:
    load = parse_wrk(WRK_OUTPUT, cpu=2.5)
    assert (load.requests, load.wall) == (74074, 6.0)
    assert load.per_cpu_second == pytest.approx(74074 / 2.5)
    assert load.p50 == pytest.approx(512e-6)


@pytest.mark.parametrize("trouble", ["  Non-2xx or 3xx responses: 3\n",
                                     "  Socket errors: connect 0, read 2, write 0, timeout 0\n"])
def test_a_wrk_run_with_refusals_is_no_rate(trouble: str) -> None:
    with pytest.raises(RuntimeError, match="wrk failed"):
        parse_wrk(WRK_OUTPUT + trouble, cpu=1.0)


def test_notes_of_shown_figures_are_printed_under_the_table() -> None:
    table = render_table([Outcome("mtls_proxy", figures=[
        Figure("mtls_proxy", "requests per proxy CPU-second", 9000.0, "/s",
               note="nginx checks no SPIFFE ID"),
        Figure("mtls_proxy", "skipped one", None, "", note="skipped: no wrk"),
    ])])
    assert table.splitlines()[-3:] == [
        "", "Notes:", "- mtls_proxy, requests per proxy CPU-second: nginx checks no SPIFFE ID"]
    assert "| skipped: no wrk" in table  # in its row, where the figure would be


def test_the_haproxy_spiffe_id_pattern_is_the_der_general_name() -> None:
    from cryptography import x509

    uri = "spiffe://bench.test/client"
    san = x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]).public_bytes()
    assert der_uri_pattern(uri) in san.hex().upper()
    assert der_uri_pattern("spiffe://bench.test/clien") not in san.hex().upper()
