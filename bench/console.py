"""The web console's pages with a large trust domain: 10,000 entries, 1,000 agents and
10,000 issued SVIDs in the datastore.

The datastore is filled directly (``ca.datastore``) before ``tessera server run``
starts on it; ``tessera server console`` then runs beside it, and each page is fetched
the way a browser does (signed in with the printed token), timed from request to the
last byte. Beside each page, the ceiling: the admin API call the page is built on,
timed alone over the admin socket in the same run — what the page adds is rendering.

    python bench/run.py --only console

Target: every page under 300 ms (the median; the p95 is in the JSON).
"""

from __future__ import annotations

import json
import secrets
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx

from bench.deployment import TESSERA, TRUST_DOMAIN, running_server
from bench.report import Figure

NAME = "console"
TARGET_SECONDS = 0.3
START_DEADLINE = 30.0


@dataclass(frozen=True)
class Sizes:
    entries: int
    agents: int
    svids: int
    runs: int


FULL = Sizes(entries=10_000, agents=1_000, svids=10_000, runs=15)
QUICK = Sizes(entries=200, agents=20, svids=200, runs=2)

# page → (the admin API call it is built on, its parameters)
PAGES: dict[str, tuple[str, dict[str, object]]] = {
    "/trust-domain": ("/v1/trustdomain", {}),
    "/agents": ("/v1/agents", {}),
    "/entries": ("/v1/entries/search", {"limit": 100}),
    "/entries?q=workload-77": ("/v1/entries/search", {"q": "workload-77", "limit": 100}),
    "/svids?within=24h": ("/v1/svids", {"expiring_within": 86400, "limit": 500}),
    "/audit": ("/v1/audit", {"limit": 200}),
    "/mesh": ("/v1/mesh/services", {}),
}


def fill(data_dir: Path, sizes: Sizes) -> None:
    """Entries, agents and issued SVIDs straight into the datastore."""
    from ca.datastore import Datastore, IssuedSvid, NewEntry
    from ca.datastore.records import Selector

    data_dir.mkdir(parents=True, exist_ok=True)
    store = Datastore.open(f"sqlite:///{data_dir.resolve() / 'datastore.sqlite3'}")
    now = datetime.now(UTC)
    try:
        parent = f"spiffe://{TRUST_DOMAIN}/node/bench"
        for n in range(sizes.entries):
            store.create_entry(NewEntry(
                f"spiffe://{TRUST_DOMAIN}/workload-{n}", parent,
                selectors=(Selector("unix", f"uid:{1000 + n}"),)))
        for n in range(sizes.agents):
            store.register_agent(
                f"spiffe://{TRUST_DOMAIN}/spire/agent/join_token/{secrets.token_hex(8)}",
                attestation_type="join_token", serial=format(n + 1, "x"),
                expires_at=now + timedelta(hours=1))
        batch = [IssuedSvid(secrets.token_hex(16), f"spiffe://{TRUST_DOMAIN}/workload-{n}",
                            "x509", None, "bench", now + timedelta(seconds=60 + n))
                 for n in range(sizes.svids)]
        store.record_issued_svids(batch)
    finally:
        store.close()


@contextmanager
def running_console(data_dir: Path) -> Iterator[dict[str, object]]:
    log = data_dir.parent / "console.log"
    with log.open("ab") as errors:
        process = subprocess.Popen(
            [TESSERA, "server", "console", "--data-dir", str(data_dir), "--bind",
             "127.0.0.1:0", "--output", "json"], stdout=subprocess.PIPE, stderr=errors)
    try:
        assert process.stdout is not None
        line = process.stdout.readline()  # the command prints its URL once it listens
        if not line:
            raise RuntimeError(f"tessera server console exited:\n{log.read_text()}")
        yield json.loads(line)
    finally:
        process.terminate()
        process.wait(timeout=15)


def _median_and_p95(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    return statistics.median(ordered), ordered[min(len(ordered) - 1,
                                                   int(0.95 * len(ordered)))]


def _timed(client: httpx.Client, path: str, params: dict[str, object] | None = None
           ) -> float:
    began = time.perf_counter()
    answer = client.get(path, params=params)  # type: ignore[arg-type]
    elapsed = time.perf_counter() - began
    if answer.status_code != 200:
        raise RuntimeError(f"{path} answered {answer.status_code}: {answer.text[:300]}")
    return elapsed


def run(quick: bool) -> list[Figure]:
    sizes = QUICK if quick else FULL
    figures: list[Figure] = []
    with tempfile.TemporaryDirectory(prefix="tessera-bench-console-") as tmp:
        data_dir = Path(tmp) / "server"
        fill(data_dir, sizes)
        with running_server(data_dir) as server, running_console(data_dir) as printed:
            admin = httpx.Client(transport=httpx.HTTPTransport(uds=str(server.admin_socket)),
                                 base_url="http://tessera", timeout=30)
            browser = httpx.Client(base_url=f"http://127.0.0.1:{printed['port']}", timeout=30)
            with admin, browser:
                browser.get(str(printed["url"]))  # spends the token, keeps the cookie
                for page, (call, params) in PAGES.items():
                    _timed(browser, page)  # warm: the first render compiles the template
                    pages = [_timed(browser, page) for _ in range(sizes.runs)]
                    calls = [_timed(admin, call, params) for _ in range(sizes.runs)]
                    value, p95 = _median_and_p95(pages)
                    alone, _ = _median_and_p95(calls)
                    figures.append(Figure(
                        NAME, f"page {page} ({sizes.entries:,} entries, "
                              f"{sizes.agents:,} agents)",
                        value * 1000, " ms",
                        ceiling=f"admin API {call} alone {alone * 1000:.1f} ms",
                        target=f"< {TARGET_SECONDS * 1000:.0f} ms",
                        met=value < TARGET_SECONDS,
                        data={"p95_ms": p95 * 1000, "admin_call_ms": alone * 1000}))
    return figures
