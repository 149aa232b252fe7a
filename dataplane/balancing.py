"""Which instance the built-in proxy sends a request to, and whether it may send it at all.

One :class:`ClusterState` per cluster of the proxy's view (a Service port and subset),
kept across mesh revisions (:meth:`Balancers.update`), so that what it counted about an
endpoint (requests in flight, consecutive errors, an ejection) survives a change that
keeps the endpoint (the same address)::

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
    balancers.stats()                           # per cluster: ejections, overflows (/metrics)

It does what the same view tells Envoy (:mod:`mesh.envoy.clusters`), as Envoy does it,
with these simplifications, all driven by the injected clock (nothing runs in the
background: time is looked at when a request is picked or ends):

**Load balancing** (``cluster.load_balancer.policy``), among the endpoints not ejected,
those not in ``tried`` first (Istio's ``previous_hosts`` retry predicate):

- ``ROUND_ROBIN``: each endpoint in turn, skipping the ejected and tried ones;
- ``LEAST_REQUEST``: two endpoints drawn at random, the one with fewer requests in flight
  (Envoy's power of two choices; a tie goes to the first drawn);
- ``RANDOM``: one at random;
- ``CONSISTENT_HASH``: rendezvous hashing on ``hash_key`` (the endpoint whose hash of
  key and address is highest): removing an endpoint moves only the keys it had, adding
  one takes about 1/n of the keys from the others. Envoy uses a ring
  (``RING_HASH``): the same key may land on another instance than Envoy would pick, but
  it always lands on the same one. Without a key: random, as Envoy does.

The view holds only healthy (or unchecked) instances; when every one of them is ejected
there is nothing to pick (None: Istio turns Envoy's panic mode off, and Envoy then
answers 503 "no healthy upstream").

**Outlier detection** (``cluster.outlier_detection``; None: off). An attempt's end
(:meth:`ClusterState.end`) counts, per endpoint: a status 500-599, or no response at all
(a refused, reset or timed-out connection: ``status=None``), is a *5xx error*; 502, 503,
504 and no response are *gateway errors*. Another 5xx ends a run of gateway errors; a
status below 500 (4xx included) ends both runs. When a run reaches its threshold
(``consecutive_5xx_errors``, ``consecutive_gateway_errors``) the endpoint is ejected
for ``base_ejection_time`` times the number of times it has been ejected, at most
:data:`MAX_EJECTION_TIME` (Envoy's default ``max_ejection_time``; a longer base time is
kept whole). That number goes down by one for each whole ``interval`` the endpoint
then spends back in service (Envoy's decay, counted from its return rather than at
Envoy's sweeps). An ejected endpoint returns as soon as its time is over, not at the
next ``interval`` sweep as in Envoy. At most ``max_ejection_percent`` of the cluster's
endpoints are ejected at once, but one endpoint may always be, whatever the percentage
(Envoy's documented rule: "will eject at least one host regardless of the value"); an
ejection refused so is counted (``ejections_overflow``) and tried again at the
endpoint's next error. ``consecutive5xxErrors: 0`` (no check) is how to turn it off.

**Circuit breaker** (``cluster.connection_pool``; None: no limit). The built-in proxy
sends one request per upstream connection at a time and never queues one waiting for a
connection, so requests in flight (admitted and not released) stand for everything
Envoy limits: :meth:`ClusterState.admit` refuses a request when those in flight reach
``http2MaxRequests`` (Envoy's ``max_requests``), or ``maxConnections`` +
``http1MaxPendingRequests`` when both are set (the connections, each carrying one
request, plus the requests Envoy would let wait for one). ``maxConnections`` alone (or
``http1MaxPendingRequests`` alone) limits nothing here: Envoy would queue the requests
beyond it without limit. ``maxRequestsPerConnection``, ``connectTimeout`` and
``idleTimeout`` are the connection pool's business, not this module's.

**Retries** (:meth:`ClusterState.may_retry`): ``maxRetries`` retries in flight when it is
set, else Envoy's retry budget as Tessera renders it: :data:`mesh.defaults.RETRY_BUDGET_PERCENT`
of the requests in flight to the cluster (rounded down), at least
:data:`mesh.defaults.RETRY_BUDGET_MIN_RETRIES`. A retry is an attempt of a request
already admitted: it takes no admission of its own.
"""

from __future__ import annotations

import hashlib
import random
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Final

from mesh import defaults
from mesh.view import Cluster, ClusterEndpoints, Endpoint, OutlierDetection, View
from sdk.address import HostPort

__all__ = [
    "GATEWAY_ERRORS",
    "MAX_EJECTION_TIME",
    "Admission",
    "Balancers",
    "ClusterState",
    "ClusterStats",
]

GATEWAY_ERRORS: Final = frozenset({502, 503, 504})
"""The statuses that count as gateway errors (with no response at all)."""

MAX_EJECTION_TIME: Final = timedelta(seconds=300)
"""The longest ejection (Envoy's default ``max_ejection_time``), unless the base is longer."""


@dataclass
class Admission:
    """A request let through the circuit breaker; :meth:`release` when it is done (a
    second release does nothing)."""

    state: ClusterState
    released: bool = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.state._active -= 1


@dataclass(frozen=True)
class ClusterStats:
    """What a cluster's state counted, for the proxy's ``/metrics``: gauges (now) and
    totals (since the cluster first appeared in a view)."""

    requests_in_flight: int
    retries_in_flight: int
    endpoints: int
    ejected: int
    """Endpoints ejected now."""
    ejections_total: int
    """Ejections (each endpoint each time), of both kinds."""
    ejections_5xx_total: int
    ejections_gateway_total: int
    ejections_overflow_total: int
    """Ejections refused because ``max_ejection_percent`` were ejected already."""
    overflows_total: int
    """Requests the circuit breaker refused."""
    retry_overflows_total: int
    """Retries the retry budget (or ``maxRetries``) refused."""


@dataclass
class _EndpointState:
    endpoint: Endpoint
    in_flight: int = 0
    consecutive_5xx: int = 0
    consecutive_gateway: int = 0
    times_ejected: int = 0
    ejected_until: float | None = None
    back_since: float = 0.0
    """When it last returned from an ejection (or last lost one of ``times_ejected``)."""


@dataclass
class _Counters:
    ejections_5xx: int = 0
    ejections_gateway: int = 0
    ejections_overflow: int = 0
    overflows: int = 0
    retry_overflows: int = 0


class ClusterState:
    """One cluster's endpoints and what the built-in proxy knows about each."""

    def __init__(
        self,
        cluster: Cluster,
        endpoints: ClusterEndpoints | None,
        *,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self._clock = clock
        self._rng = rng if rng is not None else random.Random()
        self._states: dict[HostPort, _EndpointState] = {}
        self._next = 0
        self._active = 0
        self._retries = 0
        self._counters = _Counters()
        self.update(cluster, endpoints)

    @property
    def endpoints(self) -> tuple[Endpoint, ...]:
        """The cluster's endpoints in the view (ejected ones included), in its order."""
        return tuple(state.endpoint for state in self._states.values())

    def update(self, cluster: Cluster, endpoints: ClusterEndpoints | None) -> None:
        """The cluster at a new revision: state kept for the endpoints still in it (by
        address), new endpoints start afresh, the others are forgotten."""
        self.cluster = cluster
        states: dict[HostPort, _EndpointState] = {}
        for endpoint in endpoints.endpoints if endpoints else ():
            state = self._states.get(endpoint.address)
            if state is None:
                state = _EndpointState(endpoint)
            state.endpoint = endpoint
            states[endpoint.address] = state
        self._states = states

    # -- the circuit breaker -------------------------------------------------------------

    def admit(self) -> Admission | str:
        """Let one request through, or say why not (the circuit breaker, in words)."""
        limit = self._request_limit()
        if limit is not None and self._active >= limit[0]:
            self._counters.overflows += 1
            where = self.cluster.connection_pool.source
            return (
                f"circuit breaker: {self._active} requests in flight to {self._target()} "
                f"({where}.{limit[1]})"
            )
        self._active += 1
        return Admission(self)

    def _request_limit(self) -> tuple[int, str] | None:
        """The most requests in flight, and the field(s) that set it."""
        pool = self.cluster.connection_pool
        limits: list[tuple[int, str]] = []
        if pool.http2_max_requests is not None:
            limits.append((pool.http2_max_requests, "http.http2MaxRequests"))
        if pool.max_connections is not None and pool.http1_max_pending_requests is not None:
            limits.append((
                pool.max_connections + pool.http1_max_pending_requests,
                "tcp.maxConnections and http.http1MaxPendingRequests",
            ))  # fmt: skip
        return min(limits, key=lambda item: item[0]) if limits else None

    def _target(self) -> str:
        subset = f" subset {self.cluster.subset}" if self.cluster.subset else ""
        return f"{self.cluster.service} port {self.cluster.port}{subset}"

    # -- picking -------------------------------------------------------------------------

    def pick(
        self, *, hash_key: str | None = None, tried: Collection[HostPort] = ()
    ) -> Endpoint | None:
        """The endpoint for the next request (not one of ``tried`` when another is left),
        or None when there is none (none in the view, or all ejected)."""
        self._refresh()
        serving = [state for state in self._states.values() if state.ejected_until is None]
        candidates = [s for s in serving if s.endpoint.address not in tried] or serving
        if not candidates:
            return None
        policy = self.cluster.load_balancer.policy
        if policy == "ROUND_ROBIN":
            chosen = self._round_robin(candidates)
        elif policy == "LEAST_REQUEST":
            chosen = self._least_request(candidates)
        elif policy == "CONSISTENT_HASH" and hash_key is not None:
            chosen = max(candidates, key=lambda state: _rendezvous(hash_key, state.endpoint))
        else:  # RANDOM, or a consistent hash without a key
            chosen = self._rng.choice(candidates)
        return chosen.endpoint

    def _round_robin(self, candidates: list[_EndpointState]) -> _EndpointState:
        order = list(self._states.values())
        allowed = {id(state) for state in candidates}
        for step in range(len(order)):
            position = (self._next + step) % len(order)
            if id(order[position]) in allowed:
                self._next = position + 1
                return order[position]
        raise AssertionError("a candidate is always one of the cluster's endpoints")

    def _least_request(self, candidates: list[_EndpointState]) -> _EndpointState:
        if len(candidates) == 1:
            return candidates[0]
        first, second = self._rng.sample(candidates, 2)
        return second if second.in_flight < first.in_flight else first

    # -- attempts and outlier detection ----------------------------------------------------

    def begin(self, endpoint: Endpoint) -> None:
        """A request (attempt) goes to ``endpoint``."""
        state = self._states.get(endpoint.address)
        if state is not None:
            state.in_flight += 1

    def end(self, endpoint: Endpoint, status: int | None) -> None:
        """The attempt to ``endpoint`` ended: its response status, or None when the
        connection failed or was reset before a response (a gateway error)."""
        state = self._states.get(endpoint.address)
        if state is None:  # no longer in the cluster
            return
        state.in_flight = max(0, state.in_flight - 1)
        if status is not None and status < 500:
            state.consecutive_5xx = state.consecutive_gateway = 0
            return
        state.consecutive_5xx += 1
        if status is None or status in GATEWAY_ERRORS:
            state.consecutive_gateway += 1
        else:
            state.consecutive_gateway = 0
        settings = self.cluster.outlier_detection
        if settings is None:
            return
        self._refresh()
        if state.ejected_until is not None:
            return  # an attempt begun before its ejection
        if _reached(state.consecutive_gateway, settings.consecutive_gateway_errors):
            self._eject(state, settings, gateway=True)
        elif _reached(state.consecutive_5xx, settings.consecutive_5xx_errors):
            self._eject(state, settings, gateway=False)

    def _eject(self, state: _EndpointState, settings: OutlierDetection, *, gateway: bool) -> None:
        ejected = sum(1 for other in self._states.values() if other.ejected_until is not None)
        # Envoy's rule: within max_ejection_percent, and one endpoint always may be.
        within = (ejected + 1) * 100 <= settings.max_ejection_percent * len(self._states)
        if not within and ejected > 0:
            self._counters.ejections_overflow += 1
            return
        now = self._clock()
        state.times_ejected += 1
        base = settings.base_ejection_time
        duration = min(base * state.times_ejected, max(base, MAX_EJECTION_TIME))
        state.ejected_until = now + duration.total_seconds()
        state.consecutive_5xx = state.consecutive_gateway = 0
        if gateway:
            self._counters.ejections_gateway += 1
        else:
            self._counters.ejections_5xx += 1

    def _refresh(self) -> None:
        """Return the endpoints whose ejection is over; let those back in service long
        enough forget an ejection per ``interval``."""
        settings = self.cluster.outlier_detection
        now = self._clock()
        for state in self._states.values():
            if state.ejected_until is not None:
                if state.ejected_until > now:
                    continue
                state.back_since = state.ejected_until
                state.ejected_until = None
            if state.times_ejected and settings is not None:
                interval = settings.interval.total_seconds()
                if interval <= 0:
                    state.times_ejected = 0
                    continue
                intervals = min(int((now - state.back_since) // interval), state.times_ejected)
                if intervals > 0:
                    state.times_ejected -= intervals
                    state.back_since += intervals * interval

    def ejected(self) -> tuple[tuple[Endpoint, float], ...]:
        """The endpoints ejected now, each with the clock's time it returns at."""
        self._refresh()
        return tuple(
            (state.endpoint, state.ejected_until)
            for state in self._states.values()
            if state.ejected_until is not None
        )

    # -- retries -----------------------------------------------------------------------------

    def may_retry(self) -> bool:
        """Whether the retry budget (or the fixed ``maxRetries``) allows one more retry now."""
        if self._retries < self.retry_limit():
            return True
        self._counters.retry_overflows += 1
        return False

    def retry_limit(self) -> int:
        """The retries that may be in flight now."""
        fixed = self.cluster.connection_pool.max_retries
        if fixed is not None:
            return fixed
        budget = int(self._active * defaults.RETRY_BUDGET_PERCENT / 100)
        return max(defaults.RETRY_BUDGET_MIN_RETRIES, budget)

    def retry_started(self) -> None:
        self._retries += 1

    def retry_finished(self) -> None:
        self._retries = max(0, self._retries - 1)

    # -- what it counted -----------------------------------------------------------------------

    def stats(self) -> ClusterStats:
        counters = self._counters
        return ClusterStats(
            requests_in_flight=self._active,
            retries_in_flight=self._retries,
            endpoints=len(self._states),
            ejected=len(self.ejected()),
            ejections_total=counters.ejections_5xx + counters.ejections_gateway,
            ejections_5xx_total=counters.ejections_5xx,
            ejections_gateway_total=counters.ejections_gateway,
            ejections_overflow_total=counters.ejections_overflow,
            overflows_total=counters.overflows,
            retry_overflows_total=counters.retry_overflows,
        )


def _reached(count: int, threshold: int | None) -> bool:
    return threshold is not None and count >= threshold


def _rendezvous(key: str, endpoint: Endpoint) -> int:
    digest = hashlib.blake2b(
        f"{key}\0{endpoint.address}".encode(), digest_size=8, usedforsecurity=False
    ).digest()
    return int.from_bytes(digest, "big")


class Balancers:
    """The :class:`ClusterState` of every cluster of the current view."""

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self._clock = clock
        self._rng = rng if rng is not None else random.Random()
        self._states: dict[str, ClusterState] = {}

    def update(self, view: View) -> None:
        """Take a new view: clusters and endpoints kept keep their state."""
        states: dict[str, ClusterState] = {}
        for cluster in view.clusters:
            endpoints = view.cluster_endpoints(cluster.name)
            state = self._states.get(cluster.name)
            if state is None:
                state = ClusterState(cluster, endpoints, clock=self._clock, rng=self._rng)
            else:
                state.update(cluster, endpoints)
            states[cluster.name] = state
        self._states = states

    def get(self, cluster: str) -> ClusterState | None:
        return self._states.get(cluster)

    def stats(self) -> Mapping[str, ClusterStats]:
        """Per cluster name, what it counted (for ``/metrics``)."""
        return {name: state.stats() for name, state in sorted(self._states.items())}
