"""Every example in examples/, run the way its README says, against a real server and agent.

The READMEs use fixed ports (8443, 8080, 9000...); the tests copy the example
into a temporary directory and give it free ports instead, through the
environment (``PORT``, ``API_URL``, ``REPORTS_URL``) or by rewriting the port in
its config files. Everything else is the README's commands and output.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from spiffe import WorkloadApiClient

from tests.conftest import missing_service
from tests.integration.conftest import free_port
from tests.integration.sidecar_fixtures import (
    NGINX,
    Entry,
    TrustDomain,
    processes,
    tessera_args,
    trust_domain,
    wait_for_port,
)
from tests.support.processes import Process

pytestmark = pytest.mark.integration

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
USER = "spiffe://example.org/user/tester"
WEB = "spiffe://example.org/web"
API = "spiffe://example.org/api"
NGINX_ID = "spiffe://example.org/nginx"

StartProcess = Callable[..., Process]


@pytest.fixture(scope="module")
def domain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TrustDomain]:
    entries = [Entry(USER), Entry(WEB), Entry(API), Entry(NGINX_ID, ttl=4, dns=("localhost",))]
    with trust_domain(tmp_path_factory.mktemp("examples"), entries) as running:
        yield running


@pytest.fixture(scope="module")
def default_id(domain: TrustDomain) -> str:
    """The SVID a plain SDK source gets: the first the Workload API lists."""
    with WorkloadApiClient(socket_path=domain.endpoint, default_timeout=10) as client:
        return str(client.fetch_x509_svid().spiffe_id)


@pytest.fixture
def start() -> Iterator[StartProcess]:
    with processes() as starter:
        yield starter


def copy_example(name: str, tmp_path: Path, ports: dict[int, int]) -> Path:
    """The example in ``tmp_path``, its fixed ports replaced in every config file."""
    target = tmp_path / name
    shutil.copytree(EXAMPLES / name, target)
    for path in [*target.glob("*.toml"), *target.glob("*.conf")]:
        text = path.read_text()
        for old, new in ports.items():
            text = re.sub(rf"\b{old}\b", str(new), text)
        path.write_text(text)
    return target


def run(args: list[str], *, cwd: Path, env: dict[str, str]) -> str:
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"{args} exited {result.returncode}:\n{result.stderr}"
    return result.stdout


def test_sdk_mtls(domain: TrustDomain, default_id: str, tmp_path: Path,
                  start: StartProcess) -> None:  # fmt: skip
    port = free_port()
    example = EXAMPLES / "sdk-mtls"
    server = start("server", [sys.executable, "server.py"], cwd=example, directory=tmp_path,
                   env={**domain.env(), "PORT": str(port)})  # fmt: skip
    server.wait_for(f"serving as {default_id} on https://127.0.0.1:{port}", in_stdout=True)
    wait_for_port(port, process=server)

    output = run([sys.executable, "client.py"], cwd=example,
                 env={**domain.env(), "API_URL": f"https://127.0.0.1:{port}"})  # fmt: skip

    assert output.splitlines() == [
        f"calling https://127.0.0.1:{port} as {default_id}",
        f"GET /hello -> 200 hello {default_id}",
        f"GET /admin -> 403 {default_id} refused by policy rule 'default-deny': no allow rule "
        "matches it for GET /admin",
    ]


def test_jwt_bearer(domain: TrustDomain, default_id: str, tmp_path: Path,
                    start: StartProcess) -> None:  # fmt: skip
    port = free_port()
    example = EXAMPLES / "jwt-bearer"
    server = start("server", [sys.executable, "server.py"], cwd=example, directory=tmp_path,
                   env={**domain.env(), "PORT": str(port)})  # fmt: skip
    server.wait_for(f"serving /reports for audience 'reports' on http://127.0.0.1:{port}",
                    in_stdout=True)  # fmt: skip
    wait_for_port(port, process=server)

    output = run([sys.executable, "client.py"], cwd=example,
                 env={**domain.env(), "REPORTS_URL": f"http://127.0.0.1:{port}"})  # fmt: skip

    assert output.splitlines() == [
        f"with a JWT-SVID for 'reports': 200 {{'caller': '{default_id}', "
        "'reports': ['q1', 'q2']}",
        "with a JWT-SVID for 'billing': 401 the JWT-SVID is for audience 'billing', not "
        "'reports'",
        "with no token: 401 no JWT-SVID was presented; send Authorization: Bearer <JWT-SVID>",
    ]


def test_sidecar(domain: TrustDomain, tmp_path: Path, start: StartProcess) -> None:
    ports = {old: free_port() for old in (8443, 8080, 9000, 8090, 8091)}
    example = copy_example("sidecar", tmp_path, ports)
    env = domain.env()
    app = start("app", [sys.executable, "app.py"], cwd=example, directory=tmp_path,
                env={**env, "PORT": str(ports[8080])})  # fmt: skip
    api = start("api-proxy", tessera_args("sidecar", "proxy", "--config", "api-proxy.toml"),
                cwd=example, directory=tmp_path, env=env)  # fmt: skip
    web = start("web-proxy", tessera_args("sidecar", "proxy", "--config", "web-proxy.toml"),
                cwd=example, directory=tmp_path, env=env)  # fmt: skip
    wait_for_port(ports[8080], process=app)
    for proxy in (api, web):
        proxy.wait_for("Sidecar proxy is ready")
    via_web = f"http://127.0.0.1:{ports[9000]}/hello"

    hello = run(["curl", "-sS", via_web], cwd=example, env=env)
    refused = run(["curl", "-sS", "-X", "DELETE", via_web], cwd=example, env=env)
    metrics = httpx.get(f"http://127.0.0.1:{ports[8090]}/metrics", timeout=10).text

    assert hello == "hello spiffe://example.org/web, from the api app\n"
    assert refused == (
        "spiffe://example.org/web refused by policy rule 'default-deny': no allow rule matches "
        "it for DELETE /hello\n"
    )
    decisions = [line for line in metrics.splitlines()
                 if line.startswith("tessera_sidecar_decisions_total")]  # fmt: skip
    assert decisions == [
        'tessera_sidecar_decisions_total{listener="api",result="allowed",rule="web-reads-hello",'
        'stage="handshake"} 2.0',
        'tessera_sidecar_decisions_total{listener="api",result="allowed",rule="web-reads-hello",'
        'stage="request"} 1.0',
        'tessera_sidecar_decisions_total{listener="api",result="refused",rule="default-deny",'
        'stage="request"} 1.0',
    ]
    assert api.log().startswith(f"Sidecar proxy presenting {API} (Workload API ")
    assert (f"  api: mTLS 127.0.0.1:{ports[8443]} -> 127.0.0.1:{ports[8080]} (http, policy "
            f"{example / 'policy.toml'})") in api.log()  # fmt: skip
    assert api.stop(signal.SIGINT) == 0  # Ctrl-C: a clean stop
    assert api.log().rstrip().endswith("Sidecar stopped.")


def test_nginx_files(domain: TrustDomain, tmp_path: Path, start: StartProcess) -> None:
    if NGINX is None:
        missing_service("nginx is not installed (apt-get install nginx-light)")
    port = free_port()
    example = copy_example("nginx-files", tmp_path, {8443: port})
    (example / "run").mkdir()
    env = domain.env()
    files = start("files", tessera_args(
        "sidecar", "files", "--dir", "certs", "--spiffe-id", NGINX_ID,
        "--health-bind", f"127.0.0.1:{free_port()}",
        "--cmd", f"{NGINX} -p {example}/run -c {example}/nginx.conf -e stderr -s reload",
    ), cwd=example, directory=tmp_path, env=env)  # fmt: skip
    files.wait_for(f"Wrote SVID {NGINX_ID} (serial ")
    nginx = start("nginx", [NGINX, "-p", f"{example}/run", "-c", f"{example}/nginx.conf",
                            "-e", "stderr"], cwd=example, directory=tmp_path, env=env)  # fmt: skip
    wait_for_port(port, process=nginx)
    run(tessera_args("agent", "api", "fetch", "x509", "--write", "client"), cwd=example, env=env)

    greeting = run(["curl", "-sS", "--cacert", "client/bundle.0.pem", "--cert",
                    "client/svid.0.pem", "--key", "client/svid.0.key",
                    f"https://localhost:{port}/"], cwd=example, env=env)  # fmt: skip

    serial = run(["openssl", "x509", "-in", "client/svid.0.pem", "-noout", "-serial"],
                 cwd=example, env=env).strip().removeprefix("serial=")  # fmt: skip
    assert greeting == f"hello from nginx over mTLS; your SVID's serial is {serial}\n"
    files.wait_for(f"INFO tessera.sidecar: ran '{NGINX} -p {example}/run")  # the 4 s SVID rotated
