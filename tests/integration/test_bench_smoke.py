"""The benchmarks still run: ``bench/run.py --quick`` (tiny sizes) end to end.

No timing is asserted here; ``make bench`` is where the figures come from.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
REPOSITORY = Path(__file__).resolve().parents[2]
SCENARIOS = ["issuance", "workload_api", "agent_footprint", "propagation", "mtls_proxy",
             "handshakes"]


@pytest.mark.timeout(300)
def test_every_bench_runs_with_tiny_sizes(tmp_path: Path) -> None:
    results = tmp_path / "bench.json"
    run = subprocess.run(
        [sys.executable, str(REPOSITORY / "bench" / "run.py"), "--quick", "--json",
         str(results)],
        capture_output=True, text=True, timeout=280, cwd=tmp_path,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    document = json.loads(results.read_text())
    by_name = {s["scenario"]: s for s in document["scenarios"]}
    assert list(by_name) == SCENARIOS
    for name, outcome in by_name.items():
        assert outcome["failed"] == "", f"{name}: {outcome['failed']}\n{run.stderr}"
        if name == "mtls_proxy" and outcome["skipped"]:
            continue  # needs wrk and nginx from Debian; the table says so
        assert outcome["skipped"] == "", f"{name} skipped: {outcome['skipped']}"
        assert outcome["figures"], name
    assert "| scenario" in run.stdout
    assert "issuance" in run.stdout and "handshakes" in run.stdout


def test_an_unknown_scenario_is_a_usage_error() -> None:
    run = subprocess.run(
        [sys.executable, str(REPOSITORY / "bench" / "run.py"), "--only", "warp-drive"],
        capture_output=True, text=True, timeout=60,
    )
    assert run.returncode == 2
    assert "invalid choice: 'warp-drive'" in run.stderr
