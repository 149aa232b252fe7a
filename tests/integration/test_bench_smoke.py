"""The benchmarks still run: ``bench/run.py --quick`` (tiny sizes) end to end, and the peers
the mTLS data path is compared with verify what they are asked to verify.

No timing is asserted here; ``make bench`` is where the figures come from.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from bench.deployment import free_port
from bench.envoy_pair import (
    BUILTIN_SERVICE,
    CLIENT_ID,
    SERVER_ID,
    SERVICE,
    builtin_http_pair,
    mesh_deployment,
    static_envoy_pair,
)
from bench.handshakes import write_certificates
from bench.mtls_proxy import haproxy_pair, nginx_backend, nginx_pair
from dataplane.envoy.binary import find_envoy
from tests.conftest import missing_service

pytestmark = pytest.mark.integration
REPOSITORY = Path(__file__).resolve().parents[2]
SCENARIOS = ["issuance", "workload_api", "agent_footprint", "propagation", "mesh_traffic",
             "mtls_proxy", "envoy_pair", "handshakes", "startup", "console"]


@dataclass(frozen=True)
class QuickRun:
    """``bench/run.py --quick --json``: what it printed and the scenarios it recorded."""

    stdout: str
    stderr: str
    scenarios: dict[str, dict[str, Any]]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> QuickRun:
    """Every bench with tiny sizes, run once for the tests that read it (a few minutes)."""
    tmp_path = tmp_path_factory.mktemp("bench-quick")
    results = tmp_path / "bench.json"
    run = subprocess.run(
        [sys.executable, str(REPOSITORY / "bench" / "run.py"), "--quick", "--json",
         str(results)],
        capture_output=True, text=True, timeout=280, cwd=tmp_path,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    document = json.loads(results.read_text())
    scenarios = {s["scenario"]: s for s in document["scenarios"]}
    return QuickRun(run.stdout, run.stderr, scenarios)


@pytest.mark.timeout(300)
def test_every_bench_runs_with_tiny_sizes(quick_run: QuickRun) -> None:
    run, by_name = quick_run, quick_run.scenarios
    assert list(by_name) == SCENARIOS
    skipped = []
    for name, outcome in by_name.items():
        assert outcome["failed"] == "", f"{name}: {outcome['failed']}\n{run.stderr}"
        if outcome["skipped"]:
            skipped.append(f"{name}: {outcome['skipped']}")
            continue
        assert outcome["figures"], name
        skipped += [f"{name}: {figure['measure']}: {figure['note']}"
                    for figure in outcome["figures"] if figure["value"] is None]
    assert "| scenario" in run.stdout
    assert "issuance" in run.stdout and "handshakes" in run.stdout
    if not by_name["issuance"]["skipped"]:
        _every_svid_is_recorded(by_name["issuance"]["figures"], skipped)
    if skipped:  # wrk, nginx, haproxy, bao or PostgreSQL missing
        missing_service("; ".join(skipped))


def _every_svid_is_recorded(figures: list[dict[str, Any]], skipped: list[str]) -> None:
    """The SVIDs the bench counted are the rows the datastore recorded and audited."""
    counts = [figure["data"] for figure in figures if "issued_svids_rows" in figure["data"]]
    backends = 1 if any("PostgreSQL" in reason for reason in skipped) else 2
    assert len(counts) == backends, figures
    for data in counts:
        assert data["received"] > data["measured"] > 0, data
        assert data["received"] == data["issued_svids_rows"] == data["audited"], data
    if not any("OpenBao" in reason for reason in skipped):
        per_cpu_second = [figure["data"] for figure in figures
                          if "openbao_sign_per_cpu_second" in figure["data"]]
        assert per_cpu_second and per_cpu_second[0]["openbao_issue_per_cpu_second"] > 0


def test_an_unknown_scenario_is_a_usage_error() -> None:
    run = subprocess.run(
        [sys.executable, str(REPOSITORY / "bench" / "run.py"), "--only", "warp-drive"],
        capture_output=True, text=True, timeout=60,
    )
    assert run.returncode == 2
    assert "invalid choice: 'warp-drive'" in run.stderr


# -- the proxy pairs Tessera's sidecars are compared with ----------------------------------


PAIRS = {"nginx": nginx_pair, "haproxy": haproxy_pair}


@pytest.fixture
def backend(tmp_path: Path) -> Iterator[int]:
    for tool in ("nginx", "haproxy"):
        if shutil.which(tool) is None:
            missing_service(f"{tool} is not installed (Debian: apt-get install nginx-light "
                            "haproxy)")
    port = free_port()
    with nginx_backend(tmp_path / "backend", port):
        yield port


def _through(port: int) -> httpx.Response | str:
    """GET / through a pair's outbound; the answer, or how the connection ended."""
    try:
        return httpx.get(f"http://127.0.0.1:{port}/", timeout=10)
    except httpx.HTTPError as err:
        return type(err).__name__


def _refused(answer: httpx.Response | str) -> bool:
    """nginx answers 502 when the upstream handshake fails; haproxy (TCP) closes the
    client's connection without a byte."""
    if isinstance(answer, str):
        return answer == "RemoteProtocolError"
    return answer.status_code == 502


@pytest.mark.parametrize("pair", sorted(PAIRS))
def test_a_pair_relays_between_the_bench_svids(pair: str, tmp_path: Path, backend: int
                                               ) -> None:
    files = write_certificates(tmp_path / "certificates")
    with PAIRS[pair](tmp_path / pair, files, backend) as (port, pids):
        answer = _through(port)
    assert isinstance(answer, httpx.Response), answer
    assert (answer.status_code, answer.text) == (200, "ok from the backend\n")
    assert len(pids) == 2


@pytest.mark.parametrize("pair", sorted(PAIRS))
def test_an_outbound_refuses_an_inbound_outside_the_bundle(pair: str, tmp_path: Path,
                                                           backend: int) -> None:
    files = write_certificates(tmp_path / "certificates")
    stranger = write_certificates(tmp_path / "stranger")  # same names, another CA
    files |= {"server.pem": stranger["server.pem"], "server.key": stranger["server.key"]}
    with PAIRS[pair](tmp_path / pair, files, backend) as (port, _):
        answer = _through(port)
    assert _refused(answer), answer
    if pair == "nginx":
        log = (tmp_path / "nginx" / "outbound" / "error.log").read_text()
        assert "upstream SSL certificate verify error" in log


@pytest.mark.parametrize("pair", sorted(PAIRS))
def test_an_outbound_refuses_an_inbound_with_another_name(pair: str, tmp_path: Path,
                                                          backend: int) -> None:
    files = write_certificates(tmp_path / "certificates", names=("server", "client", "other"))
    files |= {"server.pem": files["other.pem"], "server.key": files["other.key"]}
    with PAIRS[pair](tmp_path / pair, files, backend) as (port, _):
        answer = _through(port)
    assert _refused(answer), answer
    if pair == "nginx":
        log = (tmp_path / "nginx" / "outbound" / "error.log").read_text()
        assert 'upstream SSL certificate does not match "server.bench.test"' in log


@pytest.mark.parametrize("expected", ["spiffe://bench.test/someone-else",
                                      "spiffe://bench.test/clien"])
def test_the_haproxy_inbound_refuses_another_spiffe_id(expected: str, tmp_path: Path,
                                                       backend: int) -> None:
    files = write_certificates(tmp_path / "certificates")  # the client is .../client
    with haproxy_pair(tmp_path / "haproxy", files, backend, client_id=expected) as (port, _):
        assert _refused(_through(port))


# -- the Envoy pairs ---------------------------------------------------------------------------


@pytest.mark.envoy
@pytest.mark.timeout(300)
def test_the_envoy_pairs_run_and_print_their_figures(quick_run: QuickRun) -> None:
    run, outcome = quick_run, quick_run.scenarios["envoy_pair"]
    if outcome["skipped"]:
        missing_service(outcome["skipped"])
    measures = [figure["measure"] for figure in outcome["figures"]]
    assert measures == [
        measure
        for per in ("1 connection", "32 connections")
        for measure in (
            f"Envoy pair: requests per proxy CPU-second, {per}",
            f"Envoy pair: p50 added over direct, {per}",
            f"Envoy pair: p99 added over direct, {per}",
            f"built-in HTTP pair: requests per proxy CPU-second, {per}",
            f"built-in HTTP pair: p99, {per}",
        )
    ]  # fmt: skip
    for measure in measures:
        assert measure in run.stdout
    data = outcome["figures"][0]["data"]
    for pair in ("tessera_envoy", "static_envoy"):  # HTTP/2 between the proxies, nothing else
        assert data[f"{pair}_upstream_http1_connections"] == 0, data
        assert data[f"{pair}_upstream_http2_connections"] >= 1, data
    pairs = ("tessera_envoy", "static_envoy", "haproxy", "nginx", "builtin", "builtin_http")
    for pair in ("direct", *pairs):
        assert data[f"{pair}_requests"] > 0, pair
    for pair in pairs:
        for side in ("outbound", "inbound"):
            assert data[f"{pair}_{side}_cpu_us_per_request"] > 0, (pair, side)
    # The built-in HTTP pair's figures are its own beside the Envoy pair's, as ratios.
    builtin = outcome["figures"][3]
    assert builtin["data"]["builtin_http_per_cpu_second_ratio"] == pytest.approx(
        data["builtin_http_per_cpu_second"] / data["tessera_envoy_per_cpu_second"])
    assert builtin["value"] == data["builtin_http_per_cpu_second"]
    # Measured in turn with the Envoy pair: one round when quick, its ratio the figure's.
    assert builtin["data"]["builtin_http_round_1_ratio"] == pytest.approx(
        builtin["data"]["builtin_http_per_cpu_second_ratio"])
    assert "builtin_http_round_2_ratio" not in builtin["data"]


@pytest.mark.timeout(120)
def test_the_built_in_http_pair_routes_by_host_and_logs_each_request(
    tmp_path: Path, backend: int
) -> None:
    with mesh_deployment(tmp_path) as agent, builtin_http_pair(
            tmp_path / "builtin_http", agent.socket_path, backend) as (port, pids):
        answer = httpx.get(f"http://127.0.0.1:{port}/", headers={"host": BUILTIN_SERVICE},
                           timeout=10)
        unknown = httpx.get(f"http://127.0.0.1:{port}/", headers={"host": "elsewhere"},
                            timeout=10)
    assert (answer.status_code, answer.text) == (200, "ok from the backend\n")
    assert unknown.status_code == 404
    assert len(pids) == 2
    # Each sidecar's stdout, its access log, went to a file: the request on both sides,
    # the callee's line naming the caller's SPIFFE ID.
    logs = {side: [json.loads(line) for line in
                   (tmp_path / "builtin_http" / f"{side}.access.log").read_text().splitlines()]
            for side in ("outbound", "inbound")}  # fmt: skip
    assert {line["authority"] for line in logs["outbound"]} >= {BUILTIN_SERVICE, "elsewhere"}
    assert {line["source"] for line in logs["inbound"]} == {CLIENT_ID}


def _as_svids(files: dict[str, Path], server: str, client: str) -> dict[str, dict[str, Path]]:
    """The bench's certificates for ``server`` and ``client`` in the places of the static
    pair's users-service and client SVIDs."""
    return {
        spiffe_id: {"svid.pem": files[f"{name}.pem"], "svid.key": files[f"{name}.key"],
                    "bundle.pem": files["bundle.pem"]}
        for spiffe_id, name in ((SERVER_ID, server), (CLIENT_ID, client))
    }  # fmt: skip


def _through_envoy(port: int) -> httpx.Response:
    return httpx.get(f"http://127.0.0.1:{port}/", headers={"host": SERVICE}, timeout=10)


@pytest.fixture
def envoy() -> Path:
    try:
        return find_envoy()
    except Exception as err:
        missing_service(str(err))
        raise


@pytest.mark.envoy
def test_the_static_envoy_pair_relays_over_http2_between_the_expected_ids(
    tmp_path: Path, backend: int, envoy: Path
) -> None:
    files = write_certificates(tmp_path / "certificates", names=("users", "client"))
    with static_envoy_pair(envoy, tmp_path / "static", _as_svids(files, "users", "client"),
                           backend) as pair:  # fmt: skip
        answer = _through_envoy(pair.port)
        connections = pair.upstream_connections()
    assert (answer.status_code, answer.text) == (200, "ok from the backend\n")
    assert connections == (0, 1)  # one HTTP/2 connection, no HTTP/1.1


@pytest.mark.envoy
def test_the_static_envoy_outbound_refuses_an_inbound_with_another_spiffe_id(
    tmp_path: Path, backend: int, envoy: Path
) -> None:
    files = write_certificates(tmp_path / "certificates", names=("server", "client"))
    with static_envoy_pair(envoy, tmp_path / "static", _as_svids(files, "server", "client"),
                           backend) as pair:  # fmt: skip
        answer = _through_envoy(pair.port)
        stats = httpx.get(f"{pair.admins['outbound']}/stats?filter=ssl.fail_verify_san",
                          timeout=10).text  # fmt: skip
    assert answer.status_code == 503
    assert "cluster.users.ssl.fail_verify_san: 1" in stats


@pytest.mark.envoy
def test_the_static_envoy_inbound_refuses_another_caller(
    tmp_path: Path, backend: int, envoy: Path
) -> None:
    files = write_certificates(tmp_path / "certificates", names=("users", "other"))
    with static_envoy_pair(envoy, tmp_path / "static", _as_svids(files, "users", "other"),
                           backend) as pair:  # fmt: skip
        answer = _through_envoy(pair.port)
    assert (answer.status_code, answer.text) == (403, "RBAC: access denied")
