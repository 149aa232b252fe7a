"""``pip install tessera`` (no extra) is what a service using the SDK needs.

A fresh virtualenv gets the base install of this checkout (pip's own index and
cache settings, nothing added). In it the server's, the agent's and the web
integrations' packages are absent; the SDK imports and does mTLS over a
loopback socket with certificates the test CA made on the spot; and ``tessera
server run`` names the extra to install instead of failing with a traceback.
Building the venv takes a few seconds to a minute.
"""

from __future__ import annotations

import shutil
import subprocess
import venv
from pathlib import Path

import pytest

from tests.support.pki import TestCA, write_key_pem, write_pem

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parents[2]
SOURCES = ("pyproject.toml", "README.md", "LICENSE", "tessera", "ca", "attestor",
           "workload_api", "dataplane", "sdk", "mesh")
NOT_IN_BASE = ("sqlalchemy", "alembic", "fastapi", "starlette", "uvicorn", "hvac", "psycopg",
               "grpclib", "pydantic", "httpx", "yaml", "re2")

# Runs in the base venv: an mTLS echo between contexts sdk.tls builds over StaticX509Source,
# each side printing the SPIFFE ID it saw. Its SVIDs and bundle are files the test CA wrote to
# the directory in argv[1] (bundle.pem, api.pem, api.key, web.pem, web.key).
MTLS_SCRIPT = '''
import socket, sys, threading
from pathlib import Path
from cryptography.hazmat.primitives.serialization import Encoding
from sdk import (StaticX509Source, TrustDomain, X509Bundle, X509Svid,
                 authorize_id, mtls_client_context, mtls_server_context, peer_spiffe_id)

pki = Path(sys.argv[1])
bundle = X509Bundle.load(TrustDomain("example.org"), pki / "bundle.pem", Encoding.PEM)

def source(name):
    svid = X509Svid.load(pki / f"{name}.pem", pki / f"{name}.key", Encoding.PEM)
    return StaticX509Source(svid, [bundle])

API, WEB = "spiffe://example.org/api", "spiffe://example.org/web"
server_context = mtls_server_context(source("api"), authorize_id(WEB))
client_context = mtls_client_context(source("web"), authorize_id(API))
listener = socket.create_server(("127.0.0.1", 0))
seen_by_server = []

def serve():
    conn, _ = listener.accept()
    with server_context.wrap_socket(conn, server_side=True) as tls:
        seen_by_server.append(str(peer_spiffe_id(tls)))
        tls.sendall(tls.recv(100))

thread = threading.Thread(target=serve)
thread.start()
with socket.create_connection(listener.getsockname()) as raw:
    with client_context.wrap_socket(raw, server_hostname="api.internal") as tls:
        tls.sendall(b"ping")
        echoed = tls.recv(100)
        print("client saw", peer_spiffe_id(tls), echoed.decode())
thread.join()
print("server saw", seen_by_server[0])
'''


@pytest.fixture(scope="module")
def base_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A venv holding ``pip install <this checkout>``: the base install, no extra."""
    root = tmp_path_factory.mktemp("base-install")
    source = root / "tessera-src"
    source.mkdir()
    for name in SOURCES:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, source / name,
                            ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        elif path.exists():
            shutil.copy2(path, source / name)
    env_dir = root / "venv"
    venv.create(env_dir, with_pip=True)
    subprocess.run([str(env_dir / "bin" / "python"), "-m", "pip", "install", "--quiet",
                    str(source)], check=True, timeout=540)
    return env_dir


def run_in(env_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*args], capture_output=True, text=True, timeout=60,
                          cwd=env_dir, env={"PATH": str(env_dir / "bin")})


def test_the_base_install_has_none_of_the_server_agent_or_web_packages(
    base_venv: Path,
) -> None:
    python = str(base_venv / "bin" / "python")
    for module in NOT_IN_BASE:
        result = run_in(base_venv, python, "-c", f"import {module}")
        assert result.returncode == 1, module
        assert f"ModuleNotFoundError: No module named '{module}'" in result.stderr
    result = run_in(base_venv, python, "-c",
                    "import sdk, sdk.tls, sdk.sources, sdk.jwtsvid, sdk.sidecar.cli, tessera.cli")
    assert result.returncode == 0, result.stderr


def test_the_base_install_does_mtls_with_the_sdk(
    base_venv: Path, test_ca: TestCA, tmp_path: Path
) -> None:
    (tmp_path / "bundle.pem").write_bytes(test_ca.bundle_pem())
    for name in ("api", "web"):
        svid = test_ca.issue_x509_svid(f"spiffe://example.org/{name}")
        write_pem(tmp_path / f"{name}.pem", *svid.cert_chain)
        write_key_pem(tmp_path / f"{name}.key", svid.private_key)
    result = run_in(base_venv, str(base_venv / "bin" / "python"), "-c", MTLS_SCRIPT,
                    str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "client saw spiffe://example.org/api ping",
        "server saw spiffe://example.org/web",
    ]


def test_tessera_server_run_on_the_base_install_names_the_server_extra(
    base_venv: Path, tmp_path: Path
) -> None:
    tessera = str(base_venv / "bin" / "tessera")
    result = run_in(base_venv, tessera, "server", "run", "--trust-domain", "example.org",
                    "--data-dir", str(tmp_path / "server"))
    assert result.returncode == 1
    assert result.stderr == ("Error: tessera server needs the server extra: "
                             "pip install 'tessera[server]'\n")
    assert not (tmp_path / "server").exists()

    result = run_in(base_venv, tessera, "up", "--data-dir", str(tmp_path / "up"))
    assert result.returncode == 1
    assert result.stderr == ("Error: tessera up needs the server and agent extras: "
                             "pip install 'tessera[server,agent]'\n")

    result = run_in(base_venv, tessera, "mesh", "get", "vs")
    assert result.returncode == 1
    assert result.stderr == ("Error: tessera mesh needs the server extra: "
                             "pip install 'tessera[server]'\n")

    result = run_in(base_venv, tessera, "--help")
    assert result.returncode == 0, result.stderr
    assert "agent    Needs the agent extra: pip install 'tessera[agent]'." in result.stdout


def test_the_sidecars_run_on_the_base_install_and_run_names_the_extra_it_needs(
    base_venv: Path, tmp_path: Path
) -> None:
    tessera = str(base_venv / "bin" / "tessera")
    for command in ("files", "proxy", "run"):
        result = run_in(base_venv, tessera, "sidecar", command, "--help")
        assert result.returncode == 0, result.stderr
    result = run_in(base_venv, tessera, "sidecar", "run", "--service", "users-service",
                    "--spiffe-id", "spiffe://example.org/users", "--app", "127.0.0.1:8080",
                    "--socket", str(tmp_path / "agent.sock"))
    assert (result.returncode, result.stderr) == (
        1, "Error: tessera sidecar run needs the mesh extra: pip install 'tessera[mesh]'\n")

