"""``tessera sidecar run``: an app served as an instance of its Service, through a data plane.

::

    sidecar = Sidecar(settings, source, PLANES["builtin"], socket="unix:///run/tessera/agent.sock",
                      health_bind=HostPort("127.0.0.1", 15020), progress=print)
    await sidecar.run(stop)       # until ``stop`` is set; SourceError or RegistrationRefused
                                  # when it cannot go on

In order:

1. the data plane (:mod:`dataplane.planes`) listens (an address in use fails here, before
   anything is registered) and starts following the mesh; ``/live``, ``/ready`` and
   ``/metrics`` are served on ``health_bind``;
2. once the mesh configuration is in effect, the app is registered through the agent
   (:class:`~dataplane.registration.InstanceRegistration`): the Service, the SPIFFE ID
   it serves with, the address callers reach (the inbound listener's, advertised as
   :mod:`dataplane.advertise` says), its labels, and the app's own address for the
   agent's health checks. What the agent reports is on ``/metrics``;
3. ``/ready`` answers 200 once the SVID is held, the configuration is in effect and the
   instance is registered; 503 with the first reason otherwise.

On stop (SIGTERM, SIGINT) the listeners stop accepting, the Register call is closed (so
the agent drops the instance and tells the server at once), and open connections get
:data:`~sdk.sidecar.proxy.SHUTDOWN_GRACE_SECONDS` to finish.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Final

from dataplane.advertise import advertised_address
from dataplane.metrics import SidecarMetrics, follow_svid_expiry
from dataplane.planes import DataPlane, DataPlaneKind, SidecarSettings
from dataplane.registration import InstanceRegistration
from sdk.address import HostPort
from sdk.errors import SourceError, TesseraError
from sdk.sidecar.health import HealthServer
from sdk.sidecar.proxy import SHUTDOWN_GRACE_SECONDS
from sdk.sources import WorkloadApiX509Source

__all__ = ["PlaneFailed", "RegistrationRefused", "Sidecar"]

_log = logging.getLogger("tessera.sidecar")

SOURCE_CHECK_SECONDS: Final = 1.0
"""How often the Workload API stream is checked for having failed for good."""
DEREGISTER_SECONDS: Final = 2.0
"""How long closing the Register call may take on stop."""


class RegistrationRefused(TesseraError):
    """The agent refuses the registration for good (a malformed request)."""


class PlaneFailed(TesseraError):
    """The data plane gave up carrying traffic (Envoy kept exiting at once)."""


class Sidecar:
    def __init__(
        self,
        settings: SidecarSettings,
        source: WorkloadApiX509Source,
        kind: DataPlaneKind,
        *,
        socket: str,
        health_bind: HostPort | None,
        progress: Callable[[str], None],
        grace: float = SHUTDOWN_GRACE_SECONDS,
        log_level: str = "info",
    ) -> None:
        self.settings = settings
        self.metrics = SidecarMetrics()
        self._source = source
        self._socket = socket
        self._progress = progress
        self._grace = grace
        self.plane: DataPlane = kind.build(
            settings, source, self.metrics, socket=socket, log_level=log_level
        )
        self.registration: InstanceRegistration | None = None
        self._health = (
            HealthServer(health_bind, self.metrics, ready=self.ready_problem,
                         more_metrics=self.plane.more_metrics)
            if health_bind is not None else None
        )  # fmt: skip
        self._announced = False
        self._stopping = False

    def ready_problem(self) -> str | None:
        """Why the sidecar is not ready, or None."""
        if self._stopping:
            return "the sidecar is stopping"
        return (
            self._source.problem()
            or self._source.no_identity()
            or self.plane.ready_problem()
            or self._registration_problem()
        )

    def _registration_problem(self) -> str | None:
        service = self.settings.service
        registration = self.registration
        if registration is None:
            return f"not registered as an instance of {service} yet"
        if not registration.registered:
            return (f"not registered as an instance of {service}: "
                    f"{registration.problem or 'registering'}")  # fmt: skip
        return None

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until ``stop`` is set, then stop as the module says."""
        unsubscribe = follow_svid_expiry(self._source, self.metrics)
        registering: asyncio.Task[None] | None = None
        try:
            await self.plane.start()
            address = advertised_address(self.plane.inbound_address)
            if self._health is not None:
                await self._health.start()
            for line in self.plane.describe():
                self._progress(f"  {line}")
            if self._health is not None:
                self._progress(f"  health:  {self._health.url}/ready, {self._health.url}/metrics")
            if not await self._until(stop, self.plane.configured.wait()):
                return
            self.registration = InstanceRegistration(
                socket=self._socket, service=self.settings.service,
                spiffe_id=str(self.settings.spiffe_id), address=address,
                check_address=self.settings.app, labels=self.settings.labels,
                on_change=self._registration_changed,
            )  # fmt: skip
            self._progress(f"  registering {address} as an instance of {self.settings.service} "
                           f"(the agent checks the app at {self.settings.app})")  # fmt: skip
            registering = asyncio.create_task(self.registration.run())
            if await self._until(stop, registering):
                problem = self.registration.problem or "the agent refused it"
                raise RegistrationRefused(
                    f"cannot register {address} as an instance of {self.settings.service}: "
                    f"{problem}"
                )
        finally:
            unsubscribe()
            await self._shut_down(registering)

    async def _shut_down(self, registering: asyncio.Task[None] | None) -> None:
        self._stopping = True
        self.plane.stop_accepting()
        if registering is not None and not registering.done():
            self._progress(
                f"Stopping: deregistering the instance of {self.settings.service}, "
                f"letting open connections finish (up to {self._grace:g} s)"
            )
            registering.cancel()  # closes the Register call: the agent deregisters at once
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await asyncio.wait_for(registering, DEREGISTER_SECONDS)
            self.metrics.set_instance(registered=False, health="unknown")
        await self.plane.stop(self._grace)
        if self._health is not None:
            await self._health.stop()

    async def _until(self, stop: asyncio.Event, work: Awaitable[Any]) -> bool:
        """Wait for ``work``: True once it is done, False if ``stop`` came first;
        SourceError if the Workload API stream fails for good meanwhile, PlaneFailed if
        the data plane gives up."""
        working = asyncio.ensure_future(work)
        stopping = asyncio.ensure_future(stop.wait())
        try:
            while True:
                done, _ = await asyncio.wait(
                    {working, stopping}, timeout=SOURCE_CHECK_SECONDS,
                    return_when=asyncio.FIRST_COMPLETED,
                )  # fmt: skip
                if stopping in done:
                    return False
                if working in done:
                    working.result()
                    return True
                problem = self._source.problem()
                if problem:
                    raise SourceError(problem)
                failure = self.plane.failure()
                if failure:
                    raise PlaneFailed(failure)
        finally:
            stopping.cancel()
            if not isinstance(work, asyncio.Task):  # a task is the caller's to stop
                working.cancel()

    def _registration_changed(self, registration: InstanceRegistration) -> None:
        self.metrics.set_instance(registered=registration.registered, health=registration.health)
        if registration.registered and not self._announced and self.ready_problem() is None:
            self._announced = True
            self._progress(
                f"Sidecar is ready: an instance of {self.settings.service}, health "
                "checked by the agent. Ctrl-C stops it."
            )
