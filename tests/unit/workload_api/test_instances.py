"""The agent's registry of mesh instances: what it reports, and its health checks against a
real local HTTP app and TCP port. The server's node API is stood in for by a function
that records each report and answers as the server would (refusing what it is told to)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any

import pytest

from mesh import parse_documents
from mesh.catalog import Instance
from sdk.address import HostPort
from sdk.errors import NotFound, PermissionDenied
from workload_api.instances import LocalInstance, LocalInstances, Registration
from workload_api.mesh_sync import MeshState
from workload_api.node_client import InstancesAnswer, MeshUpdate

USERS_ID = "spiffe://example.org/users"
SERVICE = """\
apiVersion: tessera.io/v1alpha1
kind: Service
metadata: {{name: users}}
spec:
  spiffeIds: [spiffe://example.org/users]
  ports: [{{number: 80, protocol: HTTP}}]
  healthCheck: {check}
"""
DEADLINE = 10.0


class FakeNodeApi:
    """Records reports; refuses the (service, address) pairs in ``refuse``."""

    def __init__(self) -> None:
        self.reports: list[list[dict[str, Any]]] = []
        self.refuse: dict[tuple[str, str], str] = {}
        self.rejections: list[list[dict[str, Any]]] = []
        self.reported = asyncio.Event()

    async def __call__(self, instances: Sequence[Mapping[str, Any]],
                       rejections: Sequence[Mapping[str, Any]] = ()) -> InstancesAnswer:
        self.reports.append([dict(i) for i in instances])
        self.rejections.append([dict(r) for r in rejections])
        self.reported.set()
        refused = tuple(
            (i["service"], i["address"], self.refuse[(i["service"], i["address"])])
            for i in instances if (i["service"], i["address"]) in self.refuse
        )
        return InstancesAnswer(revision=len(self.reports), lease_seconds=30.0, refused=refused)


class App:
    """A real HTTP app on loopback whose /healthz answers ``status``."""

    def __init__(self) -> None:
        self.status = 200
        self.server: asyncio.Server | None = None

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            await reader.readuntil(b"\r\n\r\n")
            writer.write(f"HTTP/1.1 {self.status} X\r\ncontent-length: 0\r\n"
                         "connection: close\r\n\r\n".encode())
            await writer.drain()
        writer.close()

    @property
    def address(self) -> HostPort:
        assert self.server is not None
        return HostPort("127.0.0.1", self.server.sockets[0].getsockname()[1])


@contextlib.asynccontextmanager
async def serving_app() -> AsyncIterator[App]:
    served = App()
    served.server = await asyncio.start_server(served.handle, "127.0.0.1", 0)
    try:
        yield served
    finally:
        served.server.close()
        await served.server.wait_closed()


def synchronously(scenario: Callable[[], Awaitable[None]]) -> Callable[[], None]:
    """A test that runs ``scenario`` in a fresh event loop, as the agent's tests do."""

    @functools.wraps(scenario)
    def test() -> None:
        asyncio.run(scenario())

    return test


def mesh_with(check: str) -> MeshState:
    state = MeshState()
    [service] = parse_documents(SERVICE.format(check=check), source="mesh.yaml")
    state.apply(MeshUpdate(revision=1, full=True, deleted=(), resources=(
        {"kind": "Service", "name": "users", "document": service.to_document()},)))
    return state


def registration(check: HostPort, address: str = "10.0.0.1:8443") -> Registration:
    return Registration("users", USERS_ID, HostPort.parse(address), {"version": "v1"}, check)


async def until(instance: LocalInstance, health: str) -> None:
    async def wait() -> None:
        while instance.health != health:
            await instance.changed.wait()
    await asyncio.wait_for(wait(), DEADLINE)


@contextlib.asynccontextmanager
async def running(instances: LocalInstances) -> AsyncIterator[None]:
    task = asyncio.create_task(instances.run())
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


@synchronously
async def test_an_http_check_needs_two_failures_to_pull_a_healthy_instance() -> None:
    async with serving_app() as app:
        api = FakeNodeApi()
        instances = LocalInstances(report=api, mesh=mesh_with(
            "{http: {path: /healthz}, interval: 20ms, timeout: 1s}"))
        async with running(instances):
            instance = await instances.register(registration(app.address))
            assert api.reports[0] == [{"service": "users", "address": "10.0.0.1:8443",
                                       "spiffe_id": USERS_ID, "labels": {"version": "v1"},
                                       "health": "unknown", "detail": None}]
            await until(instance, "healthy")
            assert instance.detail == f"HTTP 200 from {app.address}/healthz"

            app.status = 503
            await until(instance, "unhealthy")
            assert instance.detail == f"HTTP 503 from {app.address}/healthz"
            assert instance.failures >= 2  # one 503 alone left it healthy
            await asyncio.wait_for(reported(api, "unhealthy"), DEADLINE)
            assert api.reports[-1][0]["detail"] == f"HTTP 503 from {app.address}/healthz"

            app.status = 500  # still unhealthy, for another reason: reported at once
            await asyncio.wait_for(reported(api, "unhealthy", f"HTTP 500 from {app.address}"
                                            "/healthz"), DEADLINE)  # fmt: skip
            app.status = 200
            await until(instance, "healthy")

            await asyncio.wait_for(reported(api, "healthy"), DEADLINE)
            assert api.reports[-1][0]["detail"] is None
            healths = [report[0]["health"] for report in api.reports]
            assert healths[:2] == ["unknown", "healthy"]
            assert "unhealthy" in healths

            instances.deregister(instance)
            await asyncio.wait_for(reported_empty(api), DEADLINE)


async def reported(api: FakeNodeApi, health: str, detail: str | None = None) -> None:
    """Until the last report gives its first instance ``health`` (and ``detail``)."""
    while not api.reports or not api.reports[-1] or api.reports[-1][0]["health"] != health \
            or (detail is not None and api.reports[-1][0]["detail"] != detail):
        api.reported.clear()
        await api.reported.wait()


async def reported_empty(api: FakeNodeApi) -> None:
    while api.reports[-1] != []:
        api.reported.clear()
        await api.reported.wait()


def closed_port() -> int:
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port: int = closed.getsockname()[1]
    closed.close()
    return port


@pytest.mark.parametrize("check", ["{tcp: {}, interval: 20ms}",
                                   "{http: {path: /healthz}, interval: 20ms}"])
def test_a_port_nobody_listens_on_is_unhealthy_because_the_connection_is_refused(
    check: str,
) -> None:
    async def scenario() -> None:
        port = closed_port()
        api = FakeNodeApi()
        instances = LocalInstances(report=api, mesh=mesh_with(check))
        async with running(instances):
            instance = await instances.register(registration(HostPort("127.0.0.1", port)))
            await until(instance, "unhealthy")  # the first result sets the health
            assert instance.detail == f"connection refused by 127.0.0.1:{port}"
            await asyncio.wait_for(reported(api, "unhealthy"), DEADLINE)
            assert api.reports[-1][0]["detail"] == f"connection refused by 127.0.0.1:{port}"

    asyncio.run(scenario())


def test_a_long_or_multiline_reason_is_reported_as_one_bounded_line() -> None:
    instance = LocalInstance(registration(HostPort("127.0.0.1", 1)), health="unhealthy",
                             detail="GET failed:\n\x1b[31m" + "x" * 500)
    reported_detail = instance.to_report()["detail"]
    assert reported_detail.startswith("GET failed: [31mxxx")
    assert reported_detail.endswith("...") and len(reported_detail) == 200
    assert LocalInstance(registration(HostPort("127.0.0.1", 1)), health="healthy",
                         detail="HTTP 200 from 127.0.0.1:1/").to_report()["detail"] is None


@synchronously
async def test_a_refused_registration_says_why_and_leaves_nothing() -> None:
    async with serving_app() as app:
        api = FakeNodeApi()
        api.refuse[("users", "10.0.0.1:8443")] = "Service users may be served by X, not by Y"
        api.refuse[("users", "10.0.0.2:8443")] = "there is no Service users; apply one"
        instances = LocalInstances(report=api, mesh=mesh_with("{tcp: {}}"))
        async with running(instances):
            with pytest.raises(PermissionDenied) as denied:
                await instances.register(registration(app.address))
            assert denied.value.message == "Service users may be served by X, not by Y"
            with pytest.raises(NotFound):
                await instances.register(registration(app.address, "10.0.0.2:8443"))
            assert len(instances) == 0

            kept = await instances.register(registration(app.address, "10.0.0.3:8443"))
            with pytest.raises(PermissionDenied) as twice:
                await instances.register(registration(app.address, "10.0.0.3:8443"))
            assert "registered already on this node" in twice.value.message
            assert list(instances) == [kept]


def test_a_refusal_repeated_by_a_sidecar_trying_again_is_a_warning_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def scenario() -> None:
        async with serving_app() as app:
            api = FakeNodeApi()
            api.refuse[("users", "10.0.0.1:8443")] = "there is no Service users; apply one"
            instances = LocalInstances(report=api, mesh=mesh_with("{tcp: {}}"))
            async with running(instances):
                for _ in range(3):
                    with pytest.raises(NotFound):
                        await instances.register(registration(app.address))
                api.refuse[("users", "10.0.0.1:8443")] = "Service users may be served by X"
                with pytest.raises(PermissionDenied):
                    await instances.register(registration(app.address))

    with caplog.at_level(logging.DEBUG, logger="workload_api.instances"):
        asyncio.run(scenario())
    said = [(r.levelno, r.getMessage().rpartition(": ")[2]) for r in caplog.records
            if "refused mesh instance" in r.getMessage()]  # fmt: skip
    missing = "there is no Service users; apply one"
    assert said == [
        (logging.WARNING, missing), (logging.DEBUG, missing), (logging.DEBUG, missing),
        (logging.WARNING, "Service users may be served by X"),
    ]


@synchronously
async def test_a_service_without_a_check_leaves_its_instances_unknown() -> None:
    async with serving_app() as app:
        state = MeshState()
        instances = LocalInstances(report=FakeNodeApi(), mesh=state)  # no Service at all here
        async with running(instances):
            instance = await instances.register(registration(app.address))
            await asyncio.sleep(0)  # let the checker look once
            for _ in range(100):
                if instance.detail != "not checked yet":
                    break
                await asyncio.sleep(0)
            assert (instance.health, instance.detail) == ("unknown",
                                                         "its Service has no health check")


def restarted_mesh(node: str) -> MeshState:
    """A mesh whose catalog holds two instances this agent registered before a restart."""
    state = mesh_with("{tcp: {}, interval: 1s}")
    instances = tuple(
        {"service": "users", "address": address, "node": node, "labels": {},
         "health": "healthy", "since": "2030-01-01T00:00:00+00:00", "spiffeId": USERS_ID}
        for address in ("10.0.0.1:8443", "10.0.0.2:8443")
    )
    state.apply(MeshUpdate(revision=2, full=False, deleted=(), resources=(),
                           instances=tuple(Instance.from_json(i) for i in instances)))
    return state


@synchronously
async def test_a_restarted_agent_reports_once_its_proxies_have_registered_again() -> None:
    node = "spiffe://example.org/tessera/agent/a"
    async with serving_app() as app:
        api = FakeNodeApi()
        instances = LocalInstances(report=api, mesh=restarted_mesh(node), node=lambda: node)
        async with running(instances):
            first = asyncio.create_task(instances.register(registration(app.address)))
            for _ in range(50):  # turns of the loop in which an unheld report would go out
                await asyncio.sleep(0)
            assert api.reports == []  # held: the other proxy has not come back yet
            await instances.register(registration(app.address, "10.0.0.2:8443"))
            await first
            assert [i["address"] for i in api.reports[0]] == ["10.0.0.1:8443", "10.0.0.2:8443"]

        # One that never comes back is dropped after the grace, not waited for.
        api = FakeNodeApi()
        instances = LocalInstances(report=api, mesh=restarted_mesh(node), node=lambda: node,
                                   rejoin_grace=0.05)
        async with running(instances):
            await instances.register(registration(app.address))
            assert [i["address"] for i in api.reports[0]] == ["10.0.0.1:8443"]


@synchronously
async def test_the_proxies_rejections_are_reported_at_once_even_without_an_instance() -> None:
    api = FakeNodeApi()
    standing: list[dict[str, Any]] = []
    instances = LocalInstances(report=api, mesh=MeshState(), rejections=lambda: list(standing))
    async with running(instances):
        await asyncio.sleep(0)
        assert api.reports == []  # nothing to say: the server is not bothered
        standing.append({"node_id": "gateway~n1", "reason": "malformed IP address: localhost"})
        instances.rejections_changed()
        await asyncio.wait_for(api.reported.wait(), DEADLINE)
        assert (api.reports, api.rejections) == ([[]], [standing[:]])

        standing.clear()  # accepted since: the next report says so at once
        api.reported.clear()
        instances.rejections_changed()
        await asyncio.wait_for(api.reported.wait(), DEADLINE)
        assert api.rejections[-1] == []
