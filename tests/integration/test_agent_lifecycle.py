"""The agent's lifecycle against real processes: the join token, bans, trust domains, config.

Each test drives a real ``tessera server run`` and ``tessera agent run`` the way an
operator (or an attacker at the node API) would, and asserts the sentence the
user reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from spiffe import TrustDomain

from sdk.errors import TesseraError
from sdk.keys import KeyType, generate_private_key
from tests.integration.agent_fixtures import (  # noqa: F401  (the fixtures register by import)
    AgentProcess,
    join_token,
    save_bundle,
    socket_dir_fixture,
    start_agent_fixture,
)
from tests.integration.conftest import TESSERA, ServerProcess, free_port, tessera
from tests.support.processes import Process, poll
from workload_api.config import Address
from workload_api.node_client import NodeClient

pytestmark = pytest.mark.integration

UID = os.getuid()
NODE = "spiffe://example.org/node/a"
StartAgent = Callable[..., AgentProcess]


def agent_args(server: ServerProcess, data_dir: Path, sock: Path, *extra: str) -> list[str]:
    return [TESSERA, "agent", "run", "--server", server.address, "--data-dir", str(data_dir),
            "--socket", str(sock), "--health-bind", "0", *extra]


def csr_for(uri: str | None, *, ca: bool = False) -> bytes:
    key = generate_private_key(KeyType.EC_P256)
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    if uri is not None:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=False
        )
    if ca:
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def attest_with(server: ServerProcess, bundle: Path, token: str, csr: bytes) -> str:
    """Attest at the node API with the agent's own client; the refusal's sentence."""

    async def attempt() -> str:
        client = NodeClient([Address("127.0.0.1", server.port)], TrustDomain("example.org"))
        client.configure(
            anchors=x509.load_pem_x509_certificates(bundle.read_bytes()), identity=None
        )
        try:
            await client.attest("join_token", {"token": token}, csr, answer=lambda c: {})
        except TesseraError as err:
            return err.message
        finally:
            await client.aclose()
        raise AssertionError("the server accepted the attacker's CSR")

    return asyncio.run(attempt())


def test_a_failed_attestation_does_not_spend_the_join_token(
    server: ServerProcess, tmp_path: Path, socket_dir: Path
) -> None:
    bundle = save_bundle(server, tmp_path / "bundle.pem")
    token = join_token(server, NODE)
    agent_id = f"spiffe://example.org/tessera/agent/join_token/{token}"

    # Someone who learned the token asks for an SVID for another ID, then for a CA, then
    # sends a request that is not a CSR at all: each is refused, and none spends the token.
    assert attest_with(server, bundle, token, csr_for("spiffe://example.org/admin")) == (
        "CSR URI SANs ['spiffe://example.org/admin'] do not match the SPIFFE ID "
        f"{agent_id}; a CSR may name only the SPIFFE ID of the entry it is for"
    )
    assert attest_with(server, bundle, token, csr_for(None, ca=True)) == (
        "CSR asks for a CA certificate (cA=true); SVIDs are never CAs"
    )
    assert attest_with(server, bundle, token, b"not a CSR") == (
        "CSR is not a valid PKCS#10 request in DER or PEM"
    )
    assert server.cli_json("agent", "count") == {"count": 0}

    agent = AgentProcess(servers=[server], data_dir=tmp_path / "agent",
                         socket=socket_dir / "agent.sock", alias=NODE, trust_bundle=bundle)
    try:
        agent.start(token=token)
        assert f"Attested as {agent_id} (join_token)" in agent.log()
    finally:
        agent.stop()
    [listed] = server.cli_json("agent", "list")["agents"]  # type: ignore[index]
    assert listed["spiffe_id"] == agent_id
    # Used once, the token is gone.
    assert attest_with(server, bundle, token, csr_for(None)) == (
        "join token was refused: join token not found or already used; generate a new one "
        "with 'tessera server token generate'"
    )


def test_a_banned_agent_stops_serving_and_says_it_is_not_ready(
    server: ServerProcess, start_agent: StartAgent
) -> None:
    server.cli("entry", "create", "--parent-id", NODE, "--spiffe-id",
               "spiffe://example.org/web", "--selector", f"unix:uid:{UID}")
    agent = start_agent(server)
    poll(lambda: "spiffe://example.org/web" in agent.cli("api", "fetch", "x509").stdout or None,
         15, "the workload's SVID")
    [listed] = server.cli_json("agent", "list")["agents"]  # type: ignore[index]
    agent_id = str(listed["spiffe_id"])

    server.cli("agent", "ban", "--spiffe-id", agent_id)

    reason = (
        f"the server refused this agent as banned (agent {agent_id} is banned); it serves "
        f"workloads no SVIDs until an operator runs 'tessera server agent unban --spiffe-id "
        f"{agent_id}'"
    )

    def not_ready() -> dict[str, str] | None:
        answer = httpx.get(agent.health_url + "/ready", timeout=5)
        return answer.json() if answer.status_code == 503 else None  # type: ignore[no-any-return]

    assert poll(not_ready, 20, "/ready saying the agent is banned") == {
        "status": "not ready", "reason": reason,
    }
    fetched = agent.cli("api", "fetch", "x509", check=False)
    assert fetched.returncode == 1
    assert fetched.stderr.splitlines()[-1] == (
        f"Error: the agent has no identity for this process (uid {UID}): no identity issued; "
        f"register an entry whose selectors match it, e.g. --selector unix:uid:{UID}"
    )
    errors = [line for line in agent.log().splitlines() if " ERROR " in line]
    assert len(errors) == 1 and errors[0].endswith(reason), agent.log()

    # Unbanned, it serves again with the SVID it has.
    server.cli("agent", "unban", "--spiffe-id", agent_id)
    poll(lambda: "spiffe://example.org/web" in agent.cli("api", "fetch", "x509").stdout or None,
         20, "the workload's SVID after the unban")
    assert agent.ready()


def test_an_agent_of_another_trust_domain_exits_with_a_sentence(
    server: ServerProcess, tmp_path: Path, socket_dir: Path
) -> None:
    token = join_token(server, NODE)
    bundle = save_bundle(server, tmp_path / "bundle.pem")
    for trust in (["--insecure-bootstrap"], ["--trust-bundle", str(bundle)]):
        result = subprocess.run(
            agent_args(server, tmp_path / "agent", socket_dir / "agent.sock",
                       "--trust-domain", "other.test", "--join-token", token, *trust),
            capture_output=True, text=True, timeout=30,
        )
        assert result.returncode == 1, result.stderr
        assert result.stderr.splitlines()[-1] == (
            f"Error: the server at {server.address} serves trust domain example.org, not "
            "other.test; check --trust-domain (and --server)"
        )
        assert "Traceback" not in result.stderr
    assert server.cli_json("agent", "count") == {"count": 0}

    # A server that does not answer at all is waited for, not given up on.
    silent = ServerProcess(data_dir=tmp_path / "nobody", port=free_port())
    args = agent_args(silent, tmp_path / "waiting", socket_dir / "waiting.sock",
                      "--trust-domain", "other.test", "--join-token", token,
                      "--insecure-bootstrap")  # fmt: skip
    with Process.start("agent", args, log_path=tmp_path / "waiting.log") as waiting:
        waiting.wait_until(lambda: waiting.log().count("Cannot attest yet") >= 2 or None,
                           "two attempts to reach the silent server", 20)  # fmt: skip
        waiting.check_running()


@pytest.mark.parametrize(
    ("content", "status", "line"),
    [
        (b"insecure_bootstrap = 0\n", 2,
         "Error: Invalid value for '--config' (env var: 'TESSERA_CONFIG'): insecure_bootstrap "
         "in {path} must be true or false, not 0"),
        (b"trust_domain = \"caf\xe9.test\"\n", 1,  # read like the server's (one sentence)
         "Error: config file {path} is not UTF-8 text (line 1 has the byte 0xe9); TOML files "
         "must be UTF-8, so save it as UTF-8"),
    ],
)
def test_bad_config_values_get_a_sentence(tmp_path: Path, content: bytes, status: int,
                                          line: str) -> None:
    path = tmp_path / "agent.toml"
    path.write_bytes(content)
    result = tessera("agent", "run", "--config", str(path), "--trust-domain", "example.org",
                     "--server", "127.0.0.1:1", "--data-dir", str(tmp_path / "agent"),
                     check=False)
    assert result.returncode == status, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1] == line.format(path=path)


@contextlib.contextmanager
def mounted(target: Path, *args: str) -> Iterator[None]:
    target.mkdir(mode=0o700)
    done = subprocess.run(["mount", *args, str(target)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount here: {done.stderr.strip()}")
    try:
        yield
    finally:
        subprocess.run(["umount", "-l", str(target)], check=True)


@contextlib.contextmanager
def read_only_dir(target: Path) -> Iterator[None]:
    """``target`` as a read-only bind mount of itself."""
    with mounted(target, "--bind", "-o", "ro", str(target)):
        yield


@contextlib.contextmanager
def full_dir(target: Path) -> Iterator[None]:
    """``target`` on a small tmpfs with no space left."""
    with mounted(target, "-t", "tmpfs", "-o", "size=64k,mode=0700", "tmpfs"):
        with (target / "filler").open("wb", buffering=0) as filler, contextlib.suppress(OSError):
            while True:
                filler.write(b"\0" * 4096)
        yield


@contextlib.contextmanager
def nearly_full_dir(target: Path) -> Iterator[None]:
    """``target`` on a small tmpfs with 12 KiB left: room for a small probe, not for the
    four files an attested agent stores."""
    with mounted(target, "-t", "tmpfs", "-o", "size=64k,mode=0700", "tmpfs"):
        (target / "filler").write_bytes(b"\0" * (52 * 1024))
        yield


@pytest.mark.parametrize(
    ("unwritable", "strerror"),
    [(read_only_dir, os.strerror(errno.EROFS)), (full_dir, os.strerror(errno.ENOSPC)),
     (nearly_full_dir, os.strerror(errno.ENOSPC))],
)
def test_an_unwritable_data_dir_is_refused_before_the_token_is_spent(
    server: ServerProcess, tmp_path: Path, socket_dir: Path,
    unwritable: Callable[[Path], contextlib.AbstractContextManager[None]], strerror: str,
) -> None:
    token = join_token(server, NODE)
    bundle = save_bundle(server, tmp_path / "bundle.pem")
    data_dir = tmp_path / "agent"
    with unwritable(data_dir):
        result = subprocess.run(
            agent_args(server, data_dir, socket_dir / "agent.sock", "--trust-domain",
                       "example.org", "--join-token", token, "--trust-bundle", str(bundle)),
            capture_output=True, text=True, timeout=30,
        )
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1] == (
        f"Error: the agent cannot write to its data directory {data_dir} ({strerror}); give "
        "it a --data-dir on a writable filesystem with free space"
    )
    assert server.cli_json("agent", "count") == {"count": 0}

    agent = AgentProcess(servers=[server], data_dir=tmp_path / "writable",
                         socket=socket_dir / "agent.sock", alias=NODE, trust_bundle=bundle)
    try:
        agent.start(token=token)  # the same token still works
    finally:
        agent.stop()
    assert server.cli_json("agent", "count") == {"count": 1}
