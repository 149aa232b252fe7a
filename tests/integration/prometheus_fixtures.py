"""Debian's Prometheus, on loopback, scraping Tessera processes the way an operator's does.

    with start_prometheus(tmp_path / "prometheus", [Target("agent", "127.0.0.1:8088")]) as p:
        p.wait_for_targets()
        p.query('sum(rate(tessera_sidecar_requests_total[30s]))')   # [(labels, value)]

It scrapes every second. The scrape configuration is :func:`scrape_config`, the one
docs/observability.md shows. Without ``/usr/bin/prometheus`` a test skips (fails with
TESSERA_REQUIRE_SERVICES=1).
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.conftest import missing_service
from tests.integration.conftest import ServerProcess, free_port
from tests.support.processes import Process

PROMETHEUS = "/usr/bin/prometheus"
DEADLINE = 30.0


@dataclass(frozen=True)
class Target:
    """One process to scrape: its job (``server``, ``agent``, ``sidecar``, ...), its
    ``HOST:PORT``, and for the server's TLS listener, the trust bundle."""

    job: str
    address: str
    scheme: str = "http"
    ca_file: Path | None = None

    @classmethod
    def server(cls, server: ServerProcess, bundle_path: Path) -> Target:
        """The server's /metrics, on its node API (HTTPS; no client certificate needed)."""
        bundle_path.write_text(server.cli("bundle", "show").stdout)
        return cls("server", server.address, "https", bundle_path)


def scrape_config(targets: Sequence[Target], interval: str = "1s") -> dict[str, Any]:
    """A Prometheus configuration scraping ``targets``, one job each kind."""
    jobs: dict[tuple[str, str, Path | None], list[str]] = {}
    for target in targets:
        jobs.setdefault((target.job, target.scheme, target.ca_file), []).append(target.address)
    scrapes = []
    for (job, scheme, ca_file), addresses in jobs.items():
        scrape: dict[str, Any] = {"job_name": job, "scheme": scheme,
                                  "static_configs": [{"targets": addresses}]}
        if ca_file is not None:
            # The server presents an X509-SVID: a SPIFFE ID and no DNS name or IP
            # address for Prometheus to match the address against, and Prometheus cannot
            # check the chain without the name. Its /metrics are public (as /live and
            # /ready are), so they are read without checking the certificate.
            scrape["tls_config"] = {"ca_file": str(ca_file), "insecure_skip_verify": True}
        scrapes.append(scrape)
    return {"global": {"scrape_interval": interval, "scrape_timeout": interval,
                       "evaluation_interval": interval},
            "scrape_configs": scrapes}


class Prometheus:
    def __init__(self, process: Process, port: int, targets: Sequence[Target]) -> None:
        self.process = process
        self.port = port
        self.targets = targets

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def api(self, path: str, **params: str) -> Any:
        answer = httpx.get(f"{self.url}/api/v1/{path}", params=params, timeout=10)
        document = answer.json()
        assert document.get("status") == "success", document
        return document["data"]

    def wait_for_targets(self) -> None:
        """Until every target was scraped and answered (``up``)."""
        wanted = {t.address for t in self.targets}

        def all_up() -> bool | None:
            with contextlib.suppress(httpx.HTTPError):
                active = self.api("targets")["activeTargets"]
                up = {t["labels"]["instance"] for t in active if t["health"] == "up"}
                return True if wanted <= up else None
            return None

        self.process.wait_until(all_up, f"scraping {sorted(wanted)}", DEADLINE)

    def query(self, promql: str) -> list[tuple[dict[str, str], float]]:
        """An instant query: (labels, value) per series."""
        result = self.api("query", query=promql)["result"]
        return [(dict(r["metric"]), float(r["value"][1])) for r in result]


@contextlib.contextmanager
def start_prometheus(directory: Path, targets: Sequence[Target]) -> Iterator[Prometheus]:
    if shutil.which(PROMETHEUS) is None:
        missing_service("needs Debian's prometheus (apt-get install prometheus)")
    directory.mkdir(parents=True, exist_ok=True)
    config = directory / "prometheus.yml"
    config.write_text(yaml.safe_dump(scrape_config(targets), sort_keys=False))
    port = free_port()
    process = Process.start("prometheus", [
        PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={directory / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn",
    ], log_path=directory / "prometheus.log")
    try:
        running = Prometheus(process, port, targets)
        process.wait_until(lambda: _ready(running), "answering /-/ready", DEADLINE)
        yield running
    finally:
        process.stop()


def _ready(prometheus: Prometheus) -> bool | None:
    with contextlib.suppress(httpx.HTTPError):
        return httpx.get(f"{prometheus.url}/-/ready", timeout=2).status_code == 200 or None
    return None


def parse_metrics(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """A /metrics page's samples by name (for checking what a process exports)."""
    from prometheus_client.parser import text_string_to_metric_families

    found: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    return found

