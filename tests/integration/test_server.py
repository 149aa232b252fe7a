"""`tessera server` as an operator uses it: real processes, real files, real openssl."""

from __future__ import annotations

import base64
import functools
import json
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from spiffe import JwtBundle, JwtSvid, SpiffeId, TrustDomain, X509Svid

from sdk.csr import build_csr
from tests.integration.conftest import ServerProcess

pytestmark = pytest.mark.integration
TD = TrustDomain("example.org")
LINT = str(Path(sys.executable).parent / "lint_pkix_cert")


def openssl_verify(bundle: Path, leaf: Path, untrusted: Path | None = None) -> str:
    args = ["openssl", "verify", "-CAfile", str(bundle)]
    if untrusted is not None:
        args += ["-untrusted", str(untrusted)]
    result = subprocess.run([*args, str(leaf)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def pkilint_errors(pem_file: Path) -> list[str]:
    """ERROR/FATAL findings of pkilint's lint_pkix_cert, less the spiffe:// URI syntax one."""
    result = subprocess.run([LINT, "lint", "-s", "ERROR", "-f", "JSON", str(pem_file)],
                            capture_output=True, text=True)
    findings = json.loads(result.stdout)["results"]
    problems = []
    for found in findings:
        for description in found["finding_descriptions"]:
            if description["code"] == "pkix.invalid_uri_syntax" and "spiffe://" in description[
                    "message"]:
                continue
            problems.append(f"{description['severity']} {description['code']}: "
                            f"{description['message']}")
    return problems


def split_pem(text: str) -> list[str]:
    marker = "-----END CERTIFICATE-----"
    return [part.strip() + "\n" + marker + "\n" for part in text.split(marker) if part.strip()]


# -- start and health --------------------------------------------------------------------


def test_server_starts_and_reports_healthy(server: ServerProcess) -> None:
    print(f"server became healthy {server.started_in:.2f}s after start")
    result = server.cli("healthcheck")
    assert result.stdout.strip() == "Server is healthy."
    health = server.cli_json("healthcheck")
    assert health["trust_domain"] == "example.org"
    assert health["status"] == "serving"
    assert health["node_api"] == server.address
    mode = (server.data_dir.stat().st_mode & 0o777, server.admin_socket.stat().st_mode & 0o777)
    assert mode == (0o700, 0o600)
    for key_file in (server.data_dir / "keys").iterdir():
        assert key_file.stat().st_mode & 0o777 == 0o600, key_file


def test_healthcheck_without_a_server_says_what_to_do(tmp_path: Path) -> None:
    from tests.integration.conftest import tessera

    result = tessera("server", "healthcheck", "--data-dir", str(tmp_path / "none"), check=False)
    assert result.returncode == 1
    assert result.stderr == (
        f"Error: no admin socket at {tmp_path / 'none' / 'admin.sock'} (not found): is the "
        "server running? 'tessera server run' listens on <data-dir>/admin.sock; pass "
        "--data-dir DIR or --admin-socket PATH\n"
    )


def test_metrics_and_readiness_over_the_node_api(server: ServerProcess) -> None:
    with httpx.Client(verify=False, base_url=f"https://{server.address}") as client:
        assert client.get("/ready").json() == {"status": "ready"}
        assert client.get("/live").status_code == 200
        metrics = client.get("/metrics").text
    assert "tessera_server_authority_expiry_timestamp_seconds" in metrics
    # Counts are taken at start, then every 15 s: restart to see a new one at once.
    server.cli("entry", "create", "--parent-id", "spiffe://example.org/node",
               "--spiffe-id", "spiffe://example.org/web", "--selector", "unix:uid:1")
    server.stop()
    server.start()
    deadline = time.monotonic() + 10
    with httpx.Client(verify=False, base_url=f"https://{server.address}") as client:
        while "\ntessera_server_entries 1.0" not in (metrics := client.get("/metrics").text):
            assert time.monotonic() < deadline, "the entry count never reached the metrics"
            time.sleep(0.1)
    assert "\ntessera_server_agents 0.0" in metrics


# -- X509-SVIDs --------------------------------------------------------------------------


def test_minted_x509_svid_verifies_parses_and_lints_clean(
    server: ServerProcess, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    server.cli("x509", "mint", "--spiffe-id", "spiffe://example.org/web", "--dns", "web.local",
               "--write", str(out))
    assert (out / "key.pem").stat().st_mode & 0o777 == 0o600
    bundle_file = tmp_path / "bundle.pem"
    bundle_file.write_text(server.cli("bundle", "show", "--format", "pem").stdout)
    assert openssl_verify(bundle_file, out / "svid.pem").strip().endswith("OK")

    svid = X509Svid.parse((out / "svid.pem").read_bytes(), (out / "key.pem").read_bytes())
    assert svid.spiffe_id == SpiffeId("spiffe://example.org/web")
    leaf = svid.leaf
    assert leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    key_usage = leaf.extensions.get_extension_for_class(x509.KeyUsage)
    assert key_usage.critical and key_usage.value.digital_signature
    assert not key_usage.value.key_encipherment

    assert pkilint_errors(out / "svid.pem") == []
    for number, pem in enumerate(split_pem(bundle_file.read_text())):
        ca_file = tmp_path / f"ca{number}.pem"
        ca_file.write_text(pem)
        assert pkilint_errors(ca_file) == [], f"CA certificate {number}"


def test_json_output_is_one_document(server: ServerProcess) -> None:
    minted = server.cli_json("x509", "mint", "--spiffe-id", "spiffe://example.org/api")
    assert minted["spiffe_id"] == "spiffe://example.org/api"
    assert "BEGIN CERTIFICATE" in str(minted["svid"])
    bundle = server.cli_json("bundle", "show")
    assert bundle["spiffe_sequence"] >= 1  # type: ignore[operator]
    # A join token lives 600 s unless --ttl says otherwise.
    before = datetime.now(UTC).replace(microsecond=0)
    token = server.cli_json("token", "generate", "--spiffe-id", "spiffe://example.org/node")
    after = datetime.now(UTC)
    expires = datetime.fromtimestamp(int(token["expires_at"]), UTC)  # type: ignore[call-overload]
    assert before + timedelta(seconds=600) <= expires <= after + timedelta(seconds=600)
    assert token["spiffe_id"] == "spiffe://example.org/node"


def test_the_admin_api_publishes_its_openapi_schema(server: ServerProcess) -> None:
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(server.admin_socket)),
                      base_url="http://tessera", timeout=10) as admin:  # fmt: skip
        schema = admin.get("/openapi.json").json()
    assert schema["info"]["title"] == "Tessera admin API"
    for path in ("/v1/entries", "/v1/tokens", "/v1/agents", "/v1/bundle", "/v1/audit/verify"):
        assert path in schema["paths"], sorted(schema["paths"])


# -- JWT-SVIDs ---------------------------------------------------------------------------


def jwt_bundle(server: ServerProcess) -> JwtBundle:
    """The JWT authorities of ``bundle show --format spiffe``, as py-spiffe's JwtBundle.

    py-spiffe parses a JWKS of JWT authorities only (it refuses keys without
    ``kid``, which the bundle's ``x509-svid`` keys rightly lack), so pass it those.
    """
    document = json.loads(server.cli("bundle", "show", "--format", "spiffe").stdout)
    keys = [k for k in document["keys"] if k["use"] == "jwt-svid"]
    assert keys and all(k["kid"] for k in keys)
    return JwtBundle.parse(TD, json.dumps({"keys": keys}).encode())


def test_minted_jwt_svid_validates_with_the_spiffe_package(server: ServerProcess) -> None:
    token = server.cli("jwt", "mint", "--spiffe-id", "spiffe://example.org/web",
                       "--audience", "db").stdout.strip()
    bundle = jwt_bundle(server)
    svid = JwtSvid.parse_and_validate(token, bundle, {"db"})
    assert svid.spiffe_id == SpiffeId("spiffe://example.org/web")
    with pytest.raises(Exception, match=r"Audience doesn.t match"):
        JwtSvid.parse_and_validate(token, bundle, {"other"})

    _, claims, _ = token.split(".")
    header_none = base64.urlsafe_b64encode(
        json.dumps({"alg": "none", "typ": "JWT"}).encode()).rstrip(b"=").decode()
    forged = f"{header_none}.{claims}."
    with pytest.raises(Exception, match=r"Algorithm not supported: none"):
        JwtSvid.parse_and_validate(forged, bundle, {"db"})


def test_expired_jwt_svid_is_refused(server: ServerProcess) -> None:
    token = server.cli("jwt", "mint", "--spiffe-id", "spiffe://example.org/web",
                       "--audience", "db", "--ttl", "1s").stdout.strip()
    bundle = jwt_bundle(server)
    deadline = time.monotonic() + 10
    while True:  # a one-second token, polled until it has expired
        try:
            JwtSvid.parse_and_validate(token, bundle, {"db"})
        except Exception as err:
            assert "expired" in str(err).lower()
            break
        assert time.monotonic() < deadline, "the token never expired"
        time.sleep(0.2)


# -- persistence -------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_state_survives_a_restart(
    backend: str, start_server: Callable[..., ServerProcess], request: pytest.FixtureRequest,
) -> None:
    db = request.getfixturevalue("postgres_url") if backend == "postgres" else None
    first = start_server(db=db)
    entry = first.cli_json("entry", "create", "--parent-id", "spiffe://example.org/node",
                           "--spiffe-id", "spiffe://example.org/web",
                           "--selector", "unix:uid:1000")
    token = first.cli_json("token", "generate", "--spiffe-id", "spiffe://example.org/node")
    bundle_before = first.cli("bundle", "show").stdout
    authorities_before = first.cli_json("localauthority", "x509", "show")
    first.stop()

    first.start()
    shown = first.cli_json("entry", "show", "--entry-id", str(entry["id"]))
    assert shown["entries"] == [entry]  # type: ignore[comparison-overlap]
    assert first.cli("bundle", "show").stdout == bundle_before
    assert first.cli_json("localauthority", "x509", "show") == authorities_before
    # The join token made before the restart still works, once.
    agent = NodeApiAgent(first)
    assert agent.attest(str(token["token"])).startswith(
        "spiffe://example.org/tessera/agent/join_token/")


# -- bad input ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--spiffe-id", "spiffe://example.org/web/", "--parent-id", "spiffe://example.org/n",
          "--selector", "unix:uid:1"], "path cannot contain empty segments"),
        (["--spiffe-id", "example.org/web", "--parent-id", "spiffe://example.org/n",
          "--selector", "unix:uid:1"], "does not start with 'spiffe://'"),
        (["--spiffe-id", "spiffe://example.org/web", "--parent-id", "spiffe://example.org/n",
          "--selector", "uid1000"], "is not of the form type:value"),
        (["--spiffe-id", "spiffe://example.org/web", "--parent-id", "spiffe://other.org/n",
          "--selector", "unix:uid:1"], "is not in trust domain example.org"),
        (["--spiffe-id", "spiffe://example.org/web", "--parent-id", "spiffe://example.org/n"],
         "needs at least one selector"),
        (["--spiffe-id", "spiffe://example.org/web", "--parent-id", "spiffe://example.org/n",
          "--selector", "unix:uid:1", "--x509-svid-ttl", "soon"], "is not a duration"),
        (["--spiffe-id", "spiffe://example.org/web", "--parent-id", "spiffe://example.org/n",
          "--selector", "unix:uid:1", "--dns", "bad_name!"], "is not a valid host name"),
    ],
)
def test_bad_entries_get_a_sentence_and_leave_nothing(
    server: ServerProcess, args: list[str], message: str
) -> None:
    result = server.cli("entry", "create", *args, check=False)
    assert result.returncode == 1
    assert message in result.stderr
    assert result.stderr.startswith("Error: ")
    assert "Traceback" not in result.stderr
    assert server.cli_json("entry", "count") == {"count": 0}


def test_an_unknown_flag_value_is_a_usage_error(server: ServerProcess) -> None:
    result = server.cli("bundle", "show", "--format", "xml", check=False)
    assert result.returncode == 2
    assert "'xml' is not one of 'pem', 'spiffe'" in result.stderr


def test_a_duplicate_entry_is_refused_by_name(server: ServerProcess) -> None:
    args = ["entry", "create", "--parent-id", "spiffe://example.org/node",
            "--spiffe-id", "spiffe://example.org/web", "--selector", "unix:uid:1000"]
    server.cli(*args)
    result = server.cli(*args, check=False)
    assert result.returncode == 1
    assert "exists already" in result.stderr
    assert server.cli_json("entry", "count") == {"count": 1}


def test_entries_are_updated_shown_and_deleted_through_the_cli(server: ServerProcess) -> None:
    created = server.cli_json(
        "entry", "create", "--parent-id", "spiffe://example.org/node", "--spiffe-id",
        "spiffe://example.org/web", "--selector", "unix:uid:1000", "--dns", "web.test",
        "--admin", "--x509-svid-ttl", "10m")  # fmt: skip
    server.cli("entry", "create", "--parent-id", "spiffe://example.org/node",
               "--spiffe-id", "spiffe://example.org/db", "--selector", "unix:uid:2000")
    entry_id = str(created["id"])
    assert (created["admin"], created["x509_svid_ttl"]) == (True, 600)

    updated = server.cli_json("entry", "update", "--entry-id", entry_id, "--no-admin",
                              "--selector", "unix:uid:1001", "--jwt-svid-ttl", "1m")  # fmt: skip
    assert updated["admin"] is False
    assert [f"{s['type']}:{s['value']}" for s in updated["selectors"]] == [  # type: ignore[index]
        "unix:uid:1001"]
    assert (updated["jwt_svid_ttl"], updated["x509_svid_ttl"]) == (60, 600)  # kept
    assert updated["dns_names"] == ["web.test"]  # kept
    assert updated["revision_number"] > created["revision_number"]  # type: ignore[operator]

    def shown(*filters: str) -> list[str]:
        entries = server.cli_json("entry", "show", *filters)["entries"]
        return sorted(str(e["spiffe_id"]) for e in entries)  # type: ignore[union-attr, index]

    assert shown() == ["spiffe://example.org/db", "spiffe://example.org/web"]
    assert shown("--selector", "unix:uid:1001") == ["spiffe://example.org/web"]
    assert shown("--spiffe-id", "spiffe://example.org/db") == ["spiffe://example.org/db"]
    assert shown("--entry-id", entry_id) == ["spiffe://example.org/web"]
    assert shown("--parent-id", "spiffe://example.org/other") == []

    assert server.cli("entry", "delete", "--entry-id", entry_id).stdout.strip() == (
        f"Deleted entry {entry_id}")
    assert server.cli_json("entry", "count") == {"count": 1}
    missing = server.cli("entry", "update", "--entry-id", entry_id, "--admin", check=False)
    assert missing.returncode == 1 and missing.stderr.startswith("Error: "), missing.stderr


def test_bad_requests_to_the_node_api_are_4xx_and_spend_nothing(server: ServerProcess) -> None:
    token = str(server.cli_json("token", "generate")["token"])
    url = f"https://{server.address}/v1/agent/attest"
    with httpx.Client(verify=False) as client:
        garbage = client.post(url, json={"attestation_type": "join_token",
                                         "payload": {"token": token},
                                         "csr": base64.b64encode(b"not a csr").decode()})
        assert garbage.status_code == 400
        assert garbage.json()["error"]["message"] == (
            "CSR is not a valid PKCS#10 request in DER or PEM")
        huge = client.post(url, content=b"{" + b" " * (10 * 1024 * 1024) + b"}",
                           headers={"content-type": "application/json"})
        assert huge.status_code == 413
        not_json = client.post(url, content=b"\x00\x01", headers={"content-type":
                                                                 "application/json"})
        assert not_json.status_code == 400
        unknown = client.post(url, json={"attestation_type": "tpm", "payload": {}, "csr": ""})
        assert unknown.status_code == 400
        assert "not enabled on this server" in unknown.json()["error"]["message"]
    assert server.cli_json("agent", "count") == {"count": 0}
    # The token was not spent by the refused requests.
    assert NodeApiAgent(server).attest(token)


# -- the node API, as an agent uses it ---------------------------------------------------


class NodeApiAgent:
    """A minimal agent: attests with a join token and calls the node API over mTLS."""

    def __init__(self, server: ServerProcess) -> None:
        self.server = server
        self.base = f"https://{server.address}"
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.spiffe_id = ""
        self.chain: list[x509.Certificate] = []
        self.bundle_pem = server.cli("bundle", "show").stdout
        self.files = server.data_dir.parent / f"agent-{id(self)}"
        self.files.mkdir(exist_ok=True)

    def context(self, *, with_svid: bool = True) -> ssl.SSLContext:
        context = ssl.create_default_context(cadata=self.bundle_pem)
        context.check_hostname = False  # the server is named by its SPIFFE ID, checked below
        if with_svid and self.chain:
            cert = self.files / "svid.pem"
            key = self.files / "key.pem"
            cert.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM)
                                      for c in self.chain))
            key.write_bytes(self.key.private_bytes(serialization.Encoding.PEM,
                                                   serialization.PrivateFormat.PKCS8,
                                                   serialization.NoEncryption()))
            context.load_cert_chain(cert, key)
        return context

    def client(self, *, with_svid: bool = True) -> httpx.Client:
        return httpx.Client(base_url=self.base, verify=self.context(with_svid=with_svid),
                            timeout=30)

    def csr(self, key: ec.EllipticCurvePrivateKey, spiffe_id: str) -> str:
        return base64.b64encode(build_csr(key, SpiffeId(spiffe_id))).decode()

    def attest(self, token: str) -> str:
        with self.client(with_svid=False) as client:
            response = client.post("/v1/agent/attest", json={
                "attestation_type": "join_token", "payload": {"token": token},
                "csr": base64.b64encode(build_csr(self.key, SpiffeId(
                    f"spiffe://example.org/tessera/agent/join_token/{token}"))).decode(),
            })
            assert response.status_code == 200, response.text
            peer = client_peer_id(client)
        assert peer == "spiffe://example.org/tessera/server"
        body = response.json()
        self.spiffe_id = body["spiffe_id"]
        self.chain = [x509.load_der_x509_certificate(base64.b64decode(c))
                      for c in body["svid"]["cert_chain"]]
        return self.spiffe_id


def client_peer_id(client: httpx.Client) -> str:
    """The server's SPIFFE ID, from the certificate it presented on the last connection."""
    response = client.get("/live")
    stream: Any = response.extensions["network_stream"]
    der = stream.get_extra_info("ssl_object").getpeercert(True)
    cert = x509.load_der_x509_certificate(der)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return str(san.get_values_for_type(x509.UniformResourceIdentifier)[0])


@pytest.fixture
def agent(server: ServerProcess) -> Iterator[NodeApiAgent]:
    token = str(server.cli_json("token", "generate", "--spiffe-id",
                                "spiffe://example.org/node/a")["token"])
    node_agent = NodeApiAgent(server)
    node_agent.attest(token)
    yield node_agent


def test_an_agent_gets_svids_only_for_its_entries(
    server: ServerProcess, agent: NodeApiAgent, tmp_path: Path
) -> None:
    mine = server.cli_json("entry", "create", "--parent-id", "spiffe://example.org/node/a",
                           "--spiffe-id", "spiffe://example.org/web", "--selector", "unix:uid:1")
    child = server.cli_json("entry", "create", "--parent-id", "spiffe://example.org/web",
                            "--spiffe-id", "spiffe://example.org/web/worker",
                            "--selector", "unix:uid:2")
    other = server.cli_json("entry", "create", "--parent-id", "spiffe://example.org/node/b",
                            "--spiffe-id", "spiffe://example.org/db", "--selector", "unix:uid:3")
    with agent.client() as client:
        synced = client.get("/v1/agent/entries", params={"since": 0}).json()
        assert sorted(synced["entry_ids"]) == sorted([mine["id"], child["id"]])
        workload_key = ec.generate_private_key(ec.SECP256R1())
        signed = client.post("/v1/agent/svids/x509", json={"requests": [
            {"entry_id": mine["id"], "csr": agent.csr(workload_key, "spiffe://example.org/web")},
        ]})
        assert signed.status_code == 200, signed.text
        refused = client.post("/v1/agent/svids/x509", json={"requests": [
            {"entry_id": other["id"], "csr": agent.csr(workload_key, "spiffe://example.org/db")},
        ]})
        assert refused.status_code == 403
        assert "is not authorized for agent" in refused.json()["error"]["message"]
        wrong_id = client.post("/v1/agent/svids/x509", json={"requests": [
            {"entry_id": mine["id"], "csr": agent.csr(workload_key, "spiffe://example.org/db")},
        ]})
        assert wrong_id.status_code == 400
        jwt = client.post("/v1/agent/svids/jwt", json={"entry_id": mine["id"],
                                                      "audience": ["db"]})
        assert jwt.json()["spiffe_id"] == "spiffe://example.org/web"

    svid = tmp_path / "svid.pem"
    svid.write_bytes(base64.b64decode(signed.json()["svids"][0]["cert_chain"][0]))
    svid.write_text(ssl.DER_cert_to_PEM_cert(svid.read_bytes()))
    bundle = tmp_path / "bundle.pem"
    bundle.write_text(agent.bundle_pem)
    openssl_verify(bundle, svid)
    token = JwtSvid.parse_and_validate(jwt.json()["token"], jwt_bundle(server), {"db"})
    assert token.spiffe_id == SpiffeId("spiffe://example.org/web")


def test_concurrent_one_csr_requests_are_each_answered_recorded_and_audited(
    server: ServerProcess, agent: NodeApiAgent
) -> None:
    entries = [server.cli_json("entry", "create", "--parent-id", "spiffe://example.org/node/a",
                               "--spiffe-id", f"spiffe://example.org/w{n}",
                               "--selector", f"unix:uid:{n}") for n in range(8)]
    key = ec.generate_private_key(ec.SECP256R1())
    bodies = [{"requests": [{"entry_id": e["id"], "csr": agent.csr(key, str(e["spiffe_id"]))}]}
              for e in entries]  # fmt: skip
    answered: list[str] = []
    clients = [agent.client() for _ in bodies]  # made here: each writes the agent's files

    def renew_one_by_one(client: httpx.Client, body: dict[str, Any]) -> None:
        with client:
            for _ in range(5):
                response = client.post("/v1/agent/svids/x509", json=body)
                assert response.status_code == 200, response.text
                [svid] = response.json()["svids"]
                leaf = x509.load_der_x509_certificate(base64.b64decode(svid["cert_chain"][0]))
                answered.append(format(leaf.serial_number, "x"))

    threads = [threading.Thread(target=renew_one_by_one, args=pair)
               for pair in zip(clients, bodies, strict=True)]  # fmt: skip
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(answered) == 40

    events = server.cli_json("audit", "list", "--limit", "100")["events"]
    named = [svid["serial"] for e in events if e["action"] == "x509svid.issue"  # type: ignore
             for svid in e["details"]["svids"]]  # type: ignore[index]
    assert sorted(named) == sorted(answered)
    issue_events = [e for e in events if e["action"] == "x509svid.issue"]  # type: ignore
    assert {e["actor"] for e in issue_events} == {agent.spiffe_id}  # type: ignore[index]
    intact = server.cli("audit", "verify")
    assert intact.stdout.strip() == f"Audit log intact: {len(events)} events verified."
    with agent.client() as client:
        metrics = client.get("/metrics").text
    batches = next(line for line in metrics.splitlines()
                   if line.startswith("tessera_server_issuance_group_batches_sum"))
    assert float(batches.split()[1]) == 40


def test_one_csr_requests_are_refused_in_the_words_of_every_other_request(
    server: ServerProcess, agent: NodeApiAgent
) -> None:
    # A small batch is answered without FastAPI's routing; whatever is wrong with one
    # is still said as FastAPI and the error handlers say it.
    entry = server.cli_json("entry", "create", "--parent-id", "spiffe://example.org/node/a",
                            "--spiffe-id", "spiffe://example.org/web", "--selector", "unix:uid:1")
    key = ec.generate_private_key(ec.SECP256R1())
    good = {"entry_id": entry["id"], "csr": agent.csr(key, "spiffe://example.org/web")}
    json_type = {"content-type": "application/json"}
    with agent.client() as client:
        def refusal(response: httpx.Response) -> tuple[int, str]:
            return response.status_code, response.json()["error"]["message"]

        post = functools.partial(client.post, "/v1/agent/svids/x509")
        assert refusal(post(content=b"{not json", headers=json_type))[0] == 400
        assert refusal(post(json={"requests": [{"entry_id": entry["id"]}]})) == (
            400, "invalid request: requests.0.csr: Field required")
        assert refusal(post(json={"requests": [{**good, "csr": "%%%"}]})) == (
            400, f"csr of entry {entry['id']} is not valid base64")
        assert refusal(post(json={"requests": [{**good, "entry_id": "nope"}]}))[0] == 403
        wrong = agent.csr(key, "spiffe://example.org/db")
        assert refusal(post(json={"requests": [{**good, "csr": wrong}]}))[0] == 400
        assert post(content=b"{" + b" " * (2 * 1024 * 1024) + b"}",
                    headers=json_type).status_code == 413
        # Larger than the short way reads, or not said to be JSON: FastAPI's way, answered.
        padded = json.dumps({"requests": [good]}).encode() + b" " * (100 * 1024)
        assert post(content=padded, headers=json_type).status_code == 200
        assert post(content=json.dumps({"requests": [good]}).encode(),
                    headers={"content-type": "application/json; charset=utf-8"}
                    ).status_code == 200
        assert post(json={"requests": [good]}).status_code == 200
    with agent.client(with_svid=False) as anonymous:
        assert refusal(anonymous.post("/v1/agent/svids/x509", json={"requests": [good]})) == (
            401, "no client certificate was presented; agents must call with their SVID")
    issued = [e for e in server.cli_json("audit", "list")["events"]
              if e["action"] == "x509svid.issue"]  # type: ignore[index]
    assert sum(len(e["details"]["svids"]) for e in issued) == 3  # type: ignore[index]
    assert "events verified" in server.cli("audit", "verify").stdout


def test_the_node_api_bounds_jwt_audiences(server: ServerProcess, agent: NodeApiAgent) -> None:
    entry = server.cli_json("entry", "create", "--parent-id", "spiffe://example.org/node/a",
                            "--spiffe-id", "spiffe://example.org/web", "--selector", "unix:uid:1")
    refusals = [
        ([f"aud{i}" for i in range(33)],
         "33 audiences were asked for; ask for at most 32 at a time"),
        (["db", "a" * 2049],
         "audience 2 is 2049 bytes long; an audience may be at most 2048 bytes"),
    ]
    with agent.client() as client:
        for audience, message in refusals:
            refused = client.post("/v1/agent/svids/jwt",
                                  json={"entry_id": entry["id"], "audience": audience})
            assert refused.status_code == 400, refused.text
            assert refused.json()["error"]["message"] == message
        allowed = client.post("/v1/agent/svids/jwt",
                              json={"entry_id": entry["id"], "audience": ["db", "a" * 2048]})
        assert allowed.status_code == 200, allowed.text


def test_identity_comes_only_from_the_handshake(
    server: ServerProcess, agent: NodeApiAgent
) -> None:
    with agent.client(with_svid=False) as client:
        anonymous = client.get("/v1/agent/entries")
        assert anonymous.status_code == 401
        spoofed = client.get("/v1/agent/entries", headers={
            "x-forwarded-client-cert": f"URI={agent.spiffe_id}",
            "x-spiffe-id": agent.spiffe_id,
        })
        assert spoofed.status_code == 401


def test_a_renewed_agent_svid_replaces_the_old_one(
    server: ServerProcess, agent: NodeApiAgent
) -> None:
    old_chain = agent.chain
    new_key = ec.generate_private_key(ec.SECP256R1())
    with agent.client() as client:
        renewed = client.post("/v1/agent/renew",
                              json={"csr": agent.csr(new_key, agent.spiffe_id)})
        assert renewed.status_code == 200, renewed.text
    agent.key = new_key
    agent.chain = [x509.load_der_x509_certificate(base64.b64decode(c))
                   for c in renewed.json()["svid"]["cert_chain"]]
    with agent.client() as client:
        assert client.get("/v1/agent/entries").status_code == 200
    agent.chain = old_chain
    agent.key = agent.key  # the old key is gone; the old chain alone cannot be used
    shown = server.cli_json("agent", "show", "--spiffe-id", agent.spiffe_id)
    assert shown["aliases"] == ["spiffe://example.org/node/a"]
    assert shown["serial"] == format(
        x509.load_der_x509_certificate(base64.b64decode(
            renewed.json()["svid"]["cert_chain"][0])).serial_number, "x")


def test_a_waiting_agent_hears_of_a_new_entry_at_once(
    server: ServerProcess, agent: NodeApiAgent
) -> None:
    with agent.client() as client:
        revision = client.get("/v1/agent/entries", params={"since": 0}).json()["revision"]
        result: dict[str, Any] = {}

        def wait() -> None:
            began = time.monotonic()
            result["body"] = client.get("/v1/agent/entries",
                                        params={"since": revision, "wait": 20}).json()
            result["seconds"] = time.monotonic() - began

        waiter = threading.Thread(target=wait)
        waiter.start()
        time.sleep(0.3)  # let the long poll reach the server before the change
        created = server.cli_json("entry", "create", "--parent-id",
                                  "spiffe://example.org/node/a", "--spiffe-id",
                                  "spiffe://example.org/late", "--selector", "unix:uid:9")
        waiter.join(timeout=25)
    assert [e["id"] for e in result["body"]["entries"]] == [created["id"]]
    print(f"the long poll returned {result['seconds']:.2f}s after it began")


# -- the audit log -----------------------------------------------------------------------


def test_audit_verify_names_an_edited_row(server: ServerProcess) -> None:
    server.cli("entry", "create", "--parent-id", "spiffe://example.org/node",
               "--spiffe-id", "spiffe://example.org/web", "--selector", "unix:uid:1")
    server.cli("x509", "mint", "--spiffe-id", "spiffe://example.org/web")
    server.cli("token", "generate")
    events = server.cli_json("audit", "list")["events"]
    assert [e["action"] for e in events] == [  # type: ignore[index]
        "token.generate", "x509.mint", "entry.create"]
    intact = server.cli("audit", "verify")
    assert intact.stdout.strip() == "Audit log intact: 3 events verified."

    import sqlite3

    database = sqlite3.connect(server.data_dir / "datastore.sqlite3")
    with database:
        database.execute("UPDATE audit_events SET target = 'spiffe://example.org/evil' "
                         "WHERE action = 'x509.mint'")
    database.close()
    tampered = server.cli("audit", "verify", check=False)
    assert tampered.returncode == 1
    assert tampered.stderr.startswith(
        "Error: the audit log was tampered with: audit event 2 (x509.mint on "
        "'spiffe://example.org/evil' at ")
    report = json.loads(server.cli("audit", "verify", "--output", "json", check=False).stdout)
    assert report["event_id"] == 2 and report["intact"] is False


# -- agents under control ----------------------------------------------------------------


def test_an_evicted_join_token_agent_cannot_come_back_with_its_token(
    server: ServerProcess,
) -> None:
    token = str(server.cli_json("token", "generate")["token"])
    agent = NodeApiAgent(server)
    agent.attest(token)
    result = server.cli("agent", "evict", "--spiffe-id", agent.spiffe_id)
    assert result.stdout.strip() == f"Agent {agent.spiffe_id} evicted; it must attest again."
    with agent.client() as client:
        refused = client.get("/v1/agent/entries")
    assert refused.status_code == 403
    assert refused.json()["error"]["message"] == (
        f"{agent.spiffe_id} is not an attested agent; it must attest again")
    again = NodeApiAgent(server)
    with again.client(with_svid=False) as client:
        reused = client.post("/v1/agent/attest", json={
            "attestation_type": "join_token", "payload": {"token": token},
            "csr": again.csr(again.key, agent.spiffe_id)})
    assert reused.status_code == 401
    assert reused.json()["error"]["message"].startswith("join token was refused")
    assert server.cli_json("agent", "count") == {"count": 0}


def test_a_banned_agent_is_refused_until_unbanned(server: ServerProcess) -> None:
    token = str(server.cli_json("token", "generate")["token"])
    agent = NodeApiAgent(server)
    agent.attest(token)
    server.cli("agent", "ban", "--spiffe-id", agent.spiffe_id)
    assert server.cli_json("agent", "show", "--spiffe-id", agent.spiffe_id)["banned"] is True
    with agent.client() as client:
        refused = client.get("/v1/agent/entries")
        assert refused.status_code == 403
        assert refused.json()["error"]["message"] == f"agent {agent.spiffe_id} is banned"
    server.cli("agent", "unban", "--spiffe-id", agent.spiffe_id)
    with agent.client() as client:
        assert client.get("/v1/agent/entries").status_code == 200


def test_taint_and_revoke_reach_waiting_agents(server: ServerProcess, agent: NodeApiAgent) -> None:
    with agent.client() as client:
        first = client.get("/v1/agent/entries", params={"since": 0}).json()
        assert first["tainted_authorities"] == []
        server.cli("localauthority", "x509", "prepare")
        server.cli("localauthority", "x509", "activate")
        old = next(a["authority_id"] for a in server.cli_json(
            "localauthority", "x509", "show")["authorities"]  # type: ignore[attr-defined]
            if a["status"] == "old")
        current = client.get("/v1/agent/entries", params={"since": 0}).json()
        assert current["revision"] > 0  # the agent's alias moved it; 0 would mean "full sync"
        result: dict[str, Any] = {}

        def wait() -> None:
            result["body"] = client.get("/v1/agent/entries", params={
                "since": current["revision"], "bundle": current["bundle_sequence"],
                "wait": 20}).json()

        waiter = threading.Thread(target=wait)
        waiter.start()
        wait_for_long_polls(server, 1)  # the change must wake a poll already waiting
        server.cli("localauthority", "x509", "taint", "--authority-id", old)
        waiter.join(timeout=25)
    assert result["body"]["tainted_authorities"] == [old]
    assert result["body"]["bundle_sequence"] > current["bundle_sequence"]
    server.cli("localauthority", "x509", "revoke", "--authority-id", old)
    assert server.cli("bundle", "show").stdout.count("BEGIN CERTIFICATE") == 1


def test_setting_a_federated_bundle_wakes_waiting_agents(
    server: ServerProcess, agent: NodeApiAgent, tmp_path: Path
) -> None:
    partner = tmp_path / "partner.pem"
    minted = server.cli_json("x509", "mint", "--spiffe-id", "spiffe://example.org/x")
    partner.write_text(str(minted["bundle"]))  # any CA certificate will do as a bundle
    with agent.client() as client:
        current = client.get("/v1/agent/entries", params={"since": 0}).json()
        result: dict[str, Any] = {}

        def wait() -> None:
            result["body"] = client.get("/v1/agent/entries", params={
                "since": current["revision"], "bundle": current["bundle_sequence"],
                "wait": 20}).json()

        waiter = threading.Thread(target=wait)
        waiter.start()
        wait_for_long_polls(server, 1)  # the change must wake a poll already waiting
        server.cli("bundle", "set", "--id", "spiffe://partner.org", "--path", str(partner))
        waiter.join(timeout=25)
        assert result["body"]["bundle_sequence"] > current["bundle_sequence"]
        bundles = client.get("/v1/agent/bundles").json()
    assert list(bundles["federated"]) == ["partner.org"]


def wait_for_long_polls(server: ServerProcess, count: int) -> None:
    """Poll the server's metrics until it holds ``count`` agent long polls open."""
    line = f"\ntessera_server_agent_long_polls {float(count)}"
    deadline = time.monotonic() + 10
    with httpx.Client(verify=False, base_url=f"https://{server.address}") as client:
        while line not in client.get("/metrics").text:
            assert time.monotonic() < deadline, f"the server never held {count} long poll(s)"
            time.sleep(0.02)
