"""The limits every gRPC service the agent serves on its Unix socket runs under.

Any local user may connect to the Workload API socket, identity or not, so
what a connection may cost the agent is bounded before anything else runs::

    server = LimitedServer([service], limits=ServerLimits(idle_timeout=300.0), name="Workload API")
    await server.start(path="/run/tessera/agent.sock")

- **Message size.** A request message over :data:`MAX_MESSAGE_BYTES` (4 MiB,
  grpc-go's default) is refused with ``RESOURCE_EXHAUSTED`` as soon as its
  5-byte length prefix arrives, before its body is read. The agent acknowledges
  a message's bytes (HTTP/2 flow control) only once the whole message is in, so
  a peer never gets it to hold more than one window
  (:data:`CONNECTION_WINDOW_BYTES`, a message's worth) of partial messages per
  connection, however many streams it opens.
- **Malformed messages.** Bad protobuf, a length prefix or a body cut short, or
  the compressed flag (no compression is ever negotiated) end the call with
  ``INVALID_ARGUMENT`` and a sentence; the service logs one line, no traceback.
- **Idle connections.** A connection with no call in progress is closed
  (HTTP/2 GOAWAY) after ``idle_timeout`` seconds; an open stream (a
  ``FetchX509SVID`` watch) is a call in progress.
- **Connections per uid.** A uid (from ``SO_PEERCRED``) may hold at most
  ``max_connections_per_uid`` connections; one more gets GOAWAY
  ``ENHANCE_YOUR_CALM`` with the reason, and a log line.
- **Quiet logs.** grpclib's INFO lines for clients that went away (stream
  reset, connection lost, their deadline passed) become DEBUG; refusals go
  through :class:`RefusalLog`, which logs a repeated refusal only once.

grpclib offers no hook for any of this, so this module reaches into it in
three named places: :meth:`LimitedServer._protocol_factory`, the stream's
``buffer`` (:class:`_MessageBuffer`) and the h2 connection behind
:meth:`_LimitedConnection._goodbye`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
from collections import OrderedDict
from collections.abc import Callable, Collection, Hashable
from dataclasses import dataclass
from typing import Any, Final

import h2.config
import h2.exceptions
from google.protobuf.message import DecodeError
from grpclib.config import Configuration
from grpclib.const import Status
from grpclib.encoding.proto import ProtoCodec
from grpclib.exceptions import GRPCError
from grpclib.protocol import AbstractHandler, Buffer, H2Protocol
from grpclib.protocol import Connection as GrpclibConnection
from grpclib.protocol import Stream as H2Stream
from grpclib.server import Server
from h2.errors import ErrorCodes

from attestor.workload import PeerCredentials, WorkloadAttestationError, peer_credentials

__all__ = [
    "CONNECTION_WINDOW_BYTES",
    "DEFAULT_IDLE_TIMEOUT",
    "DEFAULT_MAX_CONNECTIONS_PER_UID",
    "MAX_MESSAGE_BYTES",
    "LimitedServer",
    "RefusalLog",
    "ServerLimits",
    "describe_peer",
]

MAX_MESSAGE_BYTES: Final = 4 * 1024 * 1024
DEFAULT_IDLE_TIMEOUT: Final = 300.0
DEFAULT_MAX_CONNECTIONS_PER_UID: Final = 128
# What a peer may send that the agent has not acknowledged: one largest message (and
# its prefix, and a frame of slack), per stream and per connection alike.
CONNECTION_WINDOW_BYTES: Final = MAX_MESSAGE_BYTES + 64 * 1024
MAX_CONNECTIONS_SETTING: Final = "workload_api_max_connections_per_uid"

_PREFIX: Final = struct.Struct(">?I")  # gRPC's compressed flag and message length
# Distinct (caller, method) refusals remembered by RefusalLog.
_REMEMBERED_REFUSALS: Final = 4096

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerLimits:
    """``idle_timeout`` in seconds; agent.toml's ``workload_api_idle_timeout`` and
    ``workload_api_max_connections_per_uid``."""

    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    max_connections_per_uid: int = DEFAULT_MAX_CONNECTIONS_PER_UID
    max_message_bytes: int = MAX_MESSAGE_BYTES

    def __post_init__(self) -> None:
        if self.idle_timeout <= 0:
            raise ValueError("idle_timeout must be greater than zero")
        if self.max_connections_per_uid < 1:
            raise ValueError("max_connections_per_uid must be at least 1")


def describe_peer(peer: PeerCredentials | None) -> str:
    if peer is None:
        return "an unidentified caller"
    return f"pid {peer.pid} (uid {peer.uid}, gid {peer.gid})"


class RefusalLog:
    """Logs a refusal at its level the first time, and again only once it changes.

    ``key`` names who was refused what (e.g. the caller and the method); ``state``
    what they were told. The same state for the same key again is logged at
    DEBUG, so a client retrying every few seconds does not flood the log;
    :meth:`forget` (say, once the caller is served) makes the next one count again.
    """

    def __init__(self, logger: logging.Logger, capacity: int = _REMEMBERED_REFUSALS) -> None:
        self._logger = logger
        self._capacity = capacity
        self._last: OrderedDict[Hashable, Hashable] = OrderedDict()

    def log(self, key: Hashable, state: Hashable, level: int, msg: str, *args: object) -> None:
        if key in self._last and self._last[key] == state:
            self._last.move_to_end(key)
            level = logging.DEBUG
        else:
            self._last[key] = state
            self._last.move_to_end(key)
            if len(self._last) > self._capacity:
                self._last.popitem(last=False)
        self._logger.log(level, msg, *args)

    def forget(self, key: Hashable) -> None:
        self._last.pop(key, None)


class LimitedServer(Server):
    """A grpclib :class:`~grpclib.server.Server` that applies :class:`ServerLimits`.

    ``name`` names the service in log lines ("Workload API").
    """

    def __init__(
        self, handlers: Collection[Any], *, limits: ServerLimits, name: str
    ) -> None:
        super().__init__(
            handlers,
            codec=_StrictProtoCodec(),
            config=Configuration(
                http2_connection_window_size=CONNECTION_WINDOW_BYTES,
                http2_stream_window_size=CONNECTION_WINDOW_BYTES,
            ),
        )
        self.limits = limits
        self.name = name
        self._connections: set[_LimitedConnection] = set()
        self._connections_by_uid: dict[int, int] = {}
        self._refusals = RefusalLog(_log)
        _quiet_clients_going_away()

    def _protocol_factory(self) -> H2Protocol:
        # grpclib's own protocol and handler (registered for close and wait_closed),
        # with a connection that tracks its calls around them.
        protocol = super()._protocol_factory()
        return _LimitedConnection(self, protocol.handler, protocol.config, protocol.h2_config)

    def close_connections(self) -> None:
        """Say goodbye on every connection still open (after :meth:`close`)."""
        for connection in list(self._connections):
            connection.goodbye(ErrorCodes.NO_ERROR, "")

    @property
    def connection_count(self) -> int:
        return len(self._connections)

    def _admit(self, connection: _LimitedConnection, peer: PeerCredentials) -> str | None:
        """Count ``connection`` against its uid; the reason it is refused, if it is."""
        open_count = self._connections_by_uid.get(peer.uid, 0)
        limit = self.limits.max_connections_per_uid
        if open_count >= limit:
            reason = (
                f"uid {peer.uid} has {open_count} connections open to the Tessera agent, "
                "the most it may have"
            )
            self._refusals.log(
                ("connections", peer.uid), limit, logging.WARNING,
                "%s refused a connection from %s: %s (%s)",
                self.name, describe_peer(peer), reason, MAX_CONNECTIONS_SETTING,
            )  # fmt: skip
            return reason
        self._connections_by_uid[peer.uid] = open_count + 1
        self._connections.add(connection)
        return None

    def _release(self, connection: _LimitedConnection, peer: PeerCredentials) -> None:
        self._connections.discard(connection)
        remaining = self._connections_by_uid.get(peer.uid, 0) - 1
        if remaining > 0:
            self._connections_by_uid[peer.uid] = remaining
        else:
            self._connections_by_uid.pop(peer.uid, None)
            self._refusals.forget(("connections", peer.uid))


class _LimitedConnection(H2Protocol):
    """One HTTP/2 connection: admitted by uid, its calls counted, closed when idle."""

    def __init__(
        self,
        server: LimitedServer,
        handler: AbstractHandler,
        config: Configuration,
        h2_config: h2.config.H2Configuration,
    ) -> None:
        super().__init__(
            _CallTracker(handler, self, server.limits.max_message_bytes), config, h2_config
        )
        self._server = server
        self._transport: asyncio.BaseTransport | None = None
        self._peer: PeerCredentials | None = None  # set once admitted
        self._calls = 0
        self._idle_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._transport = transport
        try:
            sock = transport.get_extra_info("socket")
            if sock is None:
                raise WorkloadAttestationError("the connection has no socket")
            peer = peer_credentials(sock)
        except WorkloadAttestationError as err:
            _log.warning("%s refused a connection: %s", self._server.name, err)
            self.goodbye(ErrorCodes.REFUSED_STREAM, "the agent cannot tell who is calling")
            return
        refusal = self._server._admit(self, peer)
        if refusal is not None:
            self.goodbye(ErrorCodes.ENHANCE_YOUR_CALM, refusal)
            return
        self._peer = peer
        self._arm_idle_timer()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._cancel_idle_timer()
        if self._peer is not None:
            self._server._release(self, self._peer)
            self._peer = None
        super().connection_lost(exc)

    def call_started(self) -> None:
        self._calls += 1
        self._cancel_idle_timer()

    def call_ended(self) -> None:
        self._calls -= 1
        if self._calls == 0:
            self._arm_idle_timer()

    def goodbye(self, error_code: ErrorCodes, reason: str) -> None:
        """Send GOAWAY (with ``reason`` as its debug data) and close the connection."""
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        self._cancel_idle_timer()
        # grpclib keeps the h2 connection to itself; GOAWAY is the polite way to end.
        h2_connection = getattr(self.connection, "_connection", None)
        if h2_connection is not None:
            with contextlib.suppress(h2.exceptions.ProtocolError):
                h2_connection.close_connection(
                    error_code=error_code, additional_data=reason.encode() or None
                )
                self.connection.flush()
        transport.close()  # after what is buffered, GOAWAY included, is written

    def _arm_idle_timer(self) -> None:
        self._cancel_idle_timer()
        if self._peer is None or self._transport is None or self._transport.is_closing():
            return
        self._idle_timer = asyncio.get_running_loop().call_later(
            self._server.limits.idle_timeout, self._close_idle
        )

    def _cancel_idle_timer(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None

    def _close_idle(self) -> None:
        self._idle_timer = None
        _log.debug(
            "%s closed an idle connection from %s", self._server.name, describe_peer(self._peer)
        )
        self.goodbye(ErrorCodes.NO_ERROR, "")


class _CallTracker(AbstractHandler):
    """grpclib's per-connection handler, with each call counted and its messages bounded."""

    def __init__(
        self, handler: AbstractHandler, connection: _LimitedConnection, max_message_bytes: int
    ) -> None:
        self._handler = handler
        self._connection = connection
        self._max_message_bytes = max_message_bytes

    def accept(
        self, stream: H2Stream, headers: Any, release_stream: Callable[[], None]
    ) -> None:
        # Called as the call's headers arrive, before any of its DATA.
        assert stream.id is not None
        stream.buffer = _MessageBuffer(stream.connection, stream.id, self._max_message_bytes)
        self._connection.call_started()

        def release() -> None:
            try:
                release_stream()
            finally:
                self._connection.call_ended()

        self._handler.accept(stream, headers, release)

    def cancel(self, stream: H2Stream) -> None:
        self._handler.cancel(stream)

    def close(self) -> None:
        self._handler.close()


class _MessageBuffer(Buffer):
    """A stream's received DATA, read as gRPC messages: 5-byte prefix, then the body.

    grpclib reads the prefix, then as many bytes as it announces; this checks the
    prefix in between, so a message over the limit is refused before its body is
    read. grpclib acknowledges each chunk as it takes it; here the acknowledgements
    wait until the read is complete, so the flow-control window, not the number of
    streams, bounds what partial messages a connection holds.
    """

    def __init__(
        self, connection: GrpclibConnection, stream_id: int, max_message_bytes: int
    ) -> None:
        super().__init__(self._hold_ack)
        self._connection = connection
        self._stream_id = stream_id
        self._max_message_bytes = max_message_bytes
        self._announced: int | None = None  # the body length, once its prefix was read
        self._held = 0

    def _hold_ack(self, size: int) -> None:
        self._held += size

    def _release_acks(self) -> None:
        held, self._held = self._held, 0
        if held and not self._connection.is_closing():
            self._connection.ack(self._stream_id, held)

    async def read(self, size: int) -> bytes:
        announced, self._announced = self._announced, None
        try:
            data = await super().read(size)
        except AssertionError:  # grpclib: "Received less data than expected"
            if announced is None:
                raise GRPCError(
                    Status.INVALID_ARGUMENT,
                    f"the request ended inside a message's {_PREFIX.size}-byte length prefix",
                ) from None
            raise GRPCError(
                Status.INVALID_ARGUMENT,
                f"the request ended before the {announced} bytes its message's length "
                "prefix announced",
            ) from None
        finally:
            self._release_acks()
        if announced is None and len(data) == _PREFIX.size:
            compressed, length = _PREFIX.unpack(data)
            if compressed:
                raise GRPCError(
                    Status.INVALID_ARGUMENT,
                    "the request message is marked compressed, but no compression was "
                    "negotiated; send it uncompressed",
                )
            if length > self._max_message_bytes:
                raise GRPCError(
                    Status.RESOURCE_EXHAUSTED,
                    f"the request message is {length} bytes, more than the "
                    f"{self._max_message_bytes} bytes ({_mebibytes(self._max_message_bytes)}) "
                    "the Tessera agent accepts",
                )
            self._announced = length
        return data


class _StrictProtoCodec(ProtoCodec):
    """Protobuf, with a message that does not parse refused as INVALID_ARGUMENT."""

    def decode(self, data: bytes, message_type: Any) -> Any:
        try:
            return super().decode(data, message_type)
        except DecodeError:
            name = getattr(message_type, "__name__", "protobuf")
            raise GRPCError(
                Status.INVALID_ARGUMENT, f"the request is not a valid {name} message"
            ) from None


def _mebibytes(size: int) -> str:
    return f"{size // (1024 * 1024)} MiB" if size % (1024 * 1024) == 0 else f"{size} bytes"


# -- grpclib's log lines for clients that went away ---------------------------------------

# grpclib.server logs these at INFO when a client resets its stream, drops the
# connection or lets its deadline pass: the client's doing, not the agent's.
_CLIENT_WENT_AWAY: Final = frozenset({"Request was cancelled: %s", "Deadline exceeded"})


class _ClientWentAwayFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno == logging.INFO and record.msg in _CLIENT_WENT_AWAY:
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)
        return True


def _quiet_clients_going_away() -> None:
    logger = logging.getLogger("grpclib.server")
    if not any(isinstance(f, _ClientWentAwayFilter) for f in logger.filters):
        logger.addFilter(_ClientWentAwayFilter())
