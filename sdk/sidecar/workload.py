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
  workload (the Workload API's default, the first one, otherwise). If a later
  update lacks that ID, it keeps the SVID it had and logs an ERROR;
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
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Final, Protocol, Self

import grpc  # type: ignore[import-untyped]
import spiffe
from spiffe import SpiffeId, TrustDomain, X509Bundle, X509Svid
from spiffe.errors import PySpiffeError

from sdk.errors import SourceError
from sdk.sources import SpiffeIdPicker, Unsubscribe, workload_api_address

__all__ = ["SidecarX509Source", "SnapshotSource", "X509Snapshot", "connect_x509_source"]

_log = logging.getLogger(__name__)

_POLL_SECONDS: Final = 0.1
_PROBE_SECONDS: Final = 2.0


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


class SidecarX509Source:
    """An :class:`sdk.sources.X509Source` over the Workload API that serves one chosen SVID.

    Build it with :func:`connect_x509_source`, which turns start-up failures
    into sentences.
    """

    def __init__(self, address: str, *, spiffe_id: SpiffeId | None, timeout: float) -> None:
        self.address = address
        self.spiffe_id = spiffe_id
        self._closing = False
        picker = SpiffeIdPicker(spiffe_id) if spiffe_id is not None else None
        self._source = spiffe.X509Source(
            socket_path=address, timeout_in_seconds=timeout, svid_picker=picker
        )

    def snapshot(self) -> X509Snapshot:
        with self._translated():
            context = self._source.get_x509_context()
        return X509Snapshot(context.default_svid, tuple(context.x509_bundle_set.bundles))

    def x509_svid(self) -> X509Svid:
        return self.snapshot().svid

    def x509_bundle_for(self, trust_domain: TrustDomain) -> X509Bundle | None:
        with self._translated():
            return self._source.get_bundle_for_trust_domain(trust_domain)

    def x509_bundles(self) -> Sequence[X509Bundle]:
        return self.snapshot().bundles

    def subscribe(self, callback: Callable[[], None]) -> Unsubscribe:
        self._source.subscribe_for_updates(callback)
        return lambda: self._source.unsubscribe_for_updates(callback)

    def problem(self) -> str | None:
        """Why the source stopped delivering (its stream failed for good), or None."""
        if self._closing or not self._source.is_closed():
            return None
        return (
            f"the Workload API stream at {self.address} failed and was closed (the log above "
            "says why); restart the sidecar once the agent serves this workload again"
        )

    def close(self) -> None:
        self._closing = True
        self._source.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @contextlib.contextmanager
    def _translated(self) -> Iterator[None]:
        try:
            yield
        except PySpiffeError as err:
            raise SourceError(f"cannot read the X509-SVID from {self.address}: {err}") from err


def connect_x509_source(
    socket: str | None, *, spiffe_id: SpiffeId | None = None, timeout: float = 10.0
) -> SidecarX509Source:
    """Wait up to ``timeout`` seconds for the socket and the first SVID; SourceError says why not.

    ``socket`` is ``unix:///path`` or a path; None means ``$SPIFFE_ENDPOINT_SOCKET``.
    """
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
        with _quiet(logging.getLogger("spiffe.workloadapi.x509_source")):  # we say it better
            return SidecarX509Source(address, spiffe_id=spiffe_id, timeout=remaining)
    except PySpiffeError as err:
        raise SourceError(_diagnose(address, path, spiffe_id, timeout)) from err


@contextlib.contextmanager
def _quiet(logger: logging.Logger) -> Iterator[None]:
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


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
