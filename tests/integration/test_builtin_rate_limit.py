"""A RateLimit on the built-in sidecar's inbound, called directly over mTLS by two callers:
the one it names gets 429 once its bucket is empty, the other is never limited; deleting
the RateLimit lets the first through again.

    limited   limited-service's instance, behind ``tessera sidecar run --proxy builtin``
    web       the caller the RateLimit names (1 request a second, bursts of 3)
    reports   a caller it does not name
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest
from spiffe import SpiffeId

from sdk import WorkloadApiX509Source, authorize_id
from sdk.integrations.httpx import httpx_client
from sdk.sidecar.connect import connect_x509_source
from tests.integration.mesh_fixtures import DEADLINE, App, ProxyStarter, mesh
from tests.integration.sidecar_fixtures import Entry, TrustDomain, processes, trust_domain
from tests.support.processes import poll

pytestmark = [pytest.mark.integration]

LIMITED = "spiffe://example.org/limited"
WEB = "spiffe://example.org/web"
REPORTS = "spiffe://example.org/reports"

MESH = f"""\
apiVersion: tessera.io/v1alpha1
kind: Service
metadata: {{name: limited-service}}
spec:
  spiffeIds: [{LIMITED}]
  ports: [{{number: 80, name: http, protocol: HTTP}}]
---
apiVersion: tessera.io/v1alpha1
kind: RateLimit
metadata: {{name: web-to-limited}}
spec:
  service: limited-service
  from: {{principals: [{WEB}]}}
  requestsPerSecond: 1
  burst: 3
"""


@pytest.fixture(scope="module")
def domain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TrustDomain]:
    entries = [Entry(LIMITED), Entry(WEB), Entry(REPORTS)]
    with trust_domain(tmp_path_factory.mktemp("ratelimit"), entries) as running:
        running.admin().post("/v1/mesh/apply", content=MESH.encode(),
                             headers={"content-type": "application/yaml"})  # fmt: skip
        yield running


@pytest.fixture(scope="module")
def callers(domain: TrustDomain) -> Iterator[dict[str, WorkloadApiX509Source]]:
    sources = {spiffe_id: connect_x509_source(domain.endpoint, spiffe_id=SpiffeId(spiffe_id))
               for spiffe_id in (WEB, REPORTS)}  # fmt: skip
    yield sources
    for source in sources.values():
        source.close()


def test_the_builtin_inbound_answers_429_to_the_caller_a_rate_limit_names_only(
    domain: TrustDomain,
    tmp_path_factory: pytest.TempPathFactory,
    callers: dict[str, WorkloadApiX509Source],
) -> None:
    app = App.serving("limited-1")
    try:
        with processes() as begin:
            start = ProxyStarter(domain, begin, tmp_path_factory.mktemp("ratelimit-proxies"))
            sidecar = start.sidecar("limited-builtin", "limited-service", LIMITED, app,
                                    "app=limited", plane="builtin")  # fmt: skip
            sidecar.wait_ready()  # its first mesh snapshot (with the RateLimit) in effect
            url = f"https://{sidecar.address}/"
            with (
                httpx_client(callers[WEB], authorize_id(LIMITED), timeout=10) as web,
                httpx_client(callers[REPORTS], authorize_id(LIMITED), timeout=10) as reports,
            ):
                began = time.monotonic()
                answers: list[httpx.Response] = []

                def limited() -> httpx.Response | None:
                    answers.append(web.get(url))
                    return answers[-1] if answers[-1].status_code == 429 else None

                refused = poll(limited, DEADLINE, "web's requests limited with 429")
                elapsed = time.monotonic() - began
                others = [reports.get(url) for _ in range(10)]
                after = [web.get(url).status_code for _ in range(3)]

                # The deleted RateLimit reaches the sidecar: web passes again.
                mesh(domain, "delete", "ratelimit", "web-to-limited")
                poll(lambda: web.get(url).status_code == 200 or None, DEADLINE,
                     "web's requests answered 200 once the RateLimit is deleted")  # fmt: skip
    finally:
        app.stop()

    passed = [answer.status_code for answer in answers[:-1]]
    # A full bucket of 3, then at most one more token for each whole second that passed.
    assert set(passed) == {200}
    assert 3 <= len(passed) <= 3 + int(elapsed), (passed, elapsed)
    assert refused.text == (
        f"{WEB} refused by policy rule 'RateLimit web-to-limited spec': too many requests: "
        "RateLimit web-to-limited allows 1 request a second in bursts of 3 (one bucket shared "
        f"by the callers it names); try again in {refused.text.rsplit(' ', 1)[1]}"
    )
    assert refused.headers["x-envoy-ratelimited"] == "true"
    assert [(answer.status_code, answer.json()["caller"]) for answer in others] == [
        (200, [REPORTS])
    ] * 10
    assert 429 in after  # web's bucket was still empty (or nearly) for its next requests
