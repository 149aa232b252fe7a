"""Which instance the built-in proxy sends a request to, and whether it may send it at all.

One :class:`ClusterState` per cluster of the proxy's view (a Service port and subset),
kept across mesh revisions (:meth:`Balancers.update`), so that what it counted about an
endpoint (requests in flight, consecutive errors, an ejection) survives a change that
keeps the endpoint::

    balancers = Balancers(clock=time.monotonic)
    balancers.update(view)                      # each new view; endpoints kept keep their state
    state = balancers.get("outbound|8080||users-service")
    admission = state.admit()                   # the circuit breaker: a reason when full
    if isinstance(admission, str): answer 503 with it
    endpoint = state.pick(hash_key=request_header_value, tried=(...))   # None: none to pick
    state.begin(endpoint)
    ...
    state.end(endpoint, status=503)             # or status=None: connect failure / reset
    admission.release()
    if state.may_retry(): ...; state.retry_started() ... state.retry_finished()

SKELETON: round robin over the healthy endpoints, no limits and no ejection yet.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection
from dataclasses import dataclass

from mesh.view import Cluster, ClusterEndpoints, Endpoint, View
from sdk.address import HostPort

__all__ = ["Admission", "Balancers", "ClusterState"]


@dataclass
class Admission:
    """A request let through the circuit breaker; :meth:`release` when it is done."""

    state: ClusterState

    def release(self) -> None:
        self.state._active -= 1


class ClusterState:
    def __init__(
        self,
        cluster: Cluster,
        endpoints: ClusterEndpoints | None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cluster = cluster
        self.endpoints: tuple[Endpoint, ...] = endpoints.endpoints if endpoints else ()
        self._clock = clock
        self._next = 0
        self._active = 0

    def update(self, cluster: Cluster, endpoints: ClusterEndpoints | None) -> None:
        """The cluster at a new revision: state kept for the endpoints still in it."""
        self.cluster = cluster
        self.endpoints = endpoints.endpoints if endpoints else ()

    def admit(self) -> Admission | str:
        """Let one request through, or say why not (the circuit breaker, in words)."""
        self._active += 1
        return Admission(self)

    def pick(
        self, *, hash_key: str | None = None, tried: Collection[HostPort] = ()
    ) -> Endpoint | None:
        """The endpoint for the next request (not one of ``tried`` when another is left),
        or None when there is none."""
        candidates = [e for e in self.endpoints if e.address not in tried] or list(self.endpoints)
        if not candidates:
            return None
        self._next = (self._next + 1) % len(candidates)
        return candidates[self._next]

    def begin(self, endpoint: Endpoint) -> None:
        """A request (attempt) goes to ``endpoint``."""

    def end(self, endpoint: Endpoint, status: int | None) -> None:
        """The attempt to ``endpoint`` ended: its response status, or None when the
        connection failed or was reset before a response (a gateway error)."""

    def may_retry(self) -> bool:
        """Whether the retry budget (or the fixed ``maxRetries``) allows one more retry now."""
        return True

    def retry_started(self) -> None: ...

    def retry_finished(self) -> None: ...


class Balancers:
    """The :class:`ClusterState` of every cluster of the current view."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._states: dict[str, ClusterState] = {}

    def update(self, view: View) -> None:
        states: dict[str, ClusterState] = {}
        for cluster in view.clusters:
            endpoints = view.cluster_endpoints(cluster.name)
            state = self._states.get(cluster.name)
            if state is None:
                state = ClusterState(cluster, endpoints, clock=self._clock)
            else:
                state.update(cluster, endpoints)
            states[cluster.name] = state
        self._states = states

    def get(self, cluster: str) -> ClusterState | None:
        return self._states.get(cluster)
