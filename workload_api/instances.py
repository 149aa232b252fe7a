"""The mesh instances on this node: registered by their proxies, checked, reported.

A proxy (``tessera sidecar run``) registers the app it fronts through the agent's
``Mesh.Register`` call (:mod:`workload_api.mesh_service`); the instance lives while that
call stays open. The agent then:

- **checks its health** with the Service's ``healthCheck`` (``http.path``: a GET that
  answers 200-399; ``tcp``: a connection that opens), every ``interval`` (10 s unless
  set), each try bounded by ``timeout`` (1 s unless set), against the app's address.
  The first result sets the health; after that one success makes an instance healthy
  and two failures in a row unhealthy, so a single lost probe does not pull an instance
  out of every proxy. A Service without a health check leaves its instances ``unknown``
  (they serve: :func:`mesh.catalog.is_routable`).
- **says why** an instance is unhealthy: its check's last failure (``HTTP 503 from
  127.0.0.1:8080/healthz``, ``connection refused by 127.0.0.1:8080``, ``no answer from
  127.0.0.1:8080/healthz within 1 s``) goes with it in each report as ``detail``, one line
  of at most :data:`mesh.catalog.MAX_HEALTH_DETAIL` characters (``tessera mesh services``
  shows it); a new reason is reported at once.
- **reports the whole set** to the server (``PUT /v1/agent/instances``) at once after any
  change, and every third of the lease the server names, which renews it. The report
  carries the NACKs still standing among the node's Envoys too
  (:mod:`workload_api.proxy_rejections`), sent at once when they change. The server
  keeps an instance only when its Service allows its SPIFFE ID and this agent hosts a
  workload with it; a refusal ends the proxy's Register call with the reason.

::

    instances = LocalInstances(report=client.report_instances, mesh=agent.mesh,
                               rejections=lambda: rejections_report(agent.discovery_status))
    runner = asyncio.create_task(instances.run())
    instance = await instances.register(Registration(...))   # raises when refused
    ...
    instances.deregister(instance)
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Final

import httpx

from mesh.catalog import MAX_HEALTH_DETAIL, Health, one_line
from mesh.durations import parse_duration
from mesh.resources import Service
from mesh.resources.service import HealthCheck
from sdk.address import HostPort
from sdk.backoff import Backoff
from sdk.errors import NotFound, PermissionDenied, TesseraError
from workload_api.mesh_sync import MeshState
from workload_api.node_client import InstancesAnswer

__all__ = [
    "DEFAULT_CHECK_INTERVAL",
    "DEFAULT_CHECK_TIMEOUT",
    "LocalInstance",
    "LocalInstances",
    "Registration",
]

MAX_REFUSALS_SAID: Final = 1024
"""Instances whose last refusal is remembered, not to repeat it at WARNING."""
_log = logging.getLogger(__name__)

DEFAULT_CHECK_INTERVAL: Final = timedelta(seconds=10)
DEFAULT_CHECK_TIMEOUT: Final = timedelta(seconds=1)
UNHEALTHY_AFTER: Final = 2
"""Failed checks in a row that make a healthy instance unhealthy."""
FIRST_REPORT_WAIT: Final = 10.0
"""How long a registration waits for the server's first word on it."""
REJOIN_GRACE: Final = 5.0
"""How long a restarted agent waits for its proxies to register again before reporting."""
DEFAULT_REPORT_EVERY: Final = 10.0
"""Between reports before the server has named its lease."""
MAX_LOCAL_INSTANCES: Final = 256
"""As many as the server takes from one agent."""

Report = Callable[
    [Sequence[Mapping[str, Any]], Sequence[Mapping[str, Any]]], Awaitable[InstancesAnswer]
]
"""Sends (instances, the proxies' standing NACKs) to the server; its answer."""


@dataclass(frozen=True)
class Registration:
    """What a proxy asks to register (its SPIFFE ID already checked against its SVIDs)."""

    service: str
    spiffe_id: str
    address: HostPort
    """Where callers reach the instance: its proxy's inbound listener."""
    labels: Mapping[str, str]
    check_address: HostPort
    """Where the agent checks the app's health."""


@dataclass(eq=False)
class LocalInstance:
    """One registered instance and what the agent knows of it."""

    registration: Registration
    health: Health = "unknown"
    detail: str = "not checked yet"
    refused: str | None = None
    """Why the server refused it (then it is gone from the set)."""
    failures: int = 0
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    confirmed: asyncio.Event = field(default_factory=asyncio.Event)
    """Set once the server has answered a report that carried it."""
    version: int = 0

    def _notify(self) -> None:
        self.version += 1
        self.changed.set()
        self.changed = asyncio.Event()

    def to_report(self) -> dict[str, Any]:
        registration = self.registration
        return {
            "service": registration.service,
            "address": str(registration.address),
            "spiffe_id": registration.spiffe_id,
            "labels": dict(registration.labels),
            "health": self.health,
            "detail": self.reported_detail,
        }

    @property
    def reported_detail(self) -> str | None:
        """Why it is unhealthy, as the server keeps it; None when it is not unhealthy."""
        if self.health != "unhealthy":
            return None
        return one_line(self.detail, MAX_HEALTH_DETAIL)


class LocalInstances:
    """The registered instances of this node; :meth:`run` checks and reports them."""

    def __init__(
        self,
        *,
        report: Report,
        mesh: MeshState,
        node: Callable[[], str | None] = lambda: None,
        rejoin_grace: float = REJOIN_GRACE,
        rejections: Callable[[], Sequence[Mapping[str, Any]]] = lambda: (),
    ) -> None:
        self._report = report
        self._mesh = mesh
        self._node = node
        self._rejections = rejections
        self._rejoin_grace = rejoin_grace
        self._instances: dict[tuple[str, str], LocalInstance] = {}
        self._checkers: dict[LocalInstance, asyncio.Task[None]] = {}
        self._dirty = asyncio.Event()
        self._report_every = DEFAULT_REPORT_EVERY
        self._http: httpx.AsyncClient | None = None
        self._reported_any = False
        self._refusals_said: dict[tuple[str, str], str] = {}
        """The last refusal logged at WARNING per instance; a repeat is logged at DEBUG."""

    def __len__(self) -> int:
        return len(self._instances)

    def __iter__(self) -> Any:
        return iter(list(self._instances.values()))

    async def register(self, registration: Registration) -> LocalInstance:
        """Add an instance, report it, and return it once the server keeps it (or has not
        answered within 10 s: the agent goes on reporting it). PermissionDenied or
        NotFound, with the server's reason, when it is refused."""
        key = (registration.service, str(registration.address))
        if key in self._instances:
            raise PermissionDenied(
                f"{registration.service} {registration.address} is registered already on "
                "this node; one proxy registers an instance, with its own inbound address"
            )
        if len(self._instances) >= MAX_LOCAL_INSTANCES:
            raise PermissionDenied(
                f"this node has {MAX_LOCAL_INSTANCES} mesh instances, the most an agent "
                "registers"
            )
        instance = LocalInstance(registration)
        self._instances[key] = instance
        self._dirty.set()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(FIRST_REPORT_WAIT):
                await instance.confirmed.wait()
        if instance.refused is not None:
            raise _refusal(instance.refused)
        self._checkers[instance] = asyncio.create_task(self._check_forever(instance))
        _log.info("mesh instance %s %s registered (%s)", registration.service,
                  registration.address, registration.spiffe_id)
        return instance

    def deregister(self, instance: LocalInstance) -> None:
        """Remove an instance (its proxy left) and report at once."""
        registration = instance.registration
        key = (registration.service, str(registration.address))
        if self._instances.get(key) is instance:
            del self._instances[key]
            self._dirty.set()
            _log.info("mesh instance %s %s deregistered", registration.service,
                      registration.address)
        checker = self._checkers.pop(instance, None)
        if checker is not None:
            checker.cancel()

    # -- reporting -------------------------------------------------------------------------

    async def run(self) -> None:
        """Report after every change and every third of the lease, until cancelled."""
        backoff = Backoff(initial=0.5, maximum=5.0, jitter=0.5)
        self._http = httpx.AsyncClient(
            limits=httpx.Limits(max_keepalive_connections=0), follow_redirects=False,
            headers={"user-agent": "tessera-health-check"},
        )  # fmt: skip
        try:
            await self._await_rejoins()
            while True:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._report_every):
                        await self._dirty.wait()
                self._dirty.clear()
                try:
                    await self.report_once()
                    backoff.reset()
                except TesseraError as err:
                    _log.warning("could not report this node's mesh instances: %s; retrying",
                                 err.message)
                    self._dirty.set()
                    await asyncio.sleep(backoff.next())
        finally:
            for checker in self._checkers.values():
                checker.cancel()
            await asyncio.gather(*self._checkers.values(), return_exceptions=True)
            await self._http.aclose()

    async def _await_rejoins(self) -> None:
        """After a restart, hold the first report until the proxies that had registered
        through this agent (the catalog says which: their node is this agent) have
        registered again, for at most ``rejoin_grace`` seconds: a first report naming
        only the quickest of them would take the others out of the catalog, and put them
        back a moment later."""
        node = self._node()
        expected = {
            (i.service, str(i.address)) for i in self._mesh.catalog if node and i.node == node
        }
        if not expected:
            return
        _log.info("waiting up to %g s for the %d mesh instance(s) registered through this "
                  "agent before it started to register again", self._rejoin_grace, len(expected))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._rejoin_grace):
                while not expected <= self._instances.keys():
                    self._dirty.clear()
                    await self._dirty.wait()
        self._dirty.set()

    def rejections_changed(self) -> None:
        """The proxies' standing NACKs changed: report at once."""
        self._dirty.set()

    async def report_once(self) -> None:
        sent = list(self._instances.values())
        rejections = self._rejections()
        if not sent and not rejections and not self._reported_any:
            return  # nothing registered, nothing ever reported: no need to bother the server
        self._reported_any = True
        answer = await self._report([instance.to_report() for instance in sent], rejections)
        self._report_every = max(1.0, answer.lease_seconds / 3)
        refused = {(service, address): reason for service, address, reason in answer.refused}
        for instance in sent:
            registration = instance.registration
            reason = refused.get((registration.service, str(registration.address)))
            if reason is not None:
                instance.refused = reason
                self.deregister(instance)
                key = (registration.service, str(registration.address))
                level = logging.DEBUG if self._refusals_said.get(key) == reason else logging.WARNING
                if len(self._refusals_said) >= MAX_REFUSALS_SAID:
                    self._refusals_said.clear()
                self._refusals_said[key] = reason
                _log.log(level, "the server refused mesh instance %s %s: %s",
                         registration.service, registration.address, reason)
                instance._notify()
            else:
                self._refusals_said.pop((registration.service, str(registration.address)), None)
            instance.confirmed.set()

    # -- health ----------------------------------------------------------------------------

    async def _check_forever(self, instance: LocalInstance) -> None:
        while True:
            check = self._health_check(instance.registration.service)
            if check is None:
                self._set_health(instance, "unknown", "its Service has no health check")
                await self._mesh.wait_for_change(self._mesh.revision)
                continue
            interval = _seconds(check.interval, DEFAULT_CHECK_INTERVAL)
            timeout = _seconds(check.timeout, DEFAULT_CHECK_TIMEOUT)
            started = time.monotonic()
            ok, detail = await self._probe(instance.registration.check_address, check, timeout)
            self._record(instance, ok, detail)
            await asyncio.sleep(max(0.0, interval - (time.monotonic() - started)))

    def _health_check(self, service: str) -> HealthCheck | None:
        found = self._mesh.config.get(Service, service)
        return found.spec.health_check if found is not None else None

    async def _probe(
        self, address: HostPort, check: HealthCheck, timeout: float
    ) -> tuple[bool, str]:
        if check.http is not None:
            target = f"{address}{check.http.path}"
            assert self._http is not None
            try:
                response = await self._http.get(f"http://{target}", timeout=timeout)
            except httpx.TimeoutException:
                return False, f"no answer from {target} within {timeout:g} s"
            except httpx.ConnectError as err:
                return False, _connect_failure(address, err)
            except httpx.HTTPError as err:
                return False, f"GET {target} failed: {err or type(err).__name__}"
            ok = 200 <= response.status_code < 400
            return ok, f"HTTP {response.status_code} from {target}"
        try:
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation
            # that arrives as the connection completes, and the checker would never stop.
            async with asyncio.timeout(timeout):
                _, writer = await asyncio.open_connection(address.host, address.port)
        except TimeoutError:
            return False, f"TCP {address}: no connection within {timeout:g} s"
        except OSError as err:
            return False, _connect_failure(address, err)
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return True, f"TCP {address}: connected"

    def _record(self, instance: LocalInstance, ok: bool, detail: str) -> None:
        if ok:
            instance.failures = 0
            self._set_health(instance, "healthy", detail)
            return
        instance.failures += 1
        if instance.health != "healthy" or instance.failures >= UNHEALTHY_AFTER:
            self._set_health(instance, "unhealthy", detail)
        else:
            instance.detail = detail

    def _set_health(self, instance: LocalInstance, health: Health, detail: str) -> None:
        reported = instance.reported_detail
        instance.detail = detail
        if instance.health == health:
            if instance.reported_detail != reported:
                self._dirty.set()  # still unhealthy, for another reason: the server shows it
            return
        registration = instance.registration
        _log.info("mesh instance %s %s is %s: %s", registration.service,
                  registration.address, health, detail)
        instance.health = health
        instance._notify()
        self._dirty.set()


def _connect_failure(address: HostPort, err: BaseException) -> str:
    """Why a connection to ``address`` failed, as a sentence: the OS's reason found in
    ``err``'s causes (httpx says only "All connection attempts failed")."""
    cause: BaseException | None = err
    while cause is not None and not (isinstance(cause, OSError) and cause.errno):
        cause = cause.__cause__ or cause.__context__
    if not isinstance(cause, OSError) or not cause.errno:
        return f"could not connect to {address}"
    if cause.errno == errno.ECONNREFUSED:
        return f"connection refused by {address}"
    reason = cause.strerror or os.strerror(cause.errno)
    return f"could not connect to {address}: {reason[:1].lower()}{reason[1:]}"


def _seconds(text: str | None, default: timedelta) -> float:
    return (parse_duration(text) if text else default).total_seconds()


def _refusal(reason: str) -> TesseraError:
    if reason.startswith("there is no Service"):
        return NotFound(reason)
    return PermissionDenied(reason)

