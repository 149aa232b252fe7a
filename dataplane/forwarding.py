"""Carrying out a route of the compiled view: what the built-in proxy does with a request.

A listener (the sidecar's ``--outbound``, later a gateway's) reads a request head, finds
the route (:meth:`mesh.view.OutboundService.route_for`) and hands both over::

    forwarder = Forwarder(Upstreams(source), balancers, telemetry)
    exchange = forwarder.begin("outbound", client, head, source_ip="127.0.0.1")
    keep_alive = await forwarder.forward(exchange, route, request)     # HttpRequest of head
    keep_alive = await forwarder.respond(exchange, 404, "no Service ...", flags="NR")

:meth:`Forwarder.forward` does what Envoy does with the same route
(:mod:`mesh.envoy.routes`):

- the action: a :class:`~mesh.view.Redirect` or :class:`~mesh.view.DirectResponse` is
  answered here; a :class:`~mesh.view.Forward` picks one destination at random by weight;
- ``fault``: a delay, then an abort (answered with its status), each on its percentage;
- ``rewrite`` (the matched prefix or the whole path; the ``Host``), the request headers
  of the destination then of the route (set, add, remove), ``traceparent`` from
  :mod:`dataplane.telemetry`; hop-by-hop fields are not passed on;
- the cluster's circuit breaker (:meth:`~dataplane.balancing.ClusterState.admit`: 503
  with its reason, flag ``UO``), its balancer's pick (none: 503 ``no healthy upstream``,
  ``UH``), hashing on ``loadBalancer.consistentHash``'s header or the source IP;
- ``timeout``: the whole request, retries included: 504 ``upstream request timeout``
  (``UT``); none: as Istio, no limit but Envoy's stream idle timeout
  (:data:`STREAM_IDLE_TIMEOUT`) on the response head;
- ``retries``: up to ``attempts`` more tries, each to an endpoint not tried yet when
  there is one, on the conditions of ``retryOn`` as Envoy reads them
  (:func:`retry_wanted`), within the cluster's retry budget, with Envoy's backoff (25 ms
  base, jittered, doubling, at most 250 ms); ``perTryTimeout`` bounds each try. Only what
  is safe to send again is (:func:`may_repeat`): after a connect failure (nothing reached
  the upstream) any request; after a response or a reset, an idempotent method whose body
  (if any) was read whole first — at most :data:`MAX_BUFFERED_BODY` with a
  ``Content-Length``; a larger or chunked body is streamed and sent once;
- the response headers of the destination then of the route, on the upstream's answer
  and on the proxy's own.

A connection the pool kept that the upstream closed while idle is replaced, for a request
without a body, without counting as a failure. Every request ends in one
:class:`~dataplane.telemetry.RequestRecord`. ``mirror`` is not done yet (the request goes
to its route's destination only).

The proxy's own answers are short text bodies: Envoy's words where Envoy answers the same
(``upstream request timeout``, ``no healthy upstream``, ``upstream connect error or
disconnect/reset before headers. ...``), else a sentence saying what happened.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import random
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Final

from dataplane.balancing import Balancers, ClusterState
from dataplane.telemetry import RequestRecord, RequestTelemetry, Trace
from dataplane.upstream import STREAM_IDLE_TIMEOUT, ConnectFailed, UpstreamConnection, Upstreams
from mesh.request import HttpRequest, split_host
from mesh.view import (
    Cluster,
    DirectResponse,
    Endpoint,
    Forward,
    HeaderOperations,
    HeaderRewrite,
    Redirect,
    RetryPolicy,
    Route,
    WeightedDestination,
)
from sdk.address import HostPort
from sdk.sidecar.errors import HttpError
from sdk.sidecar.http import (
    BodyKind,
    RequestHead,
    ResponseHead,
    copy_body,
    read_response_head,
)
from sdk.sidecar.streams import Stream

__all__ = [
    "IDEMPOTENT_METHODS",
    "MAX_BUFFERED_BODY",
    "STREAM_IDLE_TIMEOUT",
    "Exchange",
    "Failure",
    "Forwarder",
    "choose_destination",
    "may_repeat",
    "retry_backoff",
    "retry_wanted",
]

_log = logging.getLogger("tessera.sidecar")

MAX_BUFFERED_BODY: Final = 64 * 1024
"""A request body up to this size (with a Content-Length) is read whole before it is sent,
so that it can be sent again; a larger one is streamed, and never retried."""
CLIENT_BODY_TIMEOUT: Final = 60.0
"""How long the app may take to send a body the proxy buffers."""
IDEMPOTENT_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
RETRY_BASE_INTERVAL: Final = 0.025
RETRY_MAX_INTERVAL: Final = 0.25
_HOP_BY_HOP: Final = frozenset({
    "connection", "keep-alive", "proxy-connection", "te", "upgrade", "trailer", "expect",
    "traceparent", "host",
})  # fmt: skip
"""Request fields not passed on as they came (``host`` and ``traceparent`` are set anew)."""
_HOP_BY_HOP_AND_BODY: Final = _HOP_BY_HOP | {"content-length", "transfer-encoding"}
"""The same, for a body the proxy buffered (sent with a Content-Length of its own)."""
_RESPONSE_HOP_BY_HOP: Final = frozenset({"connection", "keep-alive", "proxy-connection"})
_GRPC_STATUS: Final = {"cancelled": "1", "deadline-exceeded": "4", "resource-exhausted": "8",
                       "unavailable": "14", "internal": "13"}  # fmt: skip
_CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"

UPSTREAM_TIMEOUT: Final = "upstream request timeout"
NO_HEALTHY_UPSTREAM: Final = "no healthy upstream"
_RESET: Final = "upstream connect error or disconnect/reset before headers. reset reason: "


class Failure(enum.Enum):
    """How a try ended without a response head."""

    CONNECT = "connection failure"
    """No connection: nothing reached the upstream."""
    RESET = "connection termination"
    """The connection ended (or the response was not HTTP) before a response head."""
    TIMEOUT = "per-try timeout"


# -- decisions (no sockets) ---------------------------------------------------------------


def choose_destination(
    destinations: Sequence[WeightedDestination], rng: random.Random
) -> WeightedDestination | None:
    """One destination at random by weight (as Envoy's weighted clusters); None if every
    weight is 0."""
    if len(destinations) == 1:
        return destinations[0] if destinations[0].weight > 0 else None
    total = sum(item.weight for item in destinations)
    if total <= 0:
        return None
    point = rng.random() * total
    for item in destinations:
        point -= item.weight
        if point < 0 and item.weight > 0:
            return item
    return next(item for item in reversed(destinations) if item.weight > 0)


def retry_wanted(
    policy: RetryPolicy,
    *,
    status: int | None = None,
    grpc_status: Callable[[str], list[str]] = lambda name: [],
    failure: Failure | None = None,
) -> bool:
    """Whether ``retryOn`` asks for another try after a response with ``status`` (and
    its field values by name, ``grpc_status``, for the gRPC conditions) or after
    ``failure``, as Envoy reads it:

    - ``5xx``: a 5xx, a connect failure, a reset or a per-try timeout;
    - ``gateway-error``: 502, 503, 504, a connect failure, a reset or a per-try timeout;
    - ``reset``: a reset, a connect failure or a per-try timeout;
    - ``connect-failure``: a connect failure (a connect timeout included);
    - ``retriable-status-codes``: a status in ``retriable_status_codes``;
    - ``retriable-4xx``: 409;
    - ``cancelled``, ``deadline-exceeded``, ``internal``, ``resource-exhausted``,
      ``unavailable``: the gRPC status of that name in the response's ``grpc-status``;
    - ``refused-stream`` is HTTP/2's: no HTTP/1.1 answer meets it.
    """
    on = policy.retry_on
    if failure is not None:
        if "5xx" in on or "gateway-error" in on or "reset" in on:
            return True
        return failure is Failure.CONNECT and "connect-failure" in on
    assert status is not None
    if status >= 500 and "5xx" in on:
        return True
    if status in (502, 503, 504) and "gateway-error" in on:
        return True
    if "retriable-status-codes" in on and status in policy.retriable_status_codes:
        return True
    if status == 409 and "retriable-4xx" in on:
        return True
    grpc = [name for name in _GRPC_STATUS if name in on]
    if grpc:
        found = grpc_status("grpc-status")
        return bool(found) and any(_GRPC_STATUS[name] == found[0].strip() for name in grpc)
    return False


def may_repeat(method: str, *, buffered: bool, failure: Failure | None) -> bool:
    """Whether a request may be sent again: after a connect failure, always (nothing of it
    left the proxy, and a streamed body was not read yet); else only an idempotent method
    whose body (if any) the proxy holds whole (``buffered``)."""
    if failure is Failure.CONNECT:
        return True
    return buffered and method in IDEMPOTENT_METHODS


def retry_backoff(retry: int, rng: random.Random) -> float:
    """Seconds to wait before the ``retry``-th retry (1 for the first): Envoy's fully
    jittered exponential backoff, 25 ms base, at most 250 ms."""
    ceiling = min(RETRY_BASE_INTERVAL * (1 << (retry - 1)), RETRY_MAX_INTERVAL)
    return rng.random() * ceiling


def _percent(percentage: float, rng: random.Random) -> bool:
    return percentage >= 100 or (percentage > 0 and rng.random() * 100 < percentage)


# -- heads ----------------------------------------------------------------------------------


def _rewrite_fields(fields: list[tuple[str, str]], rewrite: HeaderRewrite) -> None:
    """Envoy's order: remove, then set (replacing), then add (appending)."""
    if rewrite.remove or rewrite.set:
        gone = {name.lower() for name in rewrite.remove} | {name.lower() for name in rewrite.set}
        fields[:] = [item for item in fields if item[0].lower() not in gone]
        fields.extend(rewrite.set.items())
    if rewrite.add:
        fields.extend(rewrite.add.items())


def _request_head(
    head: RequestHead,
    path: str,
    authority: str,
    operations: Sequence[HeaderOperations],
    traceparent: str,
    body_length: int | None,
) -> bytes:
    """The head as the upstream gets it; ``body_length``: the buffered body's (its
    Content-Length, the framing fields dropped), None to pass the framing on."""
    dropped = _HOP_BY_HOP if body_length is None else _HOP_BY_HOP_AND_BODY
    if not operations:  # the usual case: straight to the text, in the same order
        text = (f"{head.method} {path} HTTP/1.1\r\nhost: {authority}\r\n"
                f"traceparent: {traceparent}\r\n")  # fmt: skip
        text += "".join([f"{name}: {value}\r\n" for name, value in head.headers
                         if name.lower() not in dropped])  # fmt: skip
        if body_length is None:
            if head.expects_continue:
                text += "expect: 100-continue\r\n"
        elif head.body.kind is not BodyKind.NONE:
            text += f"content-length: {body_length}\r\n"
        return (text + "\r\n").encode("latin-1")
    fields = [("traceparent", traceparent)]
    fields += [item for item in head.headers if item[0].lower() not in dropped]
    if body_length is None:
        if head.expects_continue:
            fields.append(("expect", "100-continue"))
    elif head.body.kind is not BodyKind.NONE:
        fields.append(("content-length", str(body_length)))
    for operation in operations:
        _rewrite_fields(fields, operation.request)
    lines = [f"{head.method} {path} HTTP/1.1", f"host: {authority}"]
    lines += [f"{name}: {value}" for name, value in fields if name.lower() != "host"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _response_head(
    response: ResponseHead, operations: Sequence[HeaderOperations], keep_alive: bool
) -> bytes:
    if not operations:  # the head as the upstream sent it, but for the hop-by-hop fields
        data = response.without(_RESPONSE_HOP_BY_HOP)
        return data if keep_alive else data[:-2] + b"connection: close\r\n\r\n"
    status_line = response.raw.partition(b"\r\n")[0].decode("latin-1")
    fields = [item for item in response.headers if item[0].lower() not in _RESPONSE_HOP_BY_HOP]
    for operation in operations:
        _rewrite_fields(fields, operation.response)
    if not keep_alive:
        fields.append(("connection", "close"))
    lines = [status_line, *(f"{name}: {value}" for name, value in fields)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _local_response(
    status: int,
    text: str,
    operations: Sequence[HeaderOperations],
    keep_alive: bool,
    extra: Sequence[tuple[str, str]] = (),
) -> bytes:
    body = text.encode()
    fields: list[tuple[str, str]] = [*extra]
    if body:
        fields.append(("content-type", "text/plain; charset=utf-8"))
    fields.append(("content-length", str(len(body))))
    for operation in operations:
        _rewrite_fields(fields, operation.response)
    if not keep_alive:
        fields.append(("connection", "close"))
    try:
        reason = HTTPStatus(status).phrase
    except ValueError:
        reason = "Unknown"
    lines = [f"HTTP/1.1 {status} {reason}", *(f"{name}: {value}" for name, value in fields)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def _redirect_location(action: Redirect, request: HttpRequest, authority: str) -> str:
    """Envoy's redirect: each part given replaces the request's (the query is kept unless
    the new path has one)."""
    scheme = action.scheme or "http"
    host, port = split_host(action.authority or authority)
    if action.port is not None:
        port = action.port
    if action.authority is None and port is None and action.port is None:
        netloc = authority
    else:
        netloc = host if port is None or (scheme, port) in (("http", 80), ("https", 443)) else (
            f"{host}:{port}")  # fmt: skip
    path = request.path
    if action.uri is not None:
        query = request.path.partition("?")[2]
        path = action.uri if "?" in action.uri or not query else f"{action.uri}?{query}"
    return f"{scheme}://{netloc}{path}"


# -- one request ----------------------------------------------------------------------------


@dataclass
class Exchange:
    """One request a listener read, and what became of it (the access log's fields)."""

    listener: str
    client: Stream
    head: RequestHead
    source_ip: str | None
    trace: Trace
    start_time: float
    started: float
    authority: str
    destination_service: str | None = None
    route: str | None = None
    cluster: str | None = None
    upstream_host: str | None = None
    upstream_peer: str | None = None
    flags: str = "-"
    details: str = ""
    response_started: bool = False
    attempts: int = 0
    bytes_received: int = 0
    bytes_sent: int = 0

    def flag(self, flag: str) -> None:
        self.flags = flag if self.flags == "-" else f"{self.flags},{flag}"


class _Done(Exception):
    """The request is answered (or the client gone); ``keep_alive`` for the connection."""

    def __init__(self, keep_alive: bool) -> None:
        self.keep_alive = keep_alive


@dataclass
class _Try:
    """The outcome of the last try: a response head and its connection, or a failure."""

    cluster: Cluster
    endpoint: Endpoint
    connection: UpstreamConnection | None = None
    response: ResponseHead | None = None
    failure: Failure | None = None
    reason: str = ""
    body_task: asyncio.Task[None] | None = None


class Forwarder:
    """Carries out routes for one proxy; shared by its listeners."""

    def __init__(
        self,
        upstreams: Upstreams,
        balancers: Balancers,
        telemetry: RequestTelemetry,
        *,
        source: str | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.upstreams = upstreams
        self.balancers = balancers
        self.telemetry = telemetry
        self.source = source
        """The SPIFFE ID the proxy calls with: the ``source`` of its records."""
        self._rng = rng or random.Random()

    def begin(
        self, listener: str, client: Stream, head: RequestHead, *, source_ip: str | None
    ) -> Exchange:
        """A request just read: its trace started, its clock running."""
        traceparent: str | None = None
        authority: str | None = None
        for name, value in head.headers:  # one pass, the first of each
            if len(name) == 4:
                if authority is None and name.lower() == "host":
                    authority = value
            elif len(name) == 11 and traceparent is None and name.lower() == "traceparent":
                traceparent = value
        return Exchange(
            listener, client, head, source_ip, self.telemetry.start(traceparent),
            time.time(), time.monotonic(), authority or "",
        )  # fmt: skip

    async def respond(
        self,
        exchange: Exchange,
        status: int,
        text: str,
        *,
        flags: str = "-",
        details: str = "",
        operations: Sequence[HeaderOperations] = (),
        extra: Sequence[tuple[str, str]] = (),
    ) -> bool:
        """Answer the request here (its body, if small, read away); whether the client
        connection may go on."""
        if flags != "-":
            exchange.flag(flags)
        exchange.details = exchange.details or details
        exchange.response_started = True
        keep_alive = exchange.head.keep_alive and await self._skip_body(exchange)
        data = _local_response(status, text, operations, keep_alive, extra)
        exchange.bytes_sent += len(data)
        try:
            exchange.client.write(data)
            await exchange.client.drain()
        except OSError:
            keep_alive = False
        self._finish(exchange, status)
        return keep_alive

    async def forward(
        self, exchange: Exchange, route: Route, request: HttpRequest | None = None
    ) -> bool:
        """Carry out ``route`` for the request (``request``: its head as the routes read
        it, None to have it made only if the route needs it: a redirect, a rewrite);
        whether the client connection may go on."""
        exchange.route = str(route.source)
        operations = (route.headers,) if route.headers is not None else ()
        action = route.action
        if isinstance(action, DirectResponse):
            return await self.respond(exchange, action.status, action.reason + "\n",
                                      flags="NR" if action.status == 404 else "-",
                                      details="direct_response",
                                      operations=operations)  # fmt: skip
        if isinstance(action, Redirect):
            request = request or _http_request(exchange.head)
            location = _redirect_location(action, request, exchange.authority)
            return await self.respond(exchange, action.code, "", details="redirect",
                                      operations=operations,
                                      extra=(("location", location),))  # fmt: skip
        assert isinstance(action, Forward)
        fault = route.fault
        if fault is not None:
            if fault.delay is not None and _percent(fault.delay.percentage, self._rng):
                exchange.flag("DI")
                await asyncio.sleep(fault.delay.fixed_delay.total_seconds())
            if fault.abort is not None and _percent(fault.abort.percentage, self._rng):
                return await self.respond(exchange, fault.abort.http_status,
                                          "fault filter abort", flags="FI",
                                          details="fault_filter_abort",
                                          operations=operations)  # fmt: skip
        destination = choose_destination(action.destinations, self._rng)
        if destination is None:
            return await self.respond(exchange, 503, "no destination of the route has a "
                                      "weight\n", flags="NR", operations=operations)  # fmt: skip
        exchange.destination_service = destination.service
        exchange.cluster = destination.cluster
        if destination.headers is not None:
            operations = (destination.headers, *operations)
        state = self.balancers.get(destination.cluster)
        if state is None:
            return await self.respond(
                exchange, 503, f"no cluster {destination.cluster} in the mesh's view\n",
                flags="NC", details="cluster_not_found", operations=operations,
            )  # fmt: skip
        if route.rewrite is not None:
            request = request or _http_request(exchange.head)
            upstream = route.rewrite_request(request, route.match(request))
            path, authority = upstream.path, upstream.header("host") or exchange.authority
        else:  # the request's own (what HttpRequest.path and its Host would say)
            path, authority = exchange.head.target, exchange.authority
        timeout = route.timeout.duration if route.timeout is not None else None
        try:
            if not timeout:  # no timer to arm and cancel for each request
                return await self._send(exchange, state, route, operations, path, authority)
            async with asyncio.timeout(timeout.total_seconds()):
                return await self._send(exchange, state, route, operations, path, authority)
        except TimeoutError:  # the route's (each try's own is handled in _try)
            exchange.flag("UT")
            return await self._timed_out(exchange, operations)
        except _Done as done:
            return done.keep_alive

    async def _timed_out(self, exchange: Exchange, operations: Sequence[HeaderOperations]) -> bool:
        if exchange.response_started:  # the response had begun: cut it
            self._finish(exchange, 504)
            return False
        return await self.respond(exchange, 504, UPSTREAM_TIMEOUT, details="upstream_response_"
                                  "timeout", operations=operations)  # fmt: skip

    # -- sending --------------------------------------------------------------------------

    async def _send(
        self,
        exchange: Exchange,
        state: ClusterState,
        route: Route,
        operations: Sequence[HeaderOperations],
        path: str,
        authority: str,
    ) -> bool:
        cluster = state.cluster
        admission = state.admit()
        if isinstance(admission, str):
            return await self.respond(exchange, 503, admission + "\n", flags="UO",
                                      details="upstream_overflow",
                                      operations=operations)  # fmt: skip
        try:
            return await self._tries(exchange, state, cluster, route, operations, path,
                                     authority)  # fmt: skip
        finally:
            admission.release()

    async def _tries(
        self,
        exchange: Exchange,
        state: ClusterState,
        cluster: Cluster,
        route: Route,
        operations: Sequence[HeaderOperations],
        path: str,
        authority: str,
    ) -> bool:
        head = exchange.head
        body: bytes | None = None
        if head.body.kind is BodyKind.NONE:
            body = b""
        elif head.body.kind is BodyKind.LENGTH and head.body.length <= MAX_BUFFERED_BODY:
            body = await self._read_body(exchange)
        request = _request_head(head, path, authority, operations, exchange.trace.traceparent,
                                None if body is None else len(body))  # fmt: skip
        policy = route.retries
        retries_left = policy.attempts if policy is not None else 0
        per_try = policy.per_try_timeout.total_seconds() if (
            policy is not None and policy.per_try_timeout is not None) else None  # fmt: skip
        hash_key = _hash_key(cluster, head, exchange.source_ip)
        tried: list[HostPort] = []
        retry = 0
        while True:
            endpoint = state.pick(hash_key=hash_key, tried=tried)
            if endpoint is None:
                return await self.respond(exchange, 503, NO_HEALTHY_UPSTREAM, flags="UH",
                                          details="no_healthy_upstream",
                                          operations=operations)  # fmt: skip
            exchange.attempts += 1
            exchange.upstream_host = str(endpoint.address)
            state.begin(endpoint)
            if retry:
                state.retry_started()
            try:
                attempt = await self._try(exchange, cluster, endpoint, request, body, per_try)
            except _Done:  # the app's body failed: not the upstream's doing
                state.end(endpoint, 400)
                raise
            except BaseException:  # the route's timeout
                state.end(endpoint, None)
                raise
            finally:
                if retry:
                    state.retry_finished()
            response = attempt.response
            if policy is None:
                wanted = False
            elif response is None:
                wanted = retry_wanted(policy, failure=attempt.failure)
            else:
                wanted = retry_wanted(policy, status=response.status,
                                      grpc_status=response.values)  # fmt: skip
            if not wanted:
                break
            if not (retries_left > 0
                    and may_repeat(head.method, buffered=body is not None, failure=attempt.failure)
                    and state.may_retry()):  # fmt: skip
                if retries_left == 0 and exchange.attempts > 1:
                    exchange.flag("URX")
                break
            retries_left -= 1
            retry += 1
            state.end(endpoint, response.status if response is not None else None)
            await self._abandon(attempt)
            tried.append(endpoint.address)
            await asyncio.sleep(retry_backoff(retry, self._rng))
        if attempt.failure is not None:
            state.end(endpoint, None)
            return await self._failed(exchange, attempt, operations)
        return await self._relay(exchange, state, cluster, attempt, operations)

    async def _read_body(self, exchange: Exchange) -> bytes:
        head = exchange.head
        client = exchange.client
        try:
            if head.expects_continue:
                client.write(_CONTINUE)
            body = await asyncio.wait_for(client.readexactly(head.body.length),
                                          CLIENT_BODY_TIMEOUT)  # fmt: skip
        except (asyncio.IncompleteReadError, OSError, TimeoutError) as err:
            exchange.flag("DC")
            self._finish(exchange, 400)
            raise _Done(keep_alive=False) from err
        exchange.bytes_received += len(body)
        return body

    async def _try(
        self,
        exchange: Exchange,
        cluster: Cluster,
        endpoint: Endpoint,
        request: bytes,
        body: bytes | None,
        per_try: float | None,
    ) -> _Try:
        attempt = _Try(cluster, endpoint)
        try:
            if per_try is None:  # no timer to arm and cancel for each request
                response = await self._connect_and_send(exchange, attempt, request, body)
            else:
                async with asyncio.timeout(per_try):
                    response = await self._connect_and_send(exchange, attempt, request, body)
        except ConnectFailed as err:
            attempt.failure, attempt.reason = Failure.CONNECT, err.reason
            return attempt
        except TimeoutError:
            if attempt.connection is None:
                attempt.failure, attempt.reason = Failure.CONNECT, "connect timeout"
            else:
                attempt.failure, attempt.reason = Failure.TIMEOUT, "per-try timeout"
                self._discard(attempt)
            return attempt
        except BaseException:
            self._discard(attempt)
            raise
        connection = attempt.connection
        assert connection is not None
        exchange.upstream_peer = connection.peer
        if response is None:
            attempt.failure = Failure.RESET
            attempt.reason = attempt.reason or "the upstream closed the connection"
            self._discard(attempt)
        attempt.response = response
        return attempt

    async def _connect_and_send(
        self, exchange: Exchange, attempt: _Try, request: bytes, body: bytes | None
    ) -> ResponseHead | None:
        cluster, endpoint = attempt.cluster, attempt.endpoint
        connection = self.upstreams.idle(cluster, endpoint)
        if connection is None:
            connection = await self.upstreams.connect(cluster, endpoint)
        attempt.connection = connection
        response = await self._exchange(exchange, attempt, connection, request, body)
        if response is None and connection.reused and body == b"":
            # The upstream closed the kept-alive connection while it was idle.
            self.upstreams.discard(connection)
            connection = await self.upstreams.connect(cluster, endpoint)
            attempt.connection = connection
            response = await self._exchange(exchange, attempt, connection, request, body)
        return response

    async def _exchange(
        self,
        exchange: Exchange,
        attempt: _Try,
        connection: UpstreamConnection,
        request: bytes,
        body: bytes | None,
    ) -> ResponseHead | None:
        """Send the request on ``connection``; the response head, or None (reason in
        ``attempt``) if the connection ended first."""
        stream = connection.stream
        head = exchange.head
        try:
            stream.write(request + body if body else request)
        except OSError as err:
            attempt.reason = str(err)
            return None
        if body is None:
            attempt.body_task = asyncio.create_task(
                copy_body(exchange.client, stream, head.body)
            )
        reading = self._response_head(exchange, connection, streamed=body is None)
        try:
            if attempt.body_task is None:
                return await reading
            return await self._with_body(exchange, attempt, reading)
        except HttpError as err:
            attempt.reason = err.message
            return None
        except (OSError, asyncio.IncompleteReadError) as err:
            attempt.reason = str(err) or type(err).__name__
            return None

    async def _response_head(
        self, exchange: Exchange, connection: UpstreamConnection, *, streamed: bool
    ) -> ResponseHead:
        stream, waiting = connection.stream, connection.waiting
        while True:
            response = await waiting.wait(read_response_head(stream, exchange.head.method))
            if response.status == 101:
                raise HttpError(502, "the upstream switched protocols, which the outbound "
                                "listener does not carry")  # fmt: skip
            if response.status >= 200:
                return response
            if streamed and response.status == 100:  # the app asked for it
                exchange.client.write(response.raw)

    async def _with_body(
        self, exchange: Exchange, attempt: _Try, reading: Coroutine[Any, Any, ResponseHead]
    ) -> ResponseHead:
        """Read the response head while the body streams up; a body the app sends
        malformed, or not at all, ends the request."""
        assert attempt.body_task is not None
        head_task = asyncio.ensure_future(reading)
        body_task = attempt.body_task
        try:
            await asyncio.wait({head_task, body_task}, return_when=asyncio.FIRST_COMPLETED)
            if body_task.done() and body_task.exception() is not None:
                error = body_task.exception()
                head_task.cancel()
                self._discard(attempt)
                if isinstance(error, HttpError):
                    await self.respond(exchange, error.status, error.message + "\n")
                    raise _Done(keep_alive=False)
                exchange.flag("DC")
                self._finish(exchange, 400)
                raise _Done(keep_alive=False)
            response: ResponseHead = await head_task
            return response
        except BaseException:
            head_task.cancel()
            raise

    async def _abandon(self, attempt: _Try) -> None:
        """A try that is not the answer: its connection kept if its response is short."""
        connection, response = attempt.connection, attempt.response
        if connection is None or response is None:
            return
        reusable = response.keep_alive
        if response.body.kind is BodyKind.LENGTH and response.body.length <= MAX_BUFFERED_BODY:
            try:
                await asyncio.wait_for(connection.stream.readexactly(response.body.length),
                                       STREAM_IDLE_TIMEOUT)  # fmt: skip
            except (asyncio.IncompleteReadError, OSError, TimeoutError):
                reusable = False
        elif response.body.kind is not BodyKind.NONE:
            reusable = False
        self._release(attempt, reusable=reusable)

    def _release(self, attempt: _Try, *, reusable: bool) -> None:
        connection = attempt.connection
        if connection is None:
            return
        body_task = attempt.body_task
        if body_task is not None and not (body_task.done() and not body_task.cancelled()
                                          and body_task.exception() is None):  # fmt: skip
            body_task.cancel()
            reusable = False
        attempt.connection = None
        self.upstreams.release(connection, attempt.cluster, reusable=reusable)

    def _discard(self, attempt: _Try) -> None:
        if attempt.body_task is not None:
            attempt.body_task.cancel()
        if attempt.connection is not None:
            self.upstreams.discard(attempt.connection)
            attempt.connection = None

    async def _failed(
        self, exchange: Exchange, attempt: _Try, operations: Sequence[HeaderOperations]
    ) -> bool:
        self._discard(attempt)
        if attempt.failure is Failure.TIMEOUT:
            exchange.flag("UT")
            return await self.respond(exchange, 504, UPSTREAM_TIMEOUT,
                                      details="upstream_per_try_timeout",
                                      operations=operations)  # fmt: skip
        flag = "UF" if attempt.failure is Failure.CONNECT else "UC"
        assert attempt.failure is not None
        _log.info("%s: %s %s to %s: %s", exchange.listener, exchange.head.method,
                  exchange.head.target, exchange.upstream_host, attempt.reason)  # fmt: skip
        return await self.respond(
            exchange, 503, f"{_RESET}{attempt.failure.value}, transport failure reason: "
            f"{attempt.reason}", flags=flag, details=f"upstream_reset_before_response_started"
            f"{{{attempt.failure.value}}}", operations=operations,
        )  # fmt: skip

    async def _relay(
        self,
        exchange: Exchange,
        state: ClusterState,
        cluster: Cluster,
        attempt: _Try,
        operations: Sequence[HeaderOperations],
    ) -> bool:
        response = attempt.response
        connection = attempt.connection
        assert response is not None and connection is not None
        head = exchange.head
        keep_alive = head.keep_alive and response.body.kind is not BodyKind.UNTIL_CLOSE
        data = _response_head(response, operations, keep_alive)
        client = exchange.client
        reusable = response.keep_alive
        status = response.status
        exchange.response_started = True
        counter = _Counter(client)
        body = response.body
        try:
            if body.kind is BodyKind.LENGTH and body.length <= MAX_BUFFERED_BODY:
                # A short body (usually there already) goes out with the head in one write.
                if body.length:
                    data += await _read_upstream_body(connection.stream, body.length)
                client.write(data)
                exchange.bytes_sent += len(data)
                await client.drain()
            else:
                client.write(data)
                exchange.bytes_sent += len(data)
                await copy_body(connection.stream, counter, body, status=502)
                exchange.bytes_sent += counter.total
        except HttpError as err:
            exchange.flag("UPE")
            exchange.details = err.message
            keep_alive = reusable = False
        except (OSError, asyncio.IncompleteReadError) as err:
            exchange.flag("DC")
            exchange.details = str(err)
            keep_alive = reusable = False
        except BaseException:
            state.end(attempt.endpoint, status)
            self.upstreams.discard(connection)
            attempt.connection = None
            if attempt.body_task is not None:
                attempt.body_task.cancel()
            exchange.bytes_sent += counter.total
            raise
        state.end(attempt.endpoint, status)
        body_task = attempt.body_task
        if body_task is not None:
            if not body_task.done():
                keep_alive = reusable = False  # answered before the whole body came
            elif body_task.cancelled() or body_task.exception() is not None:
                keep_alive = reusable = False
        attempt.connection = None
        if body_task is not None and not body_task.done():
            body_task.cancel()
        self.upstreams.release(connection, cluster, reusable=reusable)
        self._finish(exchange, status)
        return keep_alive

    def _finish(self, exchange: Exchange, status: int) -> None:
        head = exchange.head
        record = RequestRecord(
            listener=exchange.listener,
            start_time=exchange.start_time,
            duration=time.monotonic() - exchange.started,
            method=head.method,
            path=head.target,
            authority=exchange.authority or None,
            status=status,
            source=self.source,
            destination_service=exchange.destination_service,
            route=exchange.route,
            upstream_cluster=exchange.cluster,
            upstream_host=exchange.upstream_host,
            upstream_peer=exchange.upstream_peer,
            response_flags=exchange.flags,
            response_code_details=exchange.details,
            bytes_received=exchange.bytes_received,
            bytes_sent=exchange.bytes_sent,
            request_id=next((v for n, v in head.headers if n.lower() == "x-request-id"), None),
            attempts=exchange.attempts,
        )
        try:
            self.telemetry.finish(record, exchange.trace)
        except Exception:  # telemetry must never fail a request
            _log.exception("recording %s %s failed", head.method, head.target)

    async def _skip_body(self, exchange: Exchange) -> bool:
        """Read a request body the proxy answers without, if small; whether the connection
        may go on."""
        head = exchange.head
        if head.body.kind is BodyKind.NONE or exchange.bytes_received:
            return True
        if head.expects_continue or head.body.kind is not BodyKind.LENGTH:
            return False
        if head.body.length > MAX_BUFFERED_BODY:
            return False
        try:
            await asyncio.wait_for(exchange.client.readexactly(head.body.length),
                                   CLIENT_BODY_TIMEOUT)  # fmt: skip
        except (asyncio.IncompleteReadError, OSError, TimeoutError):
            return False
        exchange.bytes_received += head.body.length
        return True


async def _read_upstream_body(stream: Stream, length: int) -> bytes:
    """A response body of ``length`` bytes; HttpError(502), as :func:`copy_body` says it,
    if the upstream ends it early."""
    try:
        return await stream.readexactly(length)
    except asyncio.IncompleteReadError as err:
        raise HttpError(502, f"the body ended {length - len(err.partial)} bytes before its "
                        "Content-Length") from err  # fmt: skip


def _http_request(head: RequestHead) -> HttpRequest:
    """The request as routes read it (made only for a route that needs it)."""
    authority = next((v for n, v in head.headers if n.lower() == "host"), "")
    return HttpRequest(head.method, head.target, dict(head.headers), split_host(authority)[1])


class _Counter:
    """A writer to the client that counts the body bytes."""

    __slots__ = ("client", "total")

    def __init__(self, client: Stream) -> None:
        self.client = client
        self.total = 0

    def write(self, data: bytes) -> None:
        self.total += len(data)
        self.client.write(data)

    async def drain(self) -> None:
        await self.client.drain()


def _hash_key(cluster: Cluster, head: RequestHead, source_ip: str | None) -> str | None:
    balancer = cluster.load_balancer
    if balancer.hash_header is not None:
        wanted = balancer.hash_header.lower()
        return next((v for n, v in head.headers if n.lower() == wanted), None)
    if balancer.hash_source_ip:
        return source_ip
    return None

