"""One connection of an inbound ``protocol = "http"`` listener: judge each request, pass it on.

::

    exchange = HttpExchange(client, peer, forward=HostPort("127.0.0.1", 8080),
                            policy=lambda: policy, identity_headers=[...], decided=record,
                            listener="inbound[0]")
    await exchange.run()          # or exchange.refuse(decision): one 403, then close

For every request on the connection (keep-alive and pipelining included):

1. the head is read and checked (:mod:`sdk.sidecar.http`); a malformed one
   is answered 400/414/431/501/505 and the connection closed;
2. the policy in effect at that request (``policy()``: a reload reaches open
   connections) decides with the caller's SPIFFE ID, the method and the
   decoded path. A refusal is answered ``403`` (or the decision's ``status``,
   429 for a rate limit) with a text body naming the rule and the reason (the
   connection stays open when the refused request's body could be skipped).
   The policy is a :class:`~sdk.policy.Policy` or another :class:`Judge`
   (``tessera sidecar run`` judges by the mesh's AuthorizationPolicies and
   RateLimits);
3. an allowed request goes to the app with ``X-Forwarded-Client-Spiffe-Id``
   and ``X-Forwarded-Client-Cert`` set by the sidecar; every field the client
   sent under either name, in any case and with ``_`` for ``-``
   (:func:`reserved_identity_header`), is removed first, so the app can trust
   them;
4. the body goes on while the response comes back, so ``Expect:
   100-continue`` works; ``101 Switching Protocols`` makes the connection a
   tunnel (WebSocket).

With an ``observer`` (:class:`RequestObserver`), every request answered is reported
once, as an :class:`ExchangeRecord` (status, bytes, duration, why refused), and the
request goes to the app with the ``traceparent`` the observer gives (the caller's trace
continued, or a new one) in place of the caller's.

The app connection is opened at the first allowed request and kept while
both sides keep the connection alive. If the app closed an idle connection,
a request without a body is sent again on a new one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final, Protocol

from sdk.address import HostPort
from sdk.policy import Decision, Policy
from sdk.sidecar.deadline import Deadline
from sdk.sidecar.errors import HttpError
from sdk.sidecar.http import (
    BodyKind,
    RequestHead,
    buffered_body,
    copy_body,
    read_request_head,
    read_response_head,
    simple_response,
)
from sdk.sidecar.streams import Stream, splice
from sdk.spiffeid import SpiffeId

__all__ = [
    "CLIENT_CERT_HEADER",
    "IDENTITY_HEADERS",
    "IDLE_TIMEOUT_SECONDS",
    "SPIFFE_ID_HEADER",
    "ConnectionState",
    "ExchangeRecord",
    "HttpExchange",
    "Judge",
    "RequestObserver",
    "TraceContext",
    "reserved_identity_header",
]

_log = logging.getLogger("tessera.sidecar")

SPIFFE_ID_HEADER: Final = "X-Forwarded-Client-Spiffe-Id"
CLIENT_CERT_HEADER: Final = "X-Forwarded-Client-Cert"
IDENTITY_HEADERS: Final = frozenset({SPIFFE_ID_HEADER.lower(), CLIENT_CERT_HEADER.lower()})
"""The fields the sidecar sets; :func:`reserved_identity_header` says which a client sent."""

IDLE_TIMEOUT_SECONDS: Final = 60.0
"""How long a client connection may wait for (or take to send) its next request head."""
CONNECT_TIMEOUT_SECONDS: Final = 5.0
DISCARD_LIMIT: Final = 64 * 1024
"""A refused request's body is skipped (keeping the connection) only up to this size."""
_IDEMPOTENT_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})


def reserved_identity_header(name: str) -> bool:
    """Whether a request field is one of the identity headers, however the client spelt it.

    Names are compared without case and with ``_`` read as ``-``: WSGI and CGI
    servers (and several frameworks) turn both into ``_``, so
    ``X_Forwarded_Client_Spiffe_Id`` reaches an app as the same variable as
    ``X-Forwarded-Client-Spiffe-Id``, joined to it with a comma.
    """
    return name.lower().replace("_", "-") in IDENTITY_HEADERS


class Judge(Protocol):
    """Decides who may call through an inbound listener, as a :class:`~sdk.policy.Policy`
    does, from rules kept elsewhere (the mesh's AuthorizationPolicies, say)."""

    def decide(
        self, peer_id: SpiffeId, method: str | None = None, path: str | None = None
    ) -> Decision:
        """Allow or refuse ``peer_id``'s request (``method`` and ``path`` given), or the
        caller alone (neither given)."""
        ...

    def at_handshake(self) -> Judge:
        """What an HTTP listener asks right after the TLS handshake, before any request
        is known: it refuses only a caller that no request could be allowed for."""
        ...


@dataclass
class ExchangeRecord:
    """One request as an HTTP listener answered it, for its :class:`RequestObserver`."""

    peer_id: SpiffeId | None
    source_address: str
    start_time: float
    """Wall-clock seconds since the epoch when the request head had been read."""
    method: str
    path: str
    authority: str | None
    protocol: str
    request_id: str | None = None
    status: int = 0
    """The status answered (0: none, the connection ended first)."""
    duration: float = 0.0
    """Seconds from the request head to the last byte of the response."""
    forwarded: bool = False
    """The request went to the app (``upstream_host``)."""
    upstream_host: str | None = None
    response_flags: str = "-"
    """As Envoy's: ``UF`` the app could not be reached, ``UC`` its connection failed,
    ``DC`` the caller went away."""
    response_code_details: str = ""
    """As Envoy's: ``via_upstream``, ``rbac_access_denied_matched_policy[RULE]``..."""
    bytes_received: int = 0
    """Bytes read from the caller for this request (its head included)."""
    bytes_sent: int = 0
    """Bytes written to the caller for this request (the response head included)."""


class TraceContext(Protocol):
    @property
    def traceparent(self) -> str:
        """The ``traceparent`` the request goes to the app with."""
        ...


class RequestObserver(Protocol):
    """Told of every request an HTTP listener answers (``dataplane.telemetry`` counts, logs
    and traces them)."""

    def start(self, traceparent: str | None) -> TraceContext:
        """The request's trace, from the caller's ``traceparent`` (None: none, or several)."""
        ...

    def finish(self, exchange: ExchangeRecord, trace: TraceContext | None) -> None:
        """The request was answered (or its connection ended); called once per request."""
        ...


def _identity_or_traceparent(name: str) -> bool:
    return reserved_identity_header(name) or name.lower() == "traceparent"


@dataclass
class ConnectionState:
    """What a listener needs to know about a connection to shut down gracefully."""

    idle: bool = False
    """Waiting for the next request (may be closed at once on shutdown)."""
    stopping: bool = False
    """The listener is shutting down: finish the request in flight, then close."""


class _AppFailed(Exception):
    """The app could not be reached or did not answer properly."""

    def __init__(self, message: str, *, unreachable: bool = False) -> None:
        super().__init__(message)
        self.unreachable = unreachable
        """No connection to the app at all (answered 503, as Envoy does; else 502)."""


@dataclass
class _Outcome:
    keep_alive: bool
    upgraded: bool = False


class HttpExchange:
    def __init__(
        self,
        client: Stream,
        peer_id: SpiffeId,
        *,
        forward: HostPort,
        policy: Callable[[], Policy | Judge],
        identity_headers: Sequence[tuple[str, str]],
        decided: Callable[[Decision], None],
        listener: str,
        state: ConnectionState | None = None,
        observer: RequestObserver | None = None,
    ) -> None:
        self.client = client
        self.peer_id = peer_id
        self.forward = forward
        self.policy = policy
        self.identity_headers = identity_headers
        self.decided = decided
        self.listener = listener
        self.state = state or ConnectionState()
        self._app: Stream | None = None
        self._response_started = False
        self.observer = observer
        self._record: ExchangeRecord | None = None
        """The request in hand, while an observer is told of each."""
        self._traceparent: str | None = None
        self._read_before = 0
        self._written_before = 0
        self._idle = Deadline(IDLE_TIMEOUT_SECONDS)
        """On each request head waited for (one timer while the connection lasts)."""

    async def run(self) -> None:
        try:
            while not self.state.stopping:
                head = await self._next_request()
                if head is None:
                    return
                self._response_started = False
                outcome = await self._handle(head)
                if not outcome.keep_alive:
                    return
        finally:
            self._idle.cancel()
            if self._app is not None:
                await self._app.close()

    async def refuse(self, decision: Decision) -> None:
        """The caller itself is refused: read its first request head, answer ``403`` with the
        rule and the reason, and close (the request goes nowhere)."""
        head = None
        with contextlib.suppress(HttpError, TimeoutError, OSError, asyncio.IncompleteReadError):
            async with asyncio.timeout(IDLE_TIMEOUT_SECONDS):
                head = await read_request_head(self.client)
        message = f"{self.peer_id} refused by policy rule {decision.rule!r}: {decision.reason}"
        if self.observer is None or head is None:
            await self._answer(403, message, keep_alive=False)
            return
        trace, started = self._begin(head, self.observer)
        try:
            self._refused(decision)
            await self._answer(403, message, keep_alive=False)
        finally:
            self._end(self.observer, trace, started)

    async def _next_request(self) -> RequestHead | None:
        self._read_before = self.client.bytes_read
        self.state.idle = True
        try:
            return await self._idle.wait(read_request_head(self.client))
        except TimeoutError:
            return None
        except HttpError as err:
            await self._answer(err.status, err.message, keep_alive=False)
            return None
        finally:
            self.state.idle = False


    async def _handle(self, head: RequestHead) -> _Outcome:
        observer = self.observer
        if observer is None:
            return await self._judge_and_pass(head)
        trace, started = self._begin(head, observer)
        try:
            return await self._judge_and_pass(head)
        finally:
            self._end(observer, trace, started)

    def _begin(self, head: RequestHead, observer: RequestObserver) -> tuple[TraceContext, float]:
        """Start telling ``observer`` of the request ``head``: its trace, and when it began."""
        started = time.perf_counter()
        given = head.values("traceparent")
        trace = observer.start(given[0] if len(given) == 1 else None)
        self._traceparent = trace.traceparent
        authority = head.values("host")
        request_id = head.values("x-request-id")
        self._record = ExchangeRecord(
            peer_id=self.peer_id, source_address=self.client.peer, start_time=time.time(),
            method=head.method, path=head.path, authority=authority[0] if authority else None,
            protocol=head.version, request_id=request_id[0] if request_id else None,
            bytes_received=self.client.bytes_read - self._read_before,
        )  # fmt: skip
        self._written_before = self.client.bytes_written
        return trace, started

    def _end(self, observer: RequestObserver, trace: TraceContext, started: float) -> None:
        record, self._record, self._traceparent = self._record, None, None
        if record is None:
            return
        record.duration = time.perf_counter() - started
        record.bytes_received += self.client.bytes_read - self._read_before
        record.bytes_sent = self.client.bytes_written - self._written_before
        if not record.status:
            record.response_flags = "DC"
            record.response_code_details = (record.response_code_details
                                            or "downstream_remote_disconnect")  # fmt: skip
        try:
            observer.finish(record, trace)
        except Exception:  # a fault in telemetry must not fail the request
            _log.exception("%s: telling of a request failed", self.listener)

    def _refused(self, decision: Decision) -> None:
        if self._record is None:
            return
        if decision.status == 429:  # as Envoy's local rate limit says it
            self._record.response_flags = "RL"
            self._record.response_code_details = "local_rate_limited"
        else:
            self._record.response_code_details = (
                f"rbac_access_denied_matched_policy[{decision.rule}]"
            )

    def _app_failed(self, flags: str, details: str) -> None:
        if self._record is not None:
            self._record.response_flags = flags
            self._record.response_code_details = details

    async def _judge_and_pass(self, head: RequestHead) -> _Outcome:
        decision = self.policy().decide(self.peer_id, method=head.method, path=head.path)
        self.decided(decision)
        if not decision.allowed:
            return await self._refuse(head, decision)
        try:
            return await self._pass_on(head)
        except _AppFailed as err:
            _log.warning("%s: %s %s from %s: %s", self.listener, head.method, head.path,
                         self.peer_id, err)  # fmt: skip
            if not self._response_started and err.unreachable:
                await self._answer(503, "the app behind this sidecar cannot be reached", False)
            elif not self._response_started:
                await self._answer(502, "the app behind this sidecar did not answer", False)
            return _Outcome(keep_alive=False)

    async def _refuse(self, head: RequestHead, decision: Decision) -> _Outcome:
        self._refused(decision)
        message = f"{self.peer_id} refused by policy rule {decision.rule!r}: {decision.reason}"
        keep_alive = head.keep_alive and await self._skip_body(head)
        await self._answer(decision.status, message, keep_alive, decision.headers)
        return _Outcome(keep_alive=keep_alive)

    async def _skip_body(self, head: RequestHead) -> bool:
        """Read a refused request's body away, if it is small; True if the connection may go on."""
        if head.body.kind is BodyKind.NONE:
            return True
        if head.expects_continue or head.body.kind is not BodyKind.LENGTH:
            return False
        if head.body.length > DISCARD_LIMIT:
            return False
        try:
            await self.client.readexactly(head.body.length)
        except (asyncio.IncompleteReadError, OSError):
            return False
        return True

    async def _pass_on(self, head: RequestHead) -> _Outcome:
        if self._traceparent is None:
            request = head.serialize(remove=reserved_identity_header, add=self.identity_headers)
        else:
            request = head.serialize(remove=_identity_or_traceparent,
                                     add=[*self.identity_headers,
                                          ("traceparent", self._traceparent)])  # fmt: skip
        reusing = self._app is not None and not self._app.at_eof()
        app = self._app if reusing and self._app is not None else await self._open_app()
        try:
            return await self._exchange(head, request, app)
        except _AppFailed:
            # An app may close a kept-alive connection just as a request goes out on it;
            # an idempotent request without a body is safe to send again on a new one.
            retry = (
                reusing
                and head.method in _IDEMPOTENT_METHODS
                and head.body.kind is BodyKind.NONE
                and not self._response_started
            )
            if not retry:
                raise
        return await self._exchange(head, request, await self._open_app())

    async def _open_app(self) -> Stream:
        if self._app is not None:
            await self._app.close()
            self._app = None
        try:
            self._app = await Stream.connect(self.forward, timeout=CONNECT_TIMEOUT_SECONDS)
        except (OSError, TimeoutError) as err:
            reason = getattr(err, "strerror", None) or str(err) or type(err).__name__
            self._app_failed("UF", "upstream_reset_before_response_started{connection_failure}")
            raise _AppFailed(f"cannot reach the app at {self.forward}: {reason}",
                             unreachable=True) from err
        return self._app

    async def _exchange(self, head: RequestHead, request: bytes, app: Stream) -> _Outcome:
        if self._record is not None:
            self._record.forwarded = True
            self._record.upstream_host = str(self.forward)
            self._app_failed("-", "")
        # The common case, a request without a body (or with a small one that has all
        # arrived): one write to the app, the response relayed here, no task.
        whole = buffered_body(self.client, head.body)
        try:
            app.write(request if not whole else request + whole)
        except OSError as err:
            raise _AppFailed(f"the connection to the app failed: {err}") from err
        if whole is not None:
            outcome = await self._relay_response(head, app)
        else:
            outcome = await self._exchange_streaming(head, app)
        if outcome.upgraded:
            await splice(self.client, app)
            return _Outcome(keep_alive=False)
        if not outcome.keep_alive:
            await app.close()
            self._app = None
        return outcome

    async def _exchange_streaming(self, head: RequestHead, app: Stream) -> _Outcome:
        """The request body goes on while the response comes back (``Expect: 100-continue``;
        an app answering before the whole body)."""
        body = asyncio.create_task(
            copy_body(self.client, app, head.body, drop_trailer=reserved_identity_header)
        )
        relay = asyncio.create_task(self._relay_response(head, app))
        try:
            done, _ = await asyncio.wait({body, relay}, return_when=asyncio.FIRST_COMPLETED)
            if body in done and body.exception() is not None:
                return await self._request_body_failed(body.exception(), relay)
            outcome = await relay
        finally:
            for task in (body, relay):
                task.cancel()
            await asyncio.gather(body, relay, return_exceptions=True)
        if not body.done() or body.cancelled() or body.exception() is not None:
            outcome.keep_alive = False  # the app answered before the whole body was read
        return outcome

    async def _request_body_failed(
        self, error: BaseException | None, relay: asyncio.Task[_Outcome]
    ) -> _Outcome:
        relay.cancel()
        if isinstance(error, HttpError) and not self._response_started:
            await self._answer(error.status, error.message, keep_alive=False)
        elif not isinstance(error, HttpError | OSError | asyncio.IncompleteReadError):
            assert error is not None
            raise error
        return _Outcome(keep_alive=False)

    async def _relay_response(self, head: RequestHead, app: Stream) -> _Outcome:
        while True:
            try:
                response = await read_response_head(app, head.method)
            except HttpError as err:
                self._app_failed("UC", "upstream_reset_before_response_started{protocol_error}")
                raise _AppFailed(err.message) from err
            except OSError as err:
                self._app_failed("UC", "upstream_reset_before_response_started"
                                 "{connection_termination}")  # fmt: skip
                raise _AppFailed(f"the connection to the app failed: {err}") from err
            if response.status >= 200 or response.status == 101:
                self._answered(response.status, "via_upstream")
            if response.status >= 200 and (body := buffered_body(app, response.body)) is not None:
                # A small response that has all arrived: head and body in one write.
                self.client.write(response.raw + body if body else response.raw)
                self._response_started = True
                await self.client.drain()
                return _Outcome(keep_alive=response.keep_alive and head.keep_alive)
            self.client.write(response.raw)
            self._response_started = True
            await self.client.drain()
            if response.status == 101:
                return _Outcome(keep_alive=False, upgraded=True)
            if response.status < 200:
                continue
            try:
                await copy_body(app, self.client, response.body, status=502)
            except HttpError as err:
                self._app_failed("UC", "upstream_reset_after_response_started")
                raise _AppFailed(err.message) from err
            return _Outcome(keep_alive=response.keep_alive and head.keep_alive)

    def _answered(self, status: int, details: str) -> None:
        record = self._record
        if record is not None:
            record.status = status
            if not record.response_code_details:
                record.response_code_details = details

    async def _answer(
        self, status: int, text: str, keep_alive: bool, headers: Sequence[tuple[str, str]] = ()
    ) -> None:
        self._answered(status, "local_reply")
        try:
            response = simple_response(status, text + "\n", keep_alive=keep_alive, headers=headers)
            self.client.write(response)
            await self.client.drain()
        except OSError:
            pass

