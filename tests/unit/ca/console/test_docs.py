"""Every ``tessera server console`` command docs/console.md and docs/cli.md show parses with
the command's own flags (the integration tests run them)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from ca.cli.console import server_console

DOCS = Path(__file__).resolve().parents[4] / "docs"


def documented() -> list[str]:
    found = []
    for line in (DOCS / "console.md").read_text().splitlines():
        if line.startswith("tessera server console"):
            found.append(line)
    table = (DOCS / "cli.md").read_text()
    found += [re.sub(r"\[|\]", "", m) for m in re.findall(r"`(tessera server console[^`]*)`",
                                                          table)]
    return found


@pytest.mark.parametrize("command", documented())
def test_the_documented_command_parses(command: str) -> None:
    args = shlex.split(command)[3:]
    context = server_console.make_context("console", args)
    assert context.params["bind"]


def test_every_flag_is_documented_on_the_console_page() -> None:
    page = (DOCS / "console.md").read_text()
    flags = {opt for param in server_console.params for opt in param.opts
             if opt.startswith("--") and opt not in ("--help",)}
    missing = {flag for flag in flags if flag not in page
               and flag not in ("--admin-socket", "--data-dir", "--output", "--config")}
    assert not missing
    assert len(documented()) >= 4


def test_the_observability_page_s_scrape_config_is_one_prometheus_accepts(
    tmp_path: Path,
) -> None:
    import shutil
    import subprocess

    from tests.conftest import missing_service

    page = (DOCS / "observability.md").read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", page, re.DOTALL)
    assert len(blocks) == 1
    promtool = shutil.which("promtool")
    if promtool is None:
        missing_service("needs Debian's prometheus (its promtool)")
    config = tmp_path / "prometheus.yml"
    config.write_text(blocks[0])
    checked = subprocess.run([str(promtool), "check", "config", str(config)],
                             capture_output=True, text=True, timeout=60)  # fmt: skip
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "tessera-server" in blocks[0] and "tessera-sidecar" in blocks[0]


def test_the_dashboard_asks_for_its_prometheus_and_queries_every_part() -> None:
    import json

    dashboard = json.loads((DOCS / "grafana" / "tessera-dashboard.json").read_text())
    assert dashboard["templating"]["list"][0]["type"] == "datasource"
    rows = [p["title"] for p in dashboard["panels"] if p["type"] == "row"]
    assert rows == ["Server", "Agents", "Mesh: built-in data plane", "Mesh: Envoy data plane",
                    "Sidecars (both planes)"]
    queries = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert all(p["datasource"]["uid"] == "${datasource}"
               for p in dashboard["panels"] if p["type"] != "row")
    for prefix in ("tessera_server_", "tessera_agent_", "tessera_sidecar_requests_total",
                   "envoy_cluster_"):
        assert any(prefix in q for q in queries), prefix
