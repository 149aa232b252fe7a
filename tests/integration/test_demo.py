"""`tessera demo` as a newcomer runs it: it must show what it promises, and pass."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.integration.conftest import TESSERA

pytestmark = pytest.mark.integration


def test_the_demo_shows_mtls_a_refusal_and_live_rotation() -> None:
    result = subprocess.run(
        [TESSERA, "demo", "--duration", "10", "--svid-ttl", "4", "--output", "json"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["failures"] == 0
    assert report["requests"] >= 10
    assert json.loads(report["allowed_call"]) == {
        "hello": "spiffe://demo.example/web", "from": "api"}
    assert "spiffe://demo.example/intruder refused by policy rule 'default-deny'" in (
        report["refused_call"])
    assert sum(report["rotations"].values()) >= 2
    # The story a person reads goes to stderr with --output json.
    assert "4. Calls through the sidecars:" in result.stderr
    assert "Traceback" not in result.stderr
