"""``tessera server console`` as its users meet it, over HTTP: who gets in, what each page
shows of a real server and agent, the changes behind --write, and mTLS for admin IDs.

The browser's view of the same pages is tests/integration/test_console_browser.py.
"""

from __future__ import annotations

import re
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.conftest import TESSERA, tessera
from tests.integration.console_fixtures import (  # registers start_console
    ConsoleProcess,
    start_console_fixture,  # noqa: F401
)
from tests.integration.sidecar_fixtures import ALIAS, Entry, TrustDomain, trust_domain
from tests.support.processes import poll

pytestmark = pytest.mark.integration

USERS = "spiffe://example.org/users"
OPS = "spiffe://example.org/ops"
DEADLINE = 15.0

MESH = f"""\
apiVersion: tessera.io/v1alpha1
kind: Service
metadata: {{name: users-service}}
spec:
  spiffeIds: [{USERS}]
  ports: [{{number: 80, name: http, protocol: HTTP}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: deny-intruder}}
spec:
  action: DENY
  rules:
  - from:
    - source: {{principals: [spiffe://example.org/intruder]}}
"""


@pytest.fixture(scope="module")
def domain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TrustDomain]:
    with trust_domain(tmp_path_factory.mktemp("console"), [Entry(USERS)]) as running:
        tessera("mesh", "apply", "-f", "-", "--data-dir", str(running.server.data_dir),
                input=MESH)  # fmt: skip
        yield running


def page(client: httpx.Client, path: str, **kwargs: Any) -> str:
    answer = client.get(path, **kwargs)
    assert answer.status_code == 200, (path, answer.status_code, answer.text[:2000])
    return answer.text


def test_only_the_printed_token_gets_in_and_only_once(
    domain: TrustDomain, start_console: Any
) -> None:
    console: ConsoleProcess = start_console(domain.server)
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+/\?token=[\w-]{43}", console.url)
    with httpx.Client(base_url=console.base, timeout=10) as stranger:
        refused = stranger.get("/agents")
        assert refused.status_code == 403
        assert "needs its one-time token" in refused.text
        wrong = stranger.get("/agents", params={"token": "guess"})
        assert wrong.status_code == 403 and "not valid or was used already" in wrong.text
        assert stranger.get("/events").status_code == 403
        # Health and metrics answer anyone, as on every Tessera process.
        assert stranger.get("/live").text == "ok\n"
        poll(lambda: stranger.get("/ready").status_code == 200 or None, DEADLINE,
             "the console following the server")  # fmt: skip

    with console.signed_in() as browser:
        redirected = browser.get(console.url)  # the same token, a second time
        assert redirected.status_code == 403
        # The session (not the token) opens the pages, and the token left the URL.
        assert "Agents" in page(browser, "/agents")
        rebound = browser.get("/agents", headers={"Host": "tessera.attacker.example"})
        assert rebound.status_code == 400 and "own loopback address" in rebound.text
        metrics = page(browser, "/metrics")
        assert 'tessera_console_requests_total{code="200",page="agents"}' in metrics


def test_the_pages_show_the_trust_domain_its_agent_entries_and_mesh(
    domain: TrustDomain, start_console: Any
) -> None:
    admin = domain.admin()
    active = next(a for a in admin.get("/v1/localauthority/x509")["authorities"]
                  if a["status"] == "active")
    console: ConsoleProcess = start_console(domain.server)
    with console.signed_in() as browser:
        trust = page(browser, "/trust-domain")
        assert active["authority_id"] in trust and "Next prepare" in trust

        agents = page(browser, "/agents")
        assert admin.get("/v1/agents")["agents"][0]["spiffe_id"] in agents
        assert 'class="pill active"' in agents  # it synced a moment ago

        entries = page(browser, "/entries", params={"q": "users"})
        assert USERS in entries and 'id="entries-total">1<' in entries
        entry_id = re.search(r'href="/entries/([^"]+)"', entries)
        assert entry_id is not None
        detail = page(browser, f"/entries/{entry_id[1]}")
        assert USERS in detail and "Workloads that matched it recently" in detail
        nothing = page(browser, "/entries", params={"q": "no-such-workload"})
        assert 'id="entries-total">0<' in nothing
        bad = browser.get("/entries", params={"selector": "no-colon"})
        assert bad.status_code == 200 and 'class="problem"' in bad.text
        nul = page(browser, "/entries", params={"q": "\x00"})
        assert "cannot hold a NUL" in nul and 'id="entries-total">0<' in nul
        past = page(browser, "/entries", params={"q": "users", "offset": "500"})
        assert "past the last of them" in past and "No entry on this page." in past

        assert "SVIDs expiring soon" in page(browser, "/svids", params={"within": "7d"})
        audit = page(browser, "/audit")
        assert "entry.create" in audit
        assert "Hash chain intact" in page(browser, "/audit/chain")

        mesh = page(browser, "/mesh")
        assert "users-service" in mesh and "--prometheus URL" in mesh
        service = page(browser, "/mesh/services/users-service")
        assert "[Service users-service" not in service and "Service users-service" in service
        missing = browser.get("/mesh/services/nope")
        assert missing.status_code == 404 and "nope" in missing.text


def test_explain_names_the_rule_that_refuses(domain: TrustDomain, start_console: Any) -> None:
    console: ConsoleProcess = start_console(domain.server)
    with console.signed_in() as browser:
        form = page(browser, "/explain")
        token = re.search(r'name="form_token" value="([0-9a-f]+)"', form)
        assert token is not None
        fields = {"form_token": token[1], "to": "users-service", "method": "GET",
                  "path": "/", "headers": "", "port": ""}
        refused = browser.post("/explain", data={**fields,
                                                 "from": "spiffe://example.org/intruder"})
        assert refused.status_code == 200, refused.text
        assert re.search(r'Refused by <strong id="deciding-rule">AuthorizationPolicy '
                         r"deny-intruder</strong>", refused.text)
        allowed = browser.post("/explain", data={**fields, "from": "spiffe://example.org/web"})
        assert 'id="verdict">\nAllowed by' in allowed.text
        outcome = re.search(r"Outcome: <strong>(\w+)</strong>", allowed.text)
        assert outcome is not None
        # Allowed but not forwarded (no healthy instance, say) is not shown as a success.
        assert ('class="verdict allowed"' in allowed.text) == (outcome[1] == "forwarded")
        assert ("but not forwarded" in allowed.text) == (outcome[1] != "forwarded")

        no_port = browser.post("/explain", data={**fields, "port": "99999",
                                                 "from": "spiffe://example.org/web"})
        assert no_port.status_code == 400 and "a number from 1 to 65535" in no_port.text
        nobody = browser.post("/explain", data={**fields, "from": " "})
        assert nobody.status_code == 400 and "are needed" in nobody.text
        huge = browser.post("/explain", data={**fields, "headers": "x: " + "y" * 70_000,
                                              "from": "spiffe://example.org/web"})
        assert huge.status_code == 400 and "larger than 64 KiB" in huge.text

        not_an_id = browser.post("/explain", data={**fields, "from": "web"})
        assert not_an_id.status_code == 400 and 'class="problem"' in not_an_id.text
        stale = browser.post("/explain", data={**fields, "form_token": "0" * 64,
                                               "from": "spiffe://example.org/web"})
        assert stale.status_code == 400 and "form has expired" in stale.text
        bad_header = browser.post("/explain", data={**fields, "headers": "oops",
                                                    "from": "spiffe://example.org/web"})
        assert bad_header.status_code == 400 and "header line 1" in bad_header.text


def test_over_mtls_only_admin_spiffe_ids_get_in(
    domain: TrustDomain, start_console: Any, tmp_path: Path
) -> None:
    admin = domain.admin()
    admin.post("/v1/entries", json={
        "parent_id": ALIAS, "spiffe_id": OPS,
        "selectors": ["unix:uid:65534"], "admin": True})

    def credentials(spiffe_id: str) -> ssl.SSLContext:
        minted = admin.post("/v1/x509/mint", json={"spiffe_id": spiffe_id, "ttl": "10m"})
        (tmp_path / "cert.pem").write_text(minted["svid"])
        (tmp_path / "key.pem").write_text(minted["key"])
        (tmp_path / "bundle.pem").write_text(minted["bundle"])
        context = ssl.create_default_context(cafile=str(tmp_path / "bundle.pem"))
        context.check_hostname = False  # the console presents an X509-SVID, no DNS name
        context.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
        return context

    console: ConsoleProcess = start_console(domain.server, "--mtls")
    assert console.url.startswith("https://127.0.0.1:")
    url = console.url + "agents"
    ops = credentials(OPS)
    answer = poll(lambda: (r if (r := httpx.get(url, verify=ops)).status_code == 200 else None),
                  DEADLINE, "the console letting the admin ID in")  # fmt: skip
    assert "Agents" in answer.text
    stranger = httpx.get(url, verify=credentials("spiffe://example.org/someone"))
    assert stranger.status_code == 403 and "is not registered as admin" in stranger.text
    anonymous = ssl.create_default_context(cafile=str(tmp_path / "bundle.pem"))
    anonymous.check_hostname = False
    with pytest.raises(httpx.HTTPError):
        httpx.get(url, verify=anonymous)


def test_the_command_refuses_a_public_address_without_mtls_and_a_missing_server(
    tmp_path: Path,
) -> None:
    public = subprocess.run([TESSERA, "server", "console", "--bind", "0.0.0.0:8282"],
                            capture_output=True, text=True, timeout=30)  # fmt: skip
    assert public.returncode == 2
    assert "is not a loopback address" in public.stderr and "--mtls" in public.stderr
    window = subprocess.run([TESSERA, "server", "console", "--rate-window", "soon"],
                            capture_output=True, text=True, timeout=30)  # fmt: skip
    assert window.returncode == 2 and "not a Prometheus duration" in window.stderr
    nobody = subprocess.run([TESSERA, "server", "console", "--data-dir", str(tmp_path)],
                            capture_output=True, text=True, timeout=30)  # fmt: skip
    assert nobody.returncode == 1, nobody.stderr
    assert "cannot reach the server's admin socket" in nobody.stderr
    assert "Traceback" not in nobody.stderr


# Last: it bans and unbans the module's agent.
def test_changes_need_write_mode_a_confirmation_and_the_session_s_form(
    domain: TrustDomain, start_console: Any
) -> None:
    read_only: ConsoleProcess = start_console(domain.server)
    agent_id = domain.admin().get("/v1/agents")["agents"][0]["spiffe_id"]
    with read_only.signed_in() as browser:
        assert "evict</a>" not in page(browser, "/agents")
        refused = browser.get("/agents/confirm", params={"action": "evict",
                                                         "spiffe_id": agent_id})
        assert refused.status_code == 403 and "--write" in refused.text

    writable: ConsoleProcess = start_console(domain.server, "--write")
    with writable.signed_in() as browser:
        listed = page(browser, "/agents")
        assert "ban</a>" in listed
        confirm = page(browser, "/agents/confirm", params={"action": "ban",
                                                           "spiffe_id": agent_id})
        token = re.search(r'name="form_token" value="([0-9a-f]+)"', confirm)
        assert token is not None and "Ban this agent?" in confirm
        forged = browser.post("/agents/act", data={"action": "ban", "spiffe_id": agent_id,
                                                   "form_token": "f" * 64})
        assert forged.status_code == 403
        assert not domain.admin().get("/v1/agents/show", params={"spiffe_id": agent_id})[
            "banned"]
        done = browser.post("/agents/act", data={"action": "ban", "spiffe_id": agent_id,
                                                 "form_token": token[1]})
        assert done.status_code == 303
        assert domain.admin().get("/v1/agents/show", params={"spiffe_id": agent_id})["banned"]
        assert "Ban: " + agent_id in page(browser, done.headers["location"])
        unban = browser.post("/agents/act", data={"action": "unban", "spiffe_id": agent_id,
                                                  "form_token": token[1]})
        assert unban.status_code == 303
        assert not domain.admin().get("/v1/agents/show", params={"spiffe_id": agent_id})[
            "banned"]
