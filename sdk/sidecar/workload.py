"""The sidecar's Workload API source: one of the workload's SVIDs, followed through rotations.

::

    source = connect_x509_source("unix:///run/tessera/agent.sock",
                                 spiffe_id=SpiffeId("spiffe://example.org/api"), timeout=10)
    snapshot = source.snapshot()        # the SVID and every bundle, from the same update
    stop = source.subscribe(on_change)  # called from the Workload API thread
    source.close()

It is an :class:`sdk.sources.X509Source`, so :mod:`sdk.tls` contexts built on
it follow every rotation. Beyond :class:`sdk.sources.WorkloadApiX509Source` it

- picks the SVID named by ``spiffe_id`` when several entries match the
  workload (the Workload API's default, the first one, otherwise);
- drops the SVID when the Workload API withdraws it (``PERMISSION_DENIED``:
  the workload has no identity any more, or an update without ``spiffe_id``),
  logs one ERROR saying why and what to do, reports it in
  :meth:`SidecarX509Source.no_identity`, and takes the next SVID issued;
- hands out the SVID and the bundles of one update together
  (:meth:`SidecarX509Source.snapshot`), so files written from it match;
- waits up to ``timeout`` seconds at start for the socket to appear and for
  the first SVID, then fails with a sentence saying what to do: the agent is
  not running, this process has no identity, or it has no SVID for
  ``spiffe_id``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Final, Protocol, Self

import grpc  # type: ignore[import-untyped]
import spiffe
from spiffe import SpiffeId, TrustDomain, X509Bundle, X509Svid
from spiffe.errors import PySpiffeError
from spiffe.workloadapi.workload_api_client import StreamCancelHandler
from spiffe.workloadapi.x509_context import X509Context

from sdk.errors import SourceError
from sdk.sources import ENDPOINT_SOCKET_ENV, Unsubscribe, workload_api_address

__all__ = ["SidecarX509Source", "SnapshotSource", "X509Snapshot", "connect_x509_source"]

_log = logging.getLogger("tessera.sidecar")

RETRY_SECONDS: Final = 2.0
"""The longest wait between two attempts to open the Workload API stream."""
_FIRST_RETRY_SECONDS: Final = 0.1
_CLOSE_CHECK_SECONDS: Final = 0.5
_POLL_SECONDS: Final = 0.1
_PROBE_SECONDS: Final = 2.0
_STATUS_IN_WORDS: Final = re.compile(r"StatusCode\.([A-Z_]+)")


@dataclass(frozen=True)
class X509Snapshot:
    """The SVID and the bundles of one Workload API update."""

    svid: X509Svid
    bundles: tuple[X509Bundle, ...]

    @property
    def own_bundle(self) -> X509Bundle | None:
        """The bundle of the SVID's own trust domain."""
        return self.bundle_for(self.svid.spiffe_id.trust_domain)

    @property
    def federated_bundles(self) -> tuple[X509Bundle, ...]:
        """The bundles of the other trust domains, ordered by name."""
        own = self.svid.spiffe_id.trust_domain
        others = [b for b in self.bundles if b.trust_domain != own]
        return tuple(sorted(others, key=lambda b: b.trust_domain.name))

    def bundle_for(self, trust_domain: TrustDomain) -> X509Bundle | None:
        return next((b for b in self.bundles if b.trust_domain == trust_domain), None)


class SnapshotSource(Protocol):
    """What the files sidecar reads: whole snapshots, change notices, and its health."""

    def snapshot(self) -> X509Snapshot: ...

    def subscribe(self, callback: Callable[[], None]) -> Unsubscribe: ...

    def problem(self) -> str | None: ...

    def no_identity(self) -> str | None: ...


class SidecarX509Source:
    """An :class:`sdk.sources.X509Source` over the Workload API that serves one chosen SVID.

    Build it with :func:`connect_x509_source`, which turns start-up failures
    into sentences. It watches ``FetchX509SVID`` on a thread of its own and
    reconnects itself (0.1 s, doubling up to ``retry_seconds``):

    - the agent unreachable or the stream ended: the SVID held is kept (it
      stays valid until it expires) and the stream is opened again;
    - the Workload API answers ``PERMISSION_DENIED`` (the workload has no
      identity: its entry was deleted or no longer matches), or an update no
      longer offers ``spiffe_id``: the SVID is *dropped*. :meth:`snapshot` and
      :meth:`x509_svid` raise SourceError, :meth:`no_identity` says why, one
      ERROR is logged, and subscribers are not told (there is nothing new to
      build). The first update that offers an SVID again brings it back;
    - ``INVALID_ARGUMENT`` (the agent refuses the client itself): the source
      stops, and :meth:`problem` says why.
    """

    def __init__(
        self,
        address: str,
        *,
        spiffe_id: SpiffeId | None,
        timeout: float,
        consequence: str = "",
        retry_seconds: float = RETRY_SECONDS,
    ) -> None:
        self.address = address
        self.spiffe_id = spiffe_id
        self._consequence = consequence
        self._retry_seconds = retry_seconds
        self._lock = threading.Lock()
        self._snapshot: X509Snapshot | None = None
        self._dropped: X509Svid | None = None
        self._no_identity: str | None = None
        self._failed: str | None = None
        self._subscribers: list[Callable[[], None]] = []
        self._closing = threading.Event()
        self._first = threading.Event()
        self._stream: StreamCancelHandler | None = None
        self._client = spiffe.WorkloadApiClient(socket_path=address)
        threading.Thread(target=self._watch, name="tessera-sidecar-workload-api",
                         daemon=True).start()  # fmt: skip
        if not self._first.wait(timeout) or self._failed:
            reason = self._failed or self._no_identity or "no X509-SVID came"
            self.close()
            raise SourceError(reason)

    def snapshot(self) -> X509Snapshot:
        with self._lock:
            if self._snapshot is None:
                raise SourceError(
                    self._no_identity or self._failed or f"no X509-SVID from {self.address}"
                )
            return self._snapshot

    def x509_svid(self) -> X509Svid:
        return self.snapshot().svid

    def x509_bundle_for(self, trust_domain: TrustDomain) -> X509Bundle | None:
        return self.snapshot().bundle_for(trust_domain)

    def x509_bundles(self) -> Sequence[X509Bundle]:
        return self.snapshot().bundles

    def subscribe(self, callback: Callable[[], None]) -> Unsubscribe:
        with self._lock:
            self._subscribers.append(callback)

        def unsubscribe() -> None:
            with self._lock, contextlib.suppress(ValueError):
                self._subscribers.remove(callback)

        return unsubscribe

    def problem(self) -> str | None:
        """Why the source stopped for good, or None."""
        if self._closing.is_set():
            return None
        return self._failed

    def no_identity(self) -> str | None:
        """Why the source holds no SVID now (it was withdrawn), or None while it holds one."""
        with self._lock:
            return self._no_identity

    def close(self) -> None:
        self._closing.set()
        with self._lock:
            stream, self._stream = self._stream, None
        if stream is not None:
            stream.cancel()
        with contextlib.suppress(Exception):
            self._client.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- the watch -------------------------------------------------------------------------

    def _watch(self) -> None:
        backoff = _FIRST_RETRY_SECONDS
        while not self._closing.is_set():
            received, error = self._follow_stream()
            if self._closing.is_set():
                return
            if received:
                backoff = _FIRST_RETRY_SECONDS
            code = _status_code(error)
            if code == grpc.StatusCode.PERMISSION_DENIED:
                self._withdraw(self._no_identity_reason())
            elif code == grpc.StatusCode.INVALID_ARGUMENT:
                self._failed = (
                    f"the Workload API at {self.address} refused this client ({error}); "
                    "restart the sidecar once the agent serves this workload again"
                )
                _log.error("%s", self._failed)
                self._first.set()
                return
            else:
                _log.debug("the Workload API stream at %s ended (%s); keeping the SVID held "
                           "and reconnecting in %gs", self.address, error, backoff)  # fmt: skip
            if self._closing.wait(backoff):
                return
            backoff = min(backoff * 2, self._retry_seconds)

    def _follow_stream(self) -> tuple[bool, Exception | None]:
        """One ``FetchX509SVID`` stream until it ends: whether it brought an update, and why
        it ended (None when the source was closed)."""
        ended = threading.Event()
        received = threading.Event()
        errors: list[Exception] = []

        def on_update(context: X509Context) -> None:
            received.set()
            self._update(context)

        def on_error(error: Exception) -> None:
            errors.append(error)
            ended.set()

        try:
            stream = self._client.stream_x509_contexts(on_update, on_error, retry_connect=False)
        except PySpiffeError as err:
            return False, err
        with self._lock:
            self._stream = stream
        while not ended.wait(_CLOSE_CHECK_SECONDS) and not self._closing.is_set():
            pass
        stream.cancel()
        return received.is_set(), errors[0] if errors else None

    def _update(self, context: X509Context) -> None:
        svids = list(context.x509_svids)
        if self.spiffe_id is None:
            chosen = svids[0] if svids else None
        else:
            chosen = next((svid for svid in svids if svid.spiffe_id == self.spiffe_id), None)
        if chosen is None:
            if not svids:
                self._withdraw(self._no_identity_reason())
            else:
                self._withdraw(self._not_offered_reason(svids))
            return
        snapshot = X509Snapshot(chosen, tuple(context.x509_bundle_set.bundles))
        with self._lock:
            if self._no_identity is not None and self._first.is_set():
                # Said before the SVID is back in use, so whoever sees it back sees this too.
                _log.warning("the Workload API at %s issued an SVID for %s again; using it "
                             "from now on", self.address, chosen.spiffe_id)  # fmt: skip
            self._snapshot = snapshot
            self._no_identity = None
            self._dropped = None
            subscribers = list(self._subscribers)
        self._first.set()
        for callback in subscribers:
            try:
                callback()
            except Exception:
                _log.exception("a subscriber of the Workload API source failed")

    def _withdraw(self, reason: str) -> None:
        with self._lock:
            if self._no_identity is not None:
                self._no_identity = reason
                return
            held = self._snapshot
            self._snapshot = None
            self._dropped = held.svid if held is not None else None
            self._no_identity = reason
        if held is not None:  # only once it had one: at start, connect_x509_source explains
            _log.error("%s", reason)

    def _held(self) -> str:
        with self._lock:
            held = self._snapshot.svid if self._snapshot is not None else self._dropped
        return str(held.spiffe_id) if held is not None else str(self.spiffe_id or "its SVID")

    def _no_identity_reason(self) -> str:
        uid = os.getuid()
        return (
            f"the Workload API at {self.address} says this process has no identity "
            f"(PERMISSION_DENIED): its registration entry was deleted or no longer matches "
            f"it. Dropped the SVID of {self._held()}{self._then()}. Register an entry whose "
            f"selectors match this process (uid {uid}), e.g. --selector unix:uid:{uid}; the "
            "sidecar picks it up by itself"
        )

    def _not_offered_reason(self, svids: Sequence[X509Svid]) -> str:
        offered = ", ".join(str(s.spiffe_id) for s in svids)
        return (
            f"the Workload API at {self.address} no longer offers {self.spiffe_id} to this "
            f"process (it offers {offered}): its registration entry was deleted or no longer "
            f"matches it. Dropped that SVID{self._then()}. Register the entry again, or pick "
            "one of those with --spiffe-id; the sidecar picks it up by itself"
        )

    def _then(self) -> str:
        return f"; {self._consequence}" if self._consequence else ""


def _status_code(error: BaseException | None) -> grpc.StatusCode | None:
    """The gRPC status behind a Workload API error (py-spiffe keeps only its name in words)."""
    code = _grpc_code(error) if error is not None else None
    if code is not None:
        return code
    matched = _STATUS_IN_WORDS.search(str(error)) if error is not None else None
    if matched and matched.group(1) in grpc.StatusCode.__members__:
        return grpc.StatusCode[matched.group(1)]
    return None


def connect_x509_source(
    socket: str | None,
    *,
    spiffe_id: SpiffeId | None = None,
    timeout: float = 10.0,
    consequence: str = "",
    socket_setting: str = "--socket",
) -> SidecarX509Source:
    """Wait up to ``timeout`` seconds for the socket and the first SVID; SourceError says why not.

    ``socket`` is ``unix:///path`` or a path; None means ``$SPIFFE_ENDPOINT_SOCKET``. Messages
    name ``socket_setting`` (the flag or config key the user sets) for it.
    """
    if not (socket or os.environ.get(ENDPOINT_SOCKET_ENV)):
        raise SourceError(
            f"no Workload API socket: pass {socket_setting} or set ${ENDPOINT_SOCKET_ENV}, e.g. "
            "unix:///run/tessera/agent.sock"
        )
    address = workload_api_address(socket)
    path = _socket_path(address)
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() >= deadline:
            raise SourceError(
                f"no Tessera agent is listening on {path} (waited {timeout:g}s); start one with "
                "'tessera agent run', or pass its socket with --socket"
            )
        time.sleep(_POLL_SECONDS)
    remaining = max(deadline - time.monotonic(), 0.1)
    try:
        return SidecarX509Source(address, spiffe_id=spiffe_id, timeout=remaining,
                                 consequence=consequence)  # fmt: skip
    except (SourceError, PySpiffeError) as err:
        raise SourceError(_diagnose(address, path, spiffe_id, timeout)) from err


def _socket_path(address: str) -> Path:
    rest = address.removeprefix("unix://").removeprefix("unix:")
    if not rest.startswith("/"):
        raise SourceError(
            f"the Workload API socket {address!r} is not an absolute path; write "
            "unix:///absolute/path/agent.sock"
        )
    return Path(rest)


def _diagnose(address: str, path: Path, spiffe_id: SpiffeId | None, timeout: float) -> str:
    """Why no SVID came: ask the Workload API once and read its status."""
    uid = os.getuid()
    try:
        client = spiffe.WorkloadApiClient(socket_path=address, default_timeout=_PROBE_SECONDS)
        with client:
            svids = client.fetch_x509_svids()
    except PySpiffeError as err:
        code = _grpc_code(err)
        if code == grpc.StatusCode.PERMISSION_DENIED:
            return (
                f"the agent on {path} has no identity for this process (uid {uid}); register "
                f"an entry whose selectors match it, e.g. --selector unix:uid:{uid}"
            )
        return (
            f"cannot get an X509-SVID from the agent on {path} within {timeout:g}s "
            f"({code.name if code else err}); check that 'tessera agent run' is running"
        )
    offered = ", ".join(str(s.spiffe_id) for s in svids) or "none"
    if spiffe_id is not None and all(s.spiffe_id != spiffe_id for s in svids):
        return (
            f"the agent on {path} has no SVID for {spiffe_id} for this process (uid {uid}; it "
            f"offers {offered}); register an entry for {spiffe_id} whose selectors match this "
            "process, or pick one of those with --spiffe-id"
        )
    return (
        f"the agent on {path} sent no X509-SVID within {timeout:g}s; try again, or give it "
        "longer with --timeout"
    )


def _grpc_code(err: BaseException) -> grpc.StatusCode | None:
    cause: BaseException | None = err
    while cause is not None:
        if isinstance(cause, grpc.RpcError) and hasattr(cause, "code"):
            code: grpc.StatusCode = cause.code()
            return code
        cause = cause.__cause__
    return None
