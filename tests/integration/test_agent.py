"""`tessera agent` as a user runs it: real server and agent processes, real SPIFFE clients.

Workloads are this test process (py-spiffe's ``WorkloadApiClient`` and
``X509Source``), children running as other uids, and the ``tessera agent api``
commands. Each test is one scenario of the agent's done criteria.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import stat
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc  # type: ignore[import-untyped]
import httpx
import pytest
from cryptography import x509
from spiffe import WorkloadApiClient, X509Source
from spiffe.workloadapi.errors import ValidateJwtSvidError

from attestor.node.x509pop import fingerprint
from tests.integration.agent_fixtures import (  # noqa: F401  (the fixtures register by import)
    AgentProcess,
    fetch_as,
    join_token,
    save_bundle,
    socket_dir_fixture,
    start_agent_fixture,
)
from tests.integration.conftest import TESSERA, ServerProcess
from tests.support.pki import TestCA, write_key_pem, write_pem
from tests.support.processes import poll
from workload_api._proto import workload_pb2

pytestmark = pytest.mark.integration

pb: Any = workload_pb2  # message classes are built at import time, out of mypy's sight
UID = os.getuid()
NODE = "spiffe://example.org/node/a"
StartAgent = Callable[..., AgentProcess]


def create_entry(server: ServerProcess, spiffe_id: str, *selectors: str, parent: str = NODE,
                 ttl: str | None = None) -> str:
    args = ["entry", "create", "--parent-id", parent, "--spiffe-id", spiffe_id]
    for selector in selectors:
        args += ["--selector", selector]
    if ttl:
        args += ["--x509-svid-ttl", ttl]
    return str(server.cli_json(*args)["id"])


def spiffe_ids(agent: AgentProcess) -> list[str]:
    with WorkloadApiClient(socket_path=agent.endpoint, default_timeout=5) as client:
        return [str(svid.spiffe_id) for svid in client.fetch_x509_svids()]


def test_a_joined_agent_serves_svids_and_rotates_them(
    server: ServerProcess, start_agent: StartAgent
) -> None:
    create_entry(server, "spiffe://example.org/web", f"unix:uid:{UID}", ttl="4s")
    agent = start_agent(server)

    with WorkloadApiClient(socket_path=agent.endpoint, default_timeout=5) as client:
        svid = client.fetch_x509_svid()
    assert str(svid.spiffe_id) == "spiffe://example.org/web"
    assert "Attested as spiffe://example.org/tessera/agent/join_token/" in agent.log()
    assert f"export SPIFFE_ENDPOINT_SOCKET=unix://{agent.socket}" in agent.log()

    source = X509Source(socket_path=agent.endpoint, timeout_in_seconds=5)
    try:
        first = source.get_x509_context().default_svid.leaf.serial_number

        def rotated() -> int | None:
            serial = source.get_x509_context().default_svid.leaf.serial_number
            return serial if serial != first else None

        began = time.monotonic()
        poll(rotated, 10, "a rotation of the 4 s SVID")
        print(f"X509Source saw the rotation after {time.monotonic() - began:.2f}s")
    finally:
        source.close()

    agent_metrics = scrape(agent.health_url + "/metrics")
    assert agent_metrics["tessera_agent_entries", ()] == 1
    assert agent_metrics["tessera_agent_x509_svids", ()] == 1
    assert agent_metrics["tessera_agent_svids_rotated_total", (("kind", "x509"),)] >= 1
    assert agent_metrics["tessera_agent_sync_lag_seconds", ()] >= 0
    assert agent_metrics["tessera_agent_last_sync_timestamp_seconds", ()] > 0
    # py-spiffe's clients end their FetchX509SVID streams themselves: CANCELLED, not an error.
    assert agent_metrics["tessera_workload_api_calls_total",
                         (("method", "FetchX509SVID"), ("status", "CANCELLED"))] >= 1  # fmt: skip
    assert httpx.get(agent.health_url + "/live", timeout=5).json() == {"status": "live"}

    server_metrics = scrape(f"https://{server.address}/metrics")
    # The agent's own SVID, the first web SVID and at least one rotation.
    assert server_metrics["tessera_server_svids_issued_total", (("kind", "x509"),)] >= 3
    assert server_metrics["tessera_server_issuance_seconds_count", ()] >= 2
    assert server_metrics["tessera_server_node_attestations_total",
                          (("result", "ok"), ("type", "join_token"))] == 1  # fmt: skip


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """A /metrics page as {(sample name, sorted labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url, timeout=5, verify=False).text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_each_uid_gets_only_its_own_svid(
    server: ServerProcess, start_agent: StartAgent
) -> None:
    create_entry(server, "spiffe://example.org/u1234", "unix:uid:1234")
    create_entry(server, "spiffe://example.org/u1235", "unix:uid:1235")
    agent = start_agent(server)

    assert fetch_as(1234, 1234, agent.endpoint) == {"spiffe_ids": ["spiffe://example.org/u1234"]}
    assert fetch_as(1235, 1235, agent.endpoint) == {"spiffe_ids": ["spiffe://example.org/u1235"]}
    refused = fetch_as(1236, 1236, agent.endpoint)
    assert refused["error"] == "PERMISSION_DENIED"
    assert "no identity issued" in refused["message"]

    # A caller without the security header is refused before anything else.
    with grpc.insecure_channel(f"unix:{agent.socket}") as channel:
        call = channel.unary_stream(
            "/SpiffeWorkloadAPI/FetchX509SVID",
            request_serializer=pb.X509SVIDRequest.SerializeToString,
            response_deserializer=pb.X509SVIDResponse.FromString,
        )
        with pytest.raises(grpc.RpcError) as caught:
            next(iter(call(pb.X509SVIDRequest(), timeout=5)))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details() == "security header missing from request"

    # This process has no entry, yet the agent answers: it is healthy.
    health = agent.cli("healthcheck", "--output", "json")
    assert json.loads(health.stdout) == {"status": "healthy", "socket": str(agent.socket)}
    denied = agent.cli("api", "fetch", "x509", check=False)
    assert denied.returncode == 1
    assert denied.stderr.startswith(
        f"Error: the agent has no identity for this process (uid {UID}): no identity issued; "
    )


def test_jwt_svids_are_fetched_and_validated(
    server: ServerProcess, start_agent: StartAgent
) -> None:
    create_entry(server, "spiffe://example.org/web", f"unix:uid:{UID}")
    agent = start_agent(server)

    with WorkloadApiClient(socket_path=agent.endpoint, default_timeout=5) as client:
        token = client.fetch_jwt_svid(audience={"db"}).token
        validated = client.validate_jwt_svid(token, "db")
        assert str(validated.spiffe_id) == "spiffe://example.org/web"
        with pytest.raises(ValidateJwtSvidError) as caught:
            client.validate_jwt_svid(token, "other")
    assert "does not include 'other'" in str(caught.value)
    assert "INVALID_ARGUMENT" in str(caught.value)

    fetched = json.loads(agent.cli("api", "fetch", "jwt", "--audience", "db", "--output",
                                   "json").stdout)
    assert fetched["svids"][0]["spiffe_id"] == "spiffe://example.org/web"
    assert fetched["svids"][0]["token"] == token, "the agent caches JWT-SVIDs"
    valid = agent.cli("api", "validate", "jwt", "--audience", "db", "--svid", token)
    assert valid.stdout.startswith("SVID is valid.\nSPIFFE ID : spiffe://example.org/web\n")
    invalid = agent.cli("api", "validate", "jwt", "--audience", "other", "--svid", token,
                        check=False)
    assert invalid.returncode == 1
    assert invalid.stderr == (
        "Error: the JWT-SVID is not valid: JWT-SVID audience ['db'] does not include 'other'\n"
    )


@pytest.fixture
def watch(start_agent: StartAgent) -> Iterator[Callable[[AgentProcess], queue.Queue[Any]]]:
    """Run ``tessera agent api watch --output json``; its updates arrive on a queue."""
    processes: list[subprocess.Popen[str]] = []

    def start(agent: AgentProcess) -> queue.Queue[Any]:
        process = subprocess.Popen(
            [TESSERA, "agent", "api", "watch", "--socket", str(agent.socket), "--output", "json"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )
        processes.append(process)
        updates: queue.Queue[Any] = queue.Queue()

        def read() -> None:
            assert process.stdout is not None
            for line in process.stdout:
                updates.put((time.monotonic(), json.loads(line)))

        threading.Thread(target=read, daemon=True).start()
        return updates

    yield start
    for process in processes:
        process.terminate()
        process.wait(timeout=10)


def next_update(updates: queue.Queue[Any], deadline: float = 5.0) -> tuple[float, list[str]]:
    try:
        arrived, document = updates.get(timeout=deadline)
    except queue.Empty:
        raise AssertionError(f"no X.509 update within {deadline}s") from None
    return arrived, [svid["spiffe_id"] for svid in document["svids"]]


def test_entry_changes_reach_a_watching_workload_at_once(
    server: ServerProcess, start_agent: StartAgent,
    watch: Callable[[AgentProcess], queue.Queue[Any]],
) -> None:
    create_entry(server, "spiffe://example.org/web", f"unix:uid:{UID}")
    agent = start_agent(server)
    updates = watch(agent)
    assert next_update(updates, 10)[1] == ["spiffe://example.org/web"]

    time.sleep(0.5)  # let the agent settle into its long poll
    created_at = time.monotonic()
    entry_id = create_entry(server, "spiffe://example.org/api", f"unix:uid:{UID}")
    arrived, ids = next_update(updates)
    print(f"new entry reached the watching workload {arrived - created_at:.3f}s after "
          "'entry create' started (that includes the CLI's own start-up)")
    assert ids == ["spiffe://example.org/web", "spiffe://example.org/api"]

    server.cli("entry", "delete", "--entry-id", entry_id)
    assert next_update(updates)[1] == ["spiffe://example.org/web"]


def test_the_agent_serves_from_cache_while_the_server_is_down(
    server: ServerProcess, start_agent: StartAgent
) -> None:
    create_entry(server, "spiffe://example.org/web", f"unix:uid:{UID}")
    agent = start_agent(server)
    assert spiffe_ids(agent) == ["spiffe://example.org/web"]

    server.stop()
    assert spiffe_ids(agent) == ["spiffe://example.org/web"]
    poll(lambda: "serving cached SVIDs and retrying" in agent.log() or None, 15,
         "the agent noticing the server is gone")
    assert spiffe_ids(agent) == ["spiffe://example.org/web"]

    server.start()
    create_entry(server, "spiffe://example.org/after", f"unix:uid:{UID}")
    began = time.monotonic()
    poll(lambda: "spiffe://example.org/after" in spiffe_ids(agent) or None, 20,
         "the agent catching up with the restarted server")
    print(f"caught up {time.monotonic() - began:.2f}s after the entry was created")
    assert agent.process is not None and agent.process.poll() is None


def test_an_agent_behind_a_tombstone_purge_still_drops_the_deleted_entry(
    tmp_path: Path, start_server: Callable[..., ServerProcess], start_agent: StartAgent
) -> None:
    config = tmp_path / "server.toml"
    config.write_text('tombstone_retention = "1s"\n')
    server = start_server(extra=("--config", str(config)))
    create_entry(server, "spiffe://example.org/web", f"unix:uid:{UID}")
    gone = create_entry(server, "spiffe://example.org/gone", f"unix:uid:{UID}")
    agent = start_agent(server)
    assert sorted(spiffe_ids(agent)) == ["spiffe://example.org/gone", "spiffe://example.org/web"]

    assert agent.process is not None
    agent.process.send_signal(signal.SIGSTOP)  # the agent stays at the revision it synced
    try:
        server.stop()
        server.start()
        server.cli("entry", "delete", "--entry-id", gone)
        create_entry(server, "spiffe://example.org/after", f"unix:uid:{UID}")

        def purged() -> float | None:
            count = scrape(f"https://{server.address}/metrics")[
                "tessera_server_tombstones_purged_total", ()]
            return count if count >= 1 else None

        poll(purged, 15, "the server purging the tombstone of the deleted entry")
    finally:
        agent.process.send_signal(signal.SIGCONT)

    poll(lambda: sorted(spiffe_ids(agent)) == ["spiffe://example.org/after",
                                               "spiffe://example.org/web"] or None,
         20, "the agent syncing from its revision, older than the purge")


def test_a_restarted_agent_needs_no_new_token(
    server: ServerProcess, start_agent: StartAgent
) -> None:
    create_entry(server, "spiffe://example.org/web", f"unix:uid:{UID}")
    agent = start_agent(server)
    assert spiffe_ids(agent) == ["spiffe://example.org/web"]
    stored = sorted(p.name for p in agent.data_dir.iterdir())
    assert stored == ["agent-svid.key", "agent-svid.pem", "agent.json", "bundle.json"]
    assert stat.S_IMODE(agent.data_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE((agent.data_dir / "agent-svid.key").stat().st_mode) == 0o600

    agent.stop()
    agent.start(token=None)
    assert "Loaded the agent SVID of spiffe://example.org/tessera/agent/join_token/" in agent.log()
    assert spiffe_ids(agent) == ["spiffe://example.org/web"]


def test_fetch_x509_writes_files_openssl_accepts(
    server: ServerProcess, start_agent: StartAgent, tmp_path: Path
) -> None:
    create_entry(server, "spiffe://example.org/web", f"unix:uid:{UID}")
    agent = start_agent(server)
    out = tmp_path / "svid"
    result = json.loads(agent.cli("api", "fetch", "x509", "--write", str(out), "--output",
                                  "json").stdout)
    assert result["svids"][0]["spiffe_id"] == "spiffe://example.org/web"
    assert sorted(p.name for p in out.iterdir()) == ["bundle.0.pem", "svid.0.key", "svid.0.pem"]
    assert stat.S_IMODE((out / "svid.0.key").stat().st_mode) == 0o600
    verified = subprocess.run(
        ["openssl", "verify", "-CAfile", str(out / "bundle.0.pem"), str(out / "svid.0.pem")],
        capture_output=True, text=True,
    )
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert verified.stdout.strip() == f"{out / 'svid.0.pem'}: OK"

    # The issuance is in the server's audit log, with the agent that asked for it.
    serial = format(x509.load_pem_x509_certificate((out / "svid.0.pem").read_bytes())
                    .serial_number, "x")  # fmt: skip
    events = server.cli_json("audit", "list", "--limit", "100")["events"]
    issued = [(event["actor"], svid["spiffe_id"])  # type: ignore[index]
              for event in events if event["action"] == "x509svid.issue"  # type: ignore[index]
              for svid in event["details"]["svids"] if svid["serial"] == serial]  # type: ignore[index]
    [(actor, spiffe_id)] = issued
    assert actor.startswith("spiffe://example.org/tessera/agent/join_token/")
    assert spiffe_id == "spiffe://example.org/web"
    assert server.cli("audit", "verify").stdout.startswith("Audit log intact: ")


def node_certificate(directory: Path) -> tuple[Path, Path, Path, str]:
    """A node CA (for the server) and a node certificate with its key (for the agent)."""
    node_ca = TestCA.named("node CA")
    node = node_ca.issue_certificate(subject="node-a")
    return (write_pem(directory / "node-ca.pem", node_ca.certificate),
            write_pem(directory / "node.pem", node.certificate),
            write_key_pem(directory / "node.key", node.key),
            fingerprint(node.certificate))  # fmt: skip


def x509pop_agent(
    start_server: Callable[..., ServerProcess], tmp_path: Path, socket_dir: Path
) -> tuple[ServerProcess, AgentProcess, str]:
    """A server trusting a node CA, and an x509pop agent started with that node's key,
    holding one entry (spiffe://example.org/web for this uid)."""
    node_ca, node_cert, node_key, node_fingerprint = node_certificate(tmp_path)
    config = tmp_path / "server.toml"
    config.write_text(f'[node_attestors.x509pop]\nca_bundle_path = "{node_ca}"\n')
    server = start_server(extra=["--config", str(config)])
    agent_id = f"spiffe://example.org/tessera/agent/x509pop/{node_fingerprint}"
    create_entry(server, "spiffe://example.org/web", f"unix:uid:{UID}", parent=agent_id)
    agent = AgentProcess(
        servers=[server], data_dir=tmp_path / "agent", socket=socket_dir / "agent.sock",
        alias=agent_id, trust_bundle=save_bundle(server, tmp_path / "bundle.pem"),
    )
    try:
        agent.start(extra=("--x509pop-cert", str(node_cert), "--x509pop-key", str(node_key)))
    except BaseException:
        agent.stop()  # a start that timed out leaves the process running
        raise
    return server, agent, agent_id


def test_an_x509pop_agent_attests_again_by_itself(
    start_server: Callable[..., ServerProcess], tmp_path: Path, socket_dir: Path
) -> None:
    server, agent, agent_id = x509pop_agent(start_server, tmp_path, socket_dir)
    try:
        assert f"Attested as {agent_id} (x509pop)" in agent.log()
        assert spiffe_ids(agent) == ["spiffe://example.org/web"]

        server.cli("agent", "evict", "--spiffe-id", agent_id)
        poll(lambda: "attesting again with x509pop" in agent.log() or None, 15,
             "the evicted agent attesting again")
        create_entry(server, "spiffe://example.org/after", f"unix:uid:{UID}", parent=agent_id)
        poll(lambda: "spiffe://example.org/after" in spiffe_ids(agent) or None, 15,
             "an entry created after the eviction reaching the workload")
    finally:
        agent.stop()


def test_an_evicted_join_token_agent_needs_a_new_token(
    server: ServerProcess, start_agent: StartAgent, tmp_path: Path, socket_dir: Path
) -> None:
    create_entry(server, "spiffe://example.org/web", f"unix:uid:{UID}")
    agent = start_agent(server)
    [listed] = server.cli_json("agent", "list")["agents"]  # type: ignore[index]
    agent_id, old_token = str(listed["spiffe_id"]), agent_id_token(str(listed["spiffe_id"]))

    server.cli("agent", "evict", "--spiffe-id", agent_id)
    poll(lambda: "a join-token agent must be given a new join token" in agent.log() or None,
         15, "the evicted agent saying it needs a new token")  # fmt: skip
    assert spiffe_ids(agent) == ["spiffe://example.org/web"], "cached SVIDs still served"

    # The old token does not bring the node back: not as a new agent ...
    fresh = subprocess.run(
        [TESSERA, "agent", "run", "--trust-domain", "example.org", "--server", server.address,
         "--data-dir", str(tmp_path / "fresh"), "--socket", str(socket_dir / "fresh.sock"),
         "--health-bind", "0", "--join-token", old_token,
         "--trust-bundle", str(agent.trust_bundle)],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert fresh.returncode == 1, fresh.stdout + fresh.stderr
    assert fresh.stderr.splitlines()[-1] == (
        "Error: node attestation was refused: join token was refused: join token not found "
        "or already used; generate a new one with 'tessera server token generate'")
    # ... nor as the evicted agent restarted with it: that one stops, saying what to do,
    agent.stop()
    with pytest.raises(AssertionError, match="agent exited 1"):
        agent.start(token=old_token)
    assert agent.log().rstrip().endswith(
        f"Error: the server refused the agent's SVID: {agent_id} is not an attested agent; it "
        "must attest again; generate a new join token with 'tessera server token generate' and "
        "start the agent with --join-token <token>")
    assert server.cli_json("agent", "count") == {"count": 0}

    # ... while a new token does, and workloads get new entries again.
    agent.stop()
    agent.start(token=join_token(server, agent.alias))
    poll(lambda: "attesting again with join_token" in agent.log() or None, 15,
         "the agent attesting with its new token")
    create_entry(server, "spiffe://example.org/after", f"unix:uid:{UID}")
    poll(lambda: "spiffe://example.org/after" in spiffe_ids(agent) or None, 15,
         "an entry created after the new attestation reaching the workload")
    assert server.cli_json("agent", "count") == {"count": 1}


def agent_id_token(agent_id: str) -> str:
    """The join token a join-token agent's ID was made from."""
    prefix = "spiffe://example.org/tessera/agent/join_token/"
    assert agent_id.startswith(prefix), agent_id
    return agent_id.removeprefix(prefix)


def test_a_banned_x509pop_agent_cannot_attest_again_until_unbanned(
    start_server: Callable[..., ServerProcess], tmp_path: Path, socket_dir: Path
) -> None:
    server, agent, agent_id = x509pop_agent(start_server, tmp_path, socket_dir)
    try:
        server.cli("agent", "ban", "--spiffe-id", agent_id)
        # Refused as banned, it stops serving its SVIDs and does not try to attest again.
        poll(lambda: f"the server refused this agent as banned (agent {agent_id} is banned)"
             in agent.log() or None, 20, "the agent saying it is banned")
        assert agent.log().count(f"Attested as {agent_id}") == 1
        assert "attesting again" not in agent.log()
        with pytest.raises(Exception, match="no identity issued"):
            spiffe_ids(agent)

        server.cli("agent", "unban", "--spiffe-id", agent_id)
        create_entry(server, "spiffe://example.org/after", f"unix:uid:{UID}", parent=agent_id)
        poll(lambda: "spiffe://example.org/after" in spiffe_ids(agent) or None, 20,
             "an entry created after the unban reaching the workload")
    finally:
        agent.stop()
