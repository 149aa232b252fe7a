"""The SPIFFE Workload API, served over gRPC on a Unix socket.

Any SPIFFE client (py-spiffe, go-spiffe, ``spiffe-helper``...) talks to it
unchanged. What it serves comes from an :class:`~workload_api.identity.IdentityProvider`
(the agent's SVID cache); this module only does the transport::

    async with WorkloadApiServer(cache) as server:
        await server.start(Path("/run/tessera/agent.sock"))
        await stop_requested.wait()

Every call goes through the same steps:

1. the ``workload.spiffe.io: true`` header must be present, else
   ``INVALID_ARGUMENT`` "security header missing from request";
2. the caller's pid/uid/gid come from the kernel (``SO_PEERCRED`` on the
   connection's socket), never from anything the caller says;
3. the provider attests those credentials to selectors; a caller whose
   selectors match no entry gets ``PERMISSION_DENIED`` "no identity issued".

Streams (``FetchX509SVID``, ``FetchX509Bundles``, ``FetchJWTBundles``) send the
whole state at once, then again each time the provider reports a change that
alters what this caller sees. On :meth:`WorkloadApiServer.close` open streams
end with ``UNAVAILABLE`` so clients reconnect to the next agent.

Every connection runs under :mod:`workload_api.grpc_limits`: requests over
4 MiB get ``RESOURCE_EXHAUSTED`` from their length prefix, malformed ones
``INVALID_ARGUMENT``, idle connections are closed and each uid may hold a
bounded number of them (:class:`~workload_api.grpc_limits.ServerLimits`).
JWT audiences are bounded as the server bounds them (``sdk.jwtsvid.check_audiences``),
before anything is asked of it.

Calls are counted in ``tessera_workload_api_calls_total{method,status}``;
refusals are logged at INFO with the caller's pid and uid, never a key or token,
once per caller, method and refusal (repeats at DEBUG until it changes).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import stat
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Protocol, cast

from grpclib.const import Status
from grpclib.exceptions import GRPCError, StreamTerminatedError
from grpclib.server import Stream
from prometheus_client import Counter

from attestor.selector import Selector
from attestor.workload import PeerCredentials, peer_credentials
from sdk.errors import ConfigError, InvalidArgument, PermissionDenied, TesseraError, Unavailable
from sdk.jwtsvid import check_audience, check_audiences
from sdk.privatefiles import make_directories
from sdk.spiffeid import parse_spiffe_id
from workload_api._proto import workload_grpc, workload_pb2
from workload_api.grpc_limits import LimitedServer, RefusalLog, ServerLimits, describe_peer
from workload_api.identity import IdentityProvider, X509Context, X509SvidMaterial

if TYPE_CHECKING:
    from google.protobuf.message import Message

__all__ = [
    "NO_IDENTITY",
    "SECURITY_HEADER",
    "SECURITY_HEADER_MISSING",
    "ExtraService",
    "WorkloadApiServer",
    "caller_credentials",
    "grpc_status",
    "receive_request",
    "workload_caller",
]

SECURITY_HEADER: Final = "workload.spiffe.io"
SECURITY_HEADER_MISSING: Final = "security header missing from request"
NO_IDENTITY: Final = "no identity issued"
SHUTTING_DOWN: Final = "the Tessera agent is shutting down; reconnect to its replacement"

# sun_path is 108 bytes on Linux, including the terminating NUL.
_MAX_SOCKET_PATH_BYTES: Final = 107
_SOCKET_MODE: Final = 0o777
# Connections the kernel queues before the agent accepts them (capped by
# net.core.somaxconn). grpclib's default of 100 is overrun when a node's
# workloads start together: on a full Unix-socket backlog a non-blocking
# connect fails with EAGAIN, which asyncio clients report as a lost connection.
_LISTEN_BACKLOG: Final = 4096
_CREATED_DIR_MODE: Final = 0o755
# Distinct X509SVIDResponse messages kept for one provider version (one per
# distinct set of identities callers have); past this the cache starts over.
_MAX_CACHED_MESSAGES: Final = 1024

_log = logging.getLogger(__name__)

CALLS: Final = Counter(
    "tessera_workload_api_calls_total",
    "Workload API calls, by method and the gRPC status they ended with",
    ["method", "status"],
)
# CALLS.labels(...) resolved once per (method, status) rather than on every call.
_CALL_COUNTERS: dict[tuple[str, Status], Counter] = {}
# Every method's OK series exists from the start, at zero (as Prometheus advises): a
# streaming call is counted when it ends, and dashboards should not see "no data" until then.
for _method in ("FetchX509SVID", "FetchX509Bundles", "FetchJWTSVID", "FetchJWTBundles",
                "ValidateJWTSVID"):
    _CALL_COUNTERS[_method, Status.OK] = CALLS.labels(method=_method, status=Status.OK.name)

# Tessera's errors (sdk.errors) carry an HTTP status; the Workload API answers with the gRPC one.
_GRPC_STATUS_BY_HTTP: Final[Mapping[int, Status]] = {
    400: Status.INVALID_ARGUMENT,
    401: Status.UNAUTHENTICATED,
    403: Status.PERMISSION_DENIED,
    404: Status.NOT_FOUND,
    409: Status.ALREADY_EXISTS,
    412: Status.FAILED_PRECONDITION,
    503: Status.UNAVAILABLE,
}

_AnyStream = Stream[Any, Any]
_ContextKey = tuple[tuple[X509SvidMaterial, ...], tuple[tuple[str, bytes], ...]]

# The generated module builds its classes at import time, out of mypy's sight;
# every message is reached through this one untyped name.
_pb: Any = workload_pb2


class ExtraService(Protocol):
    """A grpclib service (``__mapping__``) the agent serves beside the Workload API."""

    def __mapping__(self) -> dict[str, Any]: ...

    async def shut_down(self, grace: float) -> None:
        """End open calls, waiting at most ``grace`` seconds for them."""


class WorkloadApiServer:
    """Serves one :class:`IdentityProvider` on a Unix socket.

    ``services`` are more grpclib services served on the same socket, under the same
    limits (the agent's mesh registration, Envoy's discovery services); each ends its
    open calls in ``shut_down(grace)`` when the server closes, as the Workload API's do.

    ``allow_unauthenticated_verifiers`` lets callers without an identity fetch
    bundles and validate JWT-SVIDs (SPIRE's option of the same name); off by
    default. ``shutdown_grace`` bounds how long :meth:`close` waits for open
    calls to end before cancelling them. ``limits`` bounds idle time and
    connections per uid (agent.toml's ``workload_api_*`` settings).
    """

    def __init__(
        self,
        provider: IdentityProvider,
        *,
        allow_unauthenticated_verifiers: bool = False,
        shutdown_grace: float = 5.0,
        limits: ServerLimits | None = None,
        services: Sequence[ExtraService] = (),
    ) -> None:
        self._provider = provider
        self._extra_services = tuple(services)
        self._allow_unauthenticated_verifiers = allow_unauthenticated_verifiers
        self._shutdown_grace = shutdown_grace
        self._limits = limits or ServerLimits()
        self._service: _WorkloadApiService | None = None
        self._server: LimitedServer | None = None
        self._socket_path: Path | None = None
        self._socket_inode: int | None = None

    @property
    def socket_path(self) -> Path | None:
        """Where it listens; None until started."""
        return self._socket_path

    async def start(self, socket_path: Path) -> None:
        """Listen on ``socket_path``, creating its directory and replacing a stale socket.

        The socket is world-connectable (0777) on purpose: any local process may
        ask, and what it gets depends only on what the kernel says about it
        (``SO_PEERCRED``) and on attestation. A stricter mode would not protect
        any SVID; it would only lock out workloads that run as other users.
        Keep the directory traversable (0755) for the same reason.
        """
        if self._server is not None:
            raise RuntimeError("the Workload API server is already started")
        path = socket_path.absolute()
        await asyncio.to_thread(_prepare_socket_path, path)
        service = _WorkloadApiService(self._provider, self._allow_unauthenticated_verifiers)
        server = LimitedServer(
            [service, *self._extra_services], limits=self._limits, name="Workload API"
        )
        try:
            await server.start(path=str(path), backlog=_LISTEN_BACKLOG)
        except OSError as err:
            raise ConfigError(
                f"cannot listen on the Workload API socket {path}: {err.strerror or err}; "
                "check that the directory is writable by the agent"
            ) from err
        try:
            os.chmod(path, _SOCKET_MODE)
            inode = path.lstat().st_ino
        except OSError as err:
            server.close()
            await server.wait_closed()
            raise ConfigError(
                f"cannot make the Workload API socket {path} connectable: {err.strerror}"
            ) from err
        self._service, self._server = service, server
        self._socket_path, self._socket_inode = path, inode
        _log.info("Workload API listening on %s", path)

    async def close(self) -> None:
        """End open calls (streams get ``UNAVAILABLE``), stop listening, remove the socket."""
        server, service = self._server, self._service
        if server is None or service is None:
            return
        self._server = self._service = None
        await asyncio.gather(
            service.shut_down(self._shutdown_grace),
            *(extra.shut_down(self._shutdown_grace) for extra in self._extra_services),
        )
        server.close()
        await server.wait_closed()
        server.close_connections()
        self._remove_socket_file()
        _log.info("Workload API on %s closed", self._socket_path)

    async def __aenter__(self) -> WorkloadApiServer:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def _remove_socket_file(self) -> None:
        """Unlink the socket unless something else has taken its place meanwhile."""
        if self._socket_path is None:
            return
        with contextlib.suppress(FileNotFoundError):
            if self._socket_path.lstat().st_ino == self._socket_inode:
                self._socket_path.unlink()


class _WorkloadApiService(workload_grpc.SpiffeWorkloadAPIBase):
    """The five RPCs; each body runs inside :meth:`_call`, which does the common steps."""

    def __init__(self, provider: IdentityProvider, allow_unauthenticated_verifiers: bool) -> None:
        self._provider = provider
        self._allow_unauthenticated_verifiers = allow_unauthenticated_verifiers
        self._closing = asyncio.Event()
        self._active: set[asyncio.Task[Any]] = set()
        # Streams waiting in _next_change, and those shut_down woke by cancelling them.
        self._waiting: set[asyncio.Task[Any]] = set()
        self._woken_for_shutdown: set[asyncio.Task[Any]] = set()
        self._refusals = RefusalLog(_log)
        # The X509SVIDResponse of each context served at _messages_version: callers
        # with the same identities share one message instead of building their own.
        self._x509_messages: dict[_ContextKey, Message] = {}
        self._messages_version: int | None = None

    # -- the RPCs ----------------------------------------------------------------------------

    async def FetchX509SVID(self, stream: _AnyStream) -> None:
        await self._call("FetchX509SVID", stream, self._fetch_x509_svid)

    async def FetchX509Bundles(self, stream: _AnyStream) -> None:
        await self._call("FetchX509Bundles", stream, self._fetch_x509_bundles)

    async def FetchJWTSVID(self, stream: _AnyStream) -> None:
        await self._call("FetchJWTSVID", stream, self._fetch_jwt_svid)

    async def FetchJWTBundles(self, stream: _AnyStream) -> None:
        await self._call("FetchJWTBundles", stream, self._fetch_jwt_bundles)

    async def ValidateJWTSVID(self, stream: _AnyStream) -> None:
        await self._call("ValidateJWTSVID", stream, self._validate_jwt_svid)

    async def _fetch_x509_svid(self, stream: _AnyStream, peer: PeerCredentials) -> None:
        await receive_request(stream)
        selectors = await self._provider.attest(peer)

        def current() -> Message:
            return self._x509_svid_message(self._require_identity(selectors))

        await self._stream_updates(stream, current)

    async def _fetch_x509_bundles(self, stream: _AnyStream, peer: PeerCredentials) -> None:
        await receive_request(stream)
        selectors = await self._provider.attest(peer)

        def current() -> Message:
            self._require_verifier(selectors)
            own_and_federated = dict(self._provider.x509_bundles(selectors))
            bundles: Message = _pb.X509BundlesResponse(bundles=own_and_federated)
            return bundles

        await self._stream_updates(stream, current)

    async def _fetch_jwt_bundles(self, stream: _AnyStream, peer: PeerCredentials) -> None:
        await receive_request(stream)
        selectors = await self._provider.attest(peer)

        def current() -> Message:
            self._require_verifier(selectors)
            own_and_federated = dict(self._provider.jwt_bundles(selectors))
            bundles: Message = _pb.JWTBundlesResponse(bundles=own_and_federated)
            return bundles

        await self._stream_updates(stream, current)

    async def _fetch_jwt_svid(self, stream: _AnyStream, peer: PeerCredentials) -> None:
        request = await receive_request(stream)
        if request is None or not request.audience:
            raise InvalidArgument("audience must be specified")
        audience = list(request.audience)
        check_audiences(audience)  # as the server would, before it is asked
        spiffe_id: str | None = request.spiffe_id or None
        if spiffe_id is not None:
            parse_spiffe_id(spiffe_id, what="requested SPIFFE ID")
        selectors = await self._provider.attest(peer)
        identities = {svid.spiffe_id for svid in self._require_identity(selectors).svids}
        if spiffe_id is not None and spiffe_id not in identities:
            raise PermissionDenied(f"{NO_IDENTITY} for {spiffe_id}")
        svids = await self._provider.fetch_jwt_svids(selectors, audience, spiffe_id)
        if not svids:
            raise PermissionDenied(NO_IDENTITY)
        await stream.send_message(
            _pb.JWTSVIDResponse(
                svids=[
                    _pb.JWTSVID(spiffe_id=svid.spiffe_id, svid=svid.token, hint=svid.hint)
                    for svid in svids
                ]
            )
        )

    async def _validate_jwt_svid(self, stream: _AnyStream, peer: PeerCredentials) -> None:
        request = await receive_request(stream)
        if request is None or not request.audience:
            raise InvalidArgument("audience must be specified")
        check_audience(request.audience)
        if not request.svid:
            raise InvalidArgument("svid must be specified")
        selectors = await self._provider.attest(peer)
        self._require_verifier(selectors)
        validated = self._provider.validate_jwt_svid(request.svid, request.audience)
        response = _pb.ValidateJWTSVIDResponse(spiffe_id=validated.spiffe_id)
        response.claims.update(validated.claims)
        await stream.send_message(response)

    # -- what every call shares --------------------------------------------------------------

    async def _call(
        self,
        method: str,
        stream: _AnyStream,
        body: Callable[[_AnyStream, PeerCredentials], Awaitable[None]],
    ) -> None:
        """Header check, peer credentials, then ``body``; errors become gRPC statuses."""
        task = asyncio.current_task()
        if task is not None:
            self._active.add(task)
            task.add_done_callback(self._active.discard)
        status = Status.OK
        peer: PeerCredentials | None = None
        try:
            if self._closing.is_set():
                raise Unavailable(SHUTTING_DOWN)
            peer = _peer_credentials(_connection_transport(stream))
            _require_security_header(stream)
            await body(stream, peer)
        except TesseraError as err:
            status = _GRPC_STATUS_BY_HTTP.get(err.status, Status.INTERNAL)
            self._log_refusal(method, peer, status, err.message)
            raise GRPCError(status, err.message) from err
        except GRPCError as err:
            status = err.status
            self._log_refusal(method, peer, status, err.message or "")
            raise
        except (asyncio.CancelledError, StreamTerminatedError):
            status = _ended_by_client(stream)
            self._refusals.forget((method, peer))  # it was served until it left
            raise
        except Exception:
            status = Status.INTERNAL
            _log.exception("Workload API %s failed for %s", method, describe_peer(peer))
            raise GRPCError(
                Status.INTERNAL, "internal error in the Tessera agent; see the agent's log"
            ) from None
        else:
            self._refusals.forget((method, peer))
        finally:
            _count_call(method, status)

    def _log_refusal(
        self, method: str, peer: PeerCredentials | None, status: Status, message: str
    ) -> None:
        """At INFO the first time; the same refusal of the same caller again at DEBUG."""
        self._refusals.log(
            (method, peer), (status, message), logging.INFO,
            "Workload API %s refused %s: %s: %s", method, describe_peer(peer), status.name, message,
        )  # fmt: skip

    async def _stream_updates(self, stream: _AnyStream, current: Callable[[], Message]) -> None:
        """Send ``current()`` now, then again after each change that alters it; never returns.

        ``current`` raises to end the stream (e.g. the caller lost its identity).
        The version is read before the state so a change in between is not missed.
        """
        sent: Message | None = None
        while True:
            version = self._provider.version()
            message = current()
            if message is not sent and message != sent:
                await stream.send_message(message)
                sent = message
            await self._next_change(version)

    async def _next_change(self, seen_version: int) -> None:
        """Wait for the provider to change, or raise Unavailable if the server closes first.

        The wait runs in the stream's own task (no task per stream and change):
        :meth:`shut_down` cancels the waiting tasks, and a cancellation that came
        only from it becomes Unavailable here.
        """
        if self._closing.is_set():
            raise Unavailable(SHUTTING_DOWN)
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("the Workload API server runs its calls in asyncio tasks")
        self._waiting.add(task)
        try:
            await self._provider.wait_for_change(seen_version)
        except asyncio.CancelledError:
            if task in self._woken_for_shutdown:
                self._woken_for_shutdown.discard(task)
                if task.uncancel() == 0:  # nobody else cancelled it as well
                    raise Unavailable(SHUTTING_DOWN) from None
            raise
        finally:
            self._waiting.discard(task)

    def _x509_svid_message(self, context: X509Context) -> Message:
        """The X509SVIDResponse for ``context``, built once per provider version and content."""
        version = self._provider.version()
        if version != self._messages_version or len(self._x509_messages) >= _MAX_CACHED_MESSAGES:
            self._x509_messages.clear()
            self._messages_version = version
        # Keyed by content: the provider returns a new, equal context on every call.
        key = (context.svids, tuple(context.federated_bundles.items()))
        message = self._x509_messages.get(key)
        if message is None:
            message = self._x509_messages[key] = _x509_svid_response(context)
        return message

    def _require_identity(self, selectors: frozenset[Selector]) -> X509Context:
        context = self._provider.x509_context(selectors)
        if not context.svids:
            raise PermissionDenied(NO_IDENTITY)
        return context

    def _require_verifier(self, selectors: frozenset[Selector]) -> None:
        """Bundles and validation need an identity unless unauthenticated verifiers are allowed."""
        if not self._allow_unauthenticated_verifiers:
            self._require_identity(selectors)

    # -- shutdown ----------------------------------------------------------------------------

    async def shut_down(self, grace: float) -> None:
        """Refuse new calls, wake open streams so they end with UNAVAILABLE, wait for them."""
        self._closing.set()
        for task in self._waiting - self._woken_for_shutdown:
            self._woken_for_shutdown.add(task)
            task.cancel()
        active = {task for task in self._active if task is not asyncio.current_task()}
        if active:
            await asyncio.wait(active, timeout=grace)


REQUEST_TIMEOUT_SECONDS: Final = 10.0
"""How long a call may take to send its one request message after its headers."""


async def receive_request(stream: _AnyStream) -> Any:
    """The call's request message; a caller that opens a call and never sends it does
    not hold the stream for ever (every service on the agent's socket reads it so)."""
    try:
        return await asyncio.wait_for(stream.recv_message(), REQUEST_TIMEOUT_SECONDS)
    except TimeoutError:
        raise GRPCError(
            Status.DEADLINE_EXCEEDED,
            f"no request message within {REQUEST_TIMEOUT_SECONDS:g}s of the call's headers",
        ) from None


def workload_caller(stream: _AnyStream) -> PeerCredentials:
    """For the other services on the agent's socket: the security header checked (as the
    Workload API checks it), then the caller's credentials as the kernel recorded them."""
    _require_security_header(stream)
    return caller_credentials(stream)


def _require_security_header(stream: _AnyStream) -> None:
    values = stream.metadata.getall(SECURITY_HEADER, []) if stream.metadata is not None else []
    if values != ["true"]:
        raise InvalidArgument(SECURITY_HEADER_MISSING)


def _connection_transport(stream: _AnyStream) -> asyncio.BaseTransport:
    """The asyncio transport of the connection a call arrived on.

    The one place that reaches into grpclib: its public ``Peer`` offers only the
    address and the TLS certificate, so the socket (for ``SO_PEERCRED``) is
    reached through the transport ``Peer`` wraps. If a grpclib upgrade renames
    it, every call fails with INTERNAL and this error in the log.
    """
    transport = getattr(stream.peer, "_transport", None)
    # uvloop's transports do not derive from asyncio's classes: check the methods used.
    if transport is None or not (
        hasattr(transport, "get_extra_info") and hasattr(transport, "close")
    ):
        raise RuntimeError(
            "cannot reach the connection of a Workload API call through grpclib's Peer; "
            "this grpclib version is not supported by Tessera"
        )
    return cast(asyncio.BaseTransport, transport)


def _peer_credentials(transport: asyncio.BaseTransport) -> PeerCredentials:
    """The caller's pid/uid/gid as the kernel recorded them when it connected."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        raise RuntimeError("the Workload API connection has no socket to read credentials from")
    # asyncio hands out a TransportSocket, which forwards getsockopt to the real socket.
    return peer_credentials(sock)


def caller_credentials(stream: _AnyStream) -> PeerCredentials:
    """The pid/uid/gid of the process on the other end of ``stream``'s connection, as the
    kernel recorded them (for the other services on the agent's socket)."""
    return _peer_credentials(_connection_transport(stream))


def grpc_status(err: TesseraError) -> Status:
    """The gRPC status a Tessera error is answered with on the agent's socket."""
    return _GRPC_STATUS_BY_HTTP.get(err.status, Status.INTERNAL)


def _count_call(method: str, status: Status) -> None:
    counter = _CALL_COUNTERS.get((method, status))
    if counter is None:
        counter = _CALL_COUNTERS[method, status] = CALLS.labels(method=method, status=status.name)
    counter.inc()


def _ended_by_client(stream: _AnyStream) -> Status:
    deadline = stream.deadline
    if deadline is not None and deadline.time_remaining() <= 0:
        return Status.DEADLINE_EXCEEDED
    return Status.CANCELLED


def _x509_svid_response(context: X509Context) -> Message:
    response: Message = _pb.X509SVIDResponse(
        svids=[
            _pb.X509SVID(
                spiffe_id=svid.spiffe_id,
                x509_svid=svid.cert_chain_der,
                x509_svid_key=svid.private_key_der,
                bundle=svid.bundle_der,
                hint=svid.hint,
            )
            for svid in context.svids
        ],
        federated_bundles=dict(context.federated_bundles),
    )
    return response


# -- the socket file ------------------------------------------------------------------------


def _prepare_socket_path(path: Path) -> None:
    """Create the socket's directory and clear a stale socket left by a previous agent."""
    if len(os.fsencode(path)) > _MAX_SOCKET_PATH_BYTES:
        raise ConfigError(
            f"the Workload API socket path {path} is longer than {_MAX_SOCKET_PATH_BYTES} "
            "bytes, the limit for Unix sockets; choose a shorter path"
        )
    try:
        make_directories(path.parent, mode=_CREATED_DIR_MODE)
    except OSError as err:
        raise ConfigError(
            f"cannot create the Workload API socket directory {err.filename}: {err.strerror}"
        ) from err
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ConfigError(
            f"{path} exists and is not a socket; remove it or choose another socket path"
        )
    if _socket_is_live(path):
        raise ConfigError(
            f"another process is already serving on {path}; stop it or choose another socket path"
        )
    path.unlink()


def _socket_is_live(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True
