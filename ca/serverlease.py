"""One running server per server ID.

Two processes running with one server ID (a copied data directory, a server
ID file restored into two places) on one datastore would both manage that
ID's authorities, each activating keys over the other's. So a server holds a
*lease* on its ID in the datastore: taken as it starts, renewed by its tick
every second, given up when it stops::

    lease = ServerIdLease.claim(store, server_id, ttl=timedelta(seconds=15), clock=clock)
    lease.renew()     # on every tick; LeaseLost when another process holds the ID now
    lease.release()   # on a clean stop: the server may start again at once

A process that finds a live lease held by another process waits, at most
until that lease expires, to see whether its holder renews it. A holder that
renews is running, and the newcomer refuses to start (:class:`ServerIdInUse`).
A lease that expires unrenewed was left by a process that died (killed,
crashed, its machine lost): the newcomer takes it over. So a server restarted
after a crash starts within one lease TTL, and logs that it is waiting. Where
the holder ran in the newcomer's own pid namespace on the same boot of the
same kernel (the usual restart after a crash, ``tessera up`` included) its
pid says for sure: a holder whose process is gone is taken over at once.
Lease times come from the servers' clocks, which must agree to within a
second or so (as the authorities' rotation already needs).
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path

from ca.datastore.interface import Datastore
from ca.datastore.records import ServerLease
from sdk.clock import SYSTEM_CLOCK, Clock
from sdk.errors import AlreadyExists, FailedPrecondition

log = logging.getLogger(__name__)

DEFAULT_LEASE_TTL = timedelta(seconds=15)
MIN_LEASE_TTL = timedelta(seconds=3)
"""The tick renews every second: a lease must outlast a few ticks."""
POLL_SECONDS = 0.2


class ServerIdInUse(FailedPrecondition):
    """Another running process holds this server ID."""


class LeaseLost(FailedPrecondition):
    """Another process took this server's ID over while it could not renew its lease."""


class ServerIdLease:
    def __init__(self, store: Datastore, lease: ServerLease, ttl: timedelta) -> None:
        self._store = store
        self.server_id = lease.server_id
        self.nonce = lease.nonce
        self.ttl = ttl

    @classmethod
    def claim(
        cls,
        store: Datastore,
        server_id: str,
        *,
        ttl: timedelta = DEFAULT_LEASE_TTL,
        clock: Clock = SYSTEM_CLOCK,
        sleep: Callable[[float], None] = time.sleep,
    ) -> ServerIdLease:
        """Take the lease on ``server_id``, waiting (at most one lease TTL) for a lease
        left by a process that died to expire; ServerIdInUse when its holder is running."""
        nonce = secrets.token_hex(16)
        first = _claim(store, server_id, nonce, ttl)
        if first.nonce == nonce:
            return cls(store, first, ttl)
        if _holder_is_gone(first):
            held = _claim(store, server_id, nonce, ttl, replacing=first.nonce)
            if held.nonce == nonce:
                log.info("took over server ID %s: its previous holder (pid %d) is no longer "
                         "running", server_id, first.pid)
                return cls(store, held, ttl)
            first = held
        deadline = min(first.expires_at, clock.now() + ttl)
        log.warning(
            "server ID %s is held by another process (pid %d on %s) until %s; waiting up to "
            "%ds to see whether it is still running",
            server_id, first.pid, first.hostname, _when(first.expires_at),
            max(0, round((deadline - clock.now()).total_seconds())),
        )
        while True:
            sleep(POLL_SECONDS)
            held = _claim(store, server_id, nonce, ttl)
            if held.nonce == nonce:
                log.info("took over server ID %s: its previous holder let the lease expire",
                         server_id)
                return cls(store, held, ttl)
            if (held.nonce, held.renewed_at) != (first.nonce, first.renewed_at):
                raise ServerIdInUse(_in_use(held))
            if clock.now() >= deadline:
                raise ServerIdInUse(_in_use(held))

    def renew(self) -> None:
        """Extend the lease; LeaseLost when another process holds the ID now."""
        held = self._store.renew_server_lease(self.server_id, self.nonce, ttl=self.ttl)
        if held.nonce != self.nonce:
            raise LeaseLost(
                f"another server (pid {held.pid} on {held.hostname}) took over server ID "
                f"{self.server_id} while this one could not renew its lease (for longer than "
                f"{self.ttl.total_seconds():g}s); this server stops so that the two do not "
                "take each other's authorities"
            )

    def release(self) -> None:
        self._store.release_server_lease(self.server_id, self.nonce)


def _claim(store: Datastore, server_id: str, nonce: str, ttl: timedelta,
           replacing: str | None = None) -> ServerLease:
    def claim() -> ServerLease:
        return store.claim_server_lease(
            server_id, nonce, ttl=ttl, hostname=socket.gethostname(), pid=os.getpid(),
            pid_namespace=pid_namespace(), replacing=replacing,
        )

    try:
        return claim()
    except AlreadyExists:  # another process inserted the first lease at the same moment
        return claim()


def pid_namespace() -> str:
    """Where this process's pid means something: the kernel's boot id and the pid
    namespace; empty where /proc does not say (then no pid is ever judged gone)."""
    try:
        boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return ""
    return f"{boot_id}/{namespace}"


def _holder_is_gone(lease: ServerLease) -> bool:
    """Whether the lease's holder ran beside this process and its pid is free now. A pid
    taken by another process since reads as alive: then the lease is waited out."""
    here = pid_namespace()
    if not here or lease.pid_namespace != here:
        return False
    try:
        os.kill(lease.pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # EPERM: a process of another user has that pid
        return False
    return False


def _in_use(held: ServerLease) -> str:
    return (
        f"server ID {held.server_id} is in use by a running server (pid {held.pid} on "
        f"{held.hostname}, started {_when(held.started_at)}) on the same datastore; two "
        "servers with one ID would take each other's authorities. Stop that server, or give "
        "this one a data directory of its own (an empty --data-dir makes a new server ID; "
        "never copy a data directory)"
    )


def _when(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")
