"""Sources: where a service gets its SVIDs and the bundles it verifies peers with.

Everything else in the SDK takes a source, never a certificate, so that
rotation reaches it. Four implementations stand in for each other:

- :class:`WorkloadApiX509Source` / :class:`WorkloadApiJwtSource`: the live
  SPIFFE Workload API (the Tessera agent), updated as the agent rotates;
- :class:`FileX509Source`: ``svid.pem``, ``svid.key`` and ``bundle.pem`` in a
  directory, as ``tessera sidecar files`` writes them, re-read when they change;
- :class:`StaticX509Source`: fixed material, replaced by hand (tests, tools).

::

    with WorkloadApiX509Source() as source:        # $SPIFFE_ENDPOINT_SOCKET
        svid = source.x509_svid()                  # spiffe.X509Svid
        bundle = source.x509_bundle_for(svid.spiffe_id.trust_domain)
        unsubscribe = source.subscribe(lambda: print("rotated"))

    # one of several SVIDs; dropped while the Workload API withdraws it
    source = WorkloadApiX509Source(spiffe_id="spiffe://example.org/api", drop_withdrawn=True)
    snapshot = source.snapshot()                   # the SVID and bundles of one update
    source.no_identity()                           # None, or why it holds no SVID now

The value types are the ``spiffe`` package's (``X509Svid``, ``X509Bundle``,
``JwtSvid``, ``JwtBundle``, ``SpiffeId``, ``TrustDomain``). Errors of the
``spiffe`` package and of grpc become :class:`~sdk.errors.SourceError` here.
Subscribers are called from the source's own thread; they must be quick and
must not raise (a raising subscriber is logged and skipped).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Final, Protocol, Self

import grpc  # type: ignore[import-untyped]
import spiffe
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from spiffe import JwtBundle, JwtSvid, SpiffeId, TrustDomain, X509Bundle, X509Svid
from spiffe.errors import PySpiffeError
from spiffe.workloadapi.workload_api_client import StreamCancelHandler
from spiffe.workloadapi.x509_context import X509Context

from sdk.backoff import Backoff
from sdk.errors import InvalidArgument, SourceError
from sdk.spiffeid import parse_trust_domain

__all__ = [
    "ENDPOINT_SOCKET_ENV",
    "RETRY_SECONDS",
    "ChangeCounter",
    "FileX509Source",
    "JwtBundleSource",
    "JwtSource",
    "StaticX509Source",
    "Unsubscribe",
    "Withdrawal",
    "WorkloadApiJwtSource",
    "WorkloadApiX509Source",
    "X509BundleSource",
    "X509Snapshot",
    "X509Source",
    "workload_api_address",
    "workload_api_status",
]

ENDPOINT_SOCKET_ENV: Final = "SPIFFE_ENDPOINT_SOCKET"
DEFAULT_TIMEOUT_SECONDS: Final = 10.0
RETRY_SECONDS: Final = 2.0
"""The longest wait between two attempts to open the Workload API's X509-SVID stream."""
_FIRST_RETRY_SECONDS: Final = 0.1
_CLOSE_CHECK_SECONDS: Final = 0.5
_STATUS_IN_WORDS: Final = re.compile(r"StatusCode\.([A-Z_]+)")

_log = logging.getLogger(__name__)

Unsubscribe = Callable[[], None]


# -- the protocols -----------------------------------------------------------------------


class X509BundleSource(Protocol):
    """Trust anchors to verify X509-SVIDs with, per trust domain (own and federated)."""

    def x509_bundle_for(self, trust_domain: TrustDomain) -> X509Bundle | None:
        """The bundle of ``trust_domain``, or None if this source does not trust it."""
        ...

    def x509_bundles(self) -> Sequence[X509Bundle]:
        """Every bundle this source has (OpenSSL wants all anchors up front)."""
        ...

    def subscribe(self, callback: Callable[[], None]) -> Unsubscribe:
        """Call ``callback`` after every change; returns a function that stops it."""
        ...


class X509Source(X509BundleSource, Protocol):
    """The workload's own X509-SVID, plus the bundles."""

    def x509_svid(self) -> X509Svid:
        """The current (default) X509-SVID."""
        ...


class JwtBundleSource(Protocol):
    """Keys to validate JWT-SVIDs with, per trust domain."""

    def jwt_bundle_for(self, trust_domain: TrustDomain) -> JwtBundle | None: ...


class JwtSource(JwtBundleSource, Protocol):
    """Mints JWT-SVIDs for the workload, plus the JWT bundles."""

    def fetch_jwt_svid(
        self, audience: str | Iterable[str], subject: SpiffeId | None = None
    ) -> JwtSvid: ...


# -- the Workload API --------------------------------------------------------------------


@dataclass(frozen=True)
class X509Snapshot:
    """The SVID a source serves and the bundles of the same Workload API update."""

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


@dataclass(frozen=True)
class Withdrawal:
    """The Workload API no longer offers the SVID a :class:`WorkloadApiX509Source` serves.

    It says so with ``PERMISSION_DENIED`` (the workload has no identity any
    more: its registration entry was deleted or no longer matches it;
    ``offered`` is empty), or with an update that does not list the SPIFFE ID
    the source serves (``offered`` lists those it does). ``str()`` puts it in
    words; a source's ``explain_withdrawal`` may say it otherwise.
    """

    address: str
    """The Workload API's address."""
    spiffe_id: SpiffeId | None
    """Whose SVID: the one the source had, else the one it asked for (None: the default)."""
    offered: tuple[SpiffeId, ...]
    """The SPIFFE IDs the Workload API offers instead; empty when it offers none."""
    held: X509Svid | None
    """The SVID the source had (serving or dropped); None when it never had one."""
    kept: bool
    """Whether the source goes on serving ``held`` (it was built with ``drop_withdrawn=False``)."""

    def __str__(self) -> str:
        if not self.offered:
            said = (
                f"the Workload API at {self.address} says this process has no identity "
                "(PERMISSION_DENIED): its registration entry was deleted or no longer matches it"
            )
        else:
            offered = ", ".join(str(spiffe_id) for spiffe_id in self.offered)
            verb = "no longer offers" if self.held is not None else "offers no SVID for"
            said = (
                f"the Workload API at {self.address} {verb} {self.spiffe_id} (it offers {offered})"
            )
        if self.held is None:
            return said
        if self.kept:
            return (
                f"{said}; keeping the SVID held until now, which expires at "
                f"{self.held.leaf.not_valid_after_utc}"
            )
        return f"{said}; dropped the SVID of {self.held.spiffe_id} until one is issued again"


class WorkloadApiX509Source:
    """The X509-SVID and bundles streamed by the Workload API (``FetchX509SVID``).

    ``socket_path`` is ``unix:///path/agent.sock`` or a plain absolute path;
    without it, ``$SPIFFE_ENDPOINT_SOCKET``. The source serves the first SVID
    the Workload API lists (the default), or with ``spiffe_id`` that identity's
    when the workload has several. The constructor waits up to ``timeout``
    seconds for the first SVID and raises SourceError if none comes (no agent,
    no identity for this workload, or none for ``spiffe_id``).

    It follows the stream on a thread of its own and opens it again by itself
    (after 0.1 s, doubling up to ``retry_seconds``):

    - the agent unreachable or the stream ended: the SVID held is kept (it
      stays valid until it expires) and the stream is opened again;
    - the SVID is withdrawn (a :class:`Withdrawal`: ``PERMISSION_DENIED``, or
      an update without ``spiffe_id``): one ERROR is logged, in the words of
      ``explain_withdrawal``. By default the source keeps serving the SVID
      held, which peers refuse once it expires; with ``drop_withdrawn`` it
      drops it: :meth:`snapshot` and :meth:`x509_svid` raise SourceError and
      :meth:`no_identity` says why (subscribers are not told: there is nothing
      new to build). :meth:`withdrawn` says why either way, and the first
      update that offers the SVID again brings it back, with a WARNING;
    - ``INVALID_ARGUMENT`` (the agent refuses the client itself): the source
      stops following the stream, and :meth:`problem` says why.

    It logs on ``logger`` (default: this module's).
    """

    def __init__(
        self,
        socket_path: str | None = None,
        *,
        spiffe_id: SpiffeId | str | None = None,
        timeout: float = DEFAULT_TIMEOUT_SECONDS,
        drop_withdrawn: bool = False,
        explain_withdrawal: Callable[[Withdrawal], str] = str,
        retry_seconds: float = RETRY_SECONDS,
        logger: logging.Logger | None = None,
    ) -> None:
        self.address = workload_api_address(socket_path)
        self._drop_withdrawn = drop_withdrawn
        self._explain = explain_withdrawal
        self._retry_seconds = retry_seconds
        self._log = logger or _log
        self._lock = threading.Lock()
        self._snapshot: X509Snapshot | None = None
        self._dropped: X509Svid | None = None
        self._withdrawn: str | None = None
        self._failed: str | None = None
        self._subscribers = _Subscribers()
        self._closing = threading.Event()
        self._first = threading.Event()
        self._stream: StreamCancelHandler | None = None
        with _translated(f"cannot get an X509-SVID from the Workload API at {self.address}"):
            self.spiffe_id = SpiffeId(spiffe_id) if isinstance(spiffe_id, str) else spiffe_id
            self._client = spiffe.WorkloadApiClient(socket_path=self.address)
        threading.Thread(target=self._watch, name="tessera-workload-api-x509",
                         daemon=True).start()  # fmt: skip
        if not self._first.wait(timeout) or self._failed:
            reason = self._failed or self._withdrawn or (
                f"cannot get an X509-SVID from the Workload API at {self.address}: none came "
                f"within {timeout:g}s"
            )
            self.close()
            raise SourceError(reason)

    def snapshot(self) -> X509Snapshot:
        """The SVID and the bundles of the same update (so files written from them match)."""
        with self._lock:
            if self._closing.is_set():
                raise SourceError(f"the Workload API source for {self.address} is closed")
            if self._snapshot is None:
                raise SourceError(
                    self._withdrawn or self._failed or f"no X509-SVID from {self.address}"
                )
            return self._snapshot

    def x509_svid(self) -> X509Svid:
        return self.snapshot().svid

    def x509_bundle_for(self, trust_domain: TrustDomain) -> X509Bundle | None:
        return self.snapshot().bundle_for(trust_domain)

    def x509_bundles(self) -> Sequence[X509Bundle]:
        return self.snapshot().bundles

    def subscribe(self, callback: Callable[[], None]) -> Unsubscribe:
        return self._subscribers.add(callback)

    def withdrawn(self) -> str | None:
        """Why the Workload API no longer offers the SVID (kept or dropped), or None."""
        with self._lock:
            return self._withdrawn

    def no_identity(self) -> str | None:
        """Why the source holds no SVID now (it dropped a withdrawn one), or None."""
        with self._lock:
            return self._withdrawn if self._snapshot is None else None

    def problem(self) -> str | None:
        """Why the source stopped following the Workload API for good, or None."""
        if self._closing.is_set():
            return None
        return self._failed

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

    # -- following the stream ----------------------------------------------------------------

    def _watch(self) -> None:
        backoff = Backoff(
            initial=min(_FIRST_RETRY_SECONDS, self._retry_seconds), maximum=self._retry_seconds
        )
        while not self._closing.is_set():
            received, error = self._follow_stream()
            if self._closing.is_set():
                return
            if received:
                backoff.reset()
            delay = backoff.next()
            code = workload_api_status(error)
            if code == grpc.StatusCode.PERMISSION_DENIED:
                self._withdraw(offered=())
            elif code == grpc.StatusCode.INVALID_ARGUMENT:
                self._failed = (
                    f"the Workload API at {self.address} refused this client ({error}); "
                    "restart this process once the agent serves this workload again"
                )
                self._log.error("%s", self._failed)
                self._first.set()
                return
            else:
                self._log.debug("the Workload API stream at %s ended (%s); keeping the SVID "
                                "held and reconnecting in %gs", self.address, error,
                                delay)  # fmt: skip
            if self._closing.wait(delay):
                return

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
        if self._closing.is_set():
            return
        svids = list(context.x509_svids)
        bundles = tuple(context.x509_bundle_set.bundles)
        if self.spiffe_id is None:
            chosen = svids[0] if svids else None
        else:
            chosen = next((svid for svid in svids if svid.spiffe_id == self.spiffe_id), None)
        if chosen is None:
            self._withdraw(offered=tuple(svid.spiffe_id for svid in svids), bundles=bundles)
            return
        with self._lock:
            if self._withdrawn is not None and self._first.is_set():
                # Said before the SVID is back in use, so whoever sees it back sees this too.
                self._log.warning("the Workload API at %s issued an SVID for %s again; using it "
                                  "from now on", self.address, chosen.spiffe_id)  # fmt: skip
            self._snapshot = X509Snapshot(chosen, bundles)
            self._withdrawn = None
            self._dropped = None
        self._first.set()
        self._subscribers.notify()

    def _withdraw(
        self, *, offered: tuple[SpiffeId, ...], bundles: tuple[X509Bundle, ...] | None = None
    ) -> None:
        """The Workload API no longer offers the SVID: keep it (with the update's bundles) or
        drop it, and log why once per withdrawal. Only the stream's thread calls this."""
        with self._lock:
            serving = self._snapshot
            first_notice = self._withdrawn is None
        held = serving.svid if serving is not None else self._dropped
        keep = serving is not None and not self._drop_withdrawn
        withdrawal = Withdrawal(
            address=self.address,
            spiffe_id=held.spiffe_id if held is not None else self.spiffe_id,
            offered=offered,
            held=held,
            kept=keep,
        )
        reason = self._explain(withdrawal)
        if first_notice and serving is not None:  # at start, the constructor raises it instead
            # Said before the SVID is dropped, so whoever sees it gone sees this too.
            self._log.error("%s", reason)
        with self._lock:
            self._withdrawn = reason
            if serving is not None and keep and bundles is not None:
                self._snapshot = X509Snapshot(serving.svid, bundles)
            elif serving is not None and not keep:
                self._snapshot = None
                self._dropped = serving.svid
        if keep and bundles is not None:
            self._subscribers.notify()


class WorkloadApiJwtSource:
    """JWT-SVIDs fetched from the Workload API, and the JWT bundles it streams."""

    def __init__(
        self, socket_path: str | None = None, *, timeout: float = DEFAULT_TIMEOUT_SECONDS
    ) -> None:
        self.address = workload_api_address(socket_path)
        self._timeout = timeout
        with _translated(f"cannot get the JWT bundles from the Workload API at {self.address}"):
            self._source = spiffe.JwtSource(socket_path=self.address, timeout_in_seconds=timeout)

    def fetch_jwt_svid(
        self, audience: str | Iterable[str], subject: SpiffeId | None = None
    ) -> JwtSvid:
        audiences = {audience} if isinstance(audience, str) else set(audience)
        if not audiences:
            raise SourceError("a JWT-SVID needs at least one audience")
        with _translated(f"cannot fetch a JWT-SVID for audience {sorted(audiences)}"):
            return self._source.fetch_svid(audiences, subject, timeout=self._timeout)

    def jwt_bundle_for(self, trust_domain: TrustDomain) -> JwtBundle | None:
        with _translated("cannot read the JWT bundles from the Workload API"):
            return self._source.get_bundle_for_trust_domain(trust_domain)

    def close(self) -> None:
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


def workload_api_address(socket_path: str | None) -> str:
    """``unix://`` address of the Workload API: the argument, else ``$SPIFFE_ENDPOINT_SOCKET``."""
    value = socket_path or os.environ.get(ENDPOINT_SOCKET_ENV)
    if not value:
        raise SourceError(
            f"no Workload API socket: pass socket_path or set {ENDPOINT_SOCKET_ENV}, "
            "e.g. unix:///run/tessera/agent.sock"
        )
    return f"unix://{value}" if value.startswith("/") else value


def workload_api_status(error: BaseException | None) -> grpc.StatusCode | None:
    """The gRPC status behind a Workload API error (the ``spiffe`` package keeps the
    grpc error as a cause, or only the status's name in its words)."""
    cause = error
    while cause is not None:
        if isinstance(cause, grpc.RpcError) and hasattr(cause, "code"):
            code: grpc.StatusCode = cause.code()
            return code
        cause = cause.__cause__
    matched = _STATUS_IN_WORDS.search(str(error)) if error is not None else None
    if matched and matched.group(1) in grpc.StatusCode.__members__:
        return grpc.StatusCode[matched.group(1)]
    return None


@contextlib.contextmanager
def _translated(what: str) -> Iterator[None]:
    """The one boundary where the spiffe package's (and grpc's) errors become SourceError."""
    try:
        yield
    except PySpiffeError as err:
        raise SourceError(f"{what}: {err}") from err


# -- files -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _FileState:
    digest: bytes
    svid: X509Svid
    bundles: Mapping[TrustDomain, X509Bundle]


class FileX509Source:
    """An X509-SVID, its key and bundles read from PEM files, re-read when they change.

    ``directory`` holds ``svid.pem`` (leaf then intermediates), ``svid.key``
    (PKCS#8) and ``bundle.pem`` (the CA certificates of the SVID's trust
    domain). ``federated_bundles`` maps other trust domains to PEM files.

    Every ``poll_interval`` seconds a background thread calls :meth:`refresh`;
    pass ``poll_interval=None`` to call it yourself. A half-written set (say a
    new certificate next to the old key) is skipped and read again next time;
    the source keeps serving what it last read whole.
    """

    def __init__(
        self,
        directory: str | Path,
        *,
        svid_file: str = "svid.pem",
        key_file: str = "svid.key",
        bundle_file: str = "bundle.pem",
        federated_bundles: Mapping[str, str | Path] | None = None,
        poll_interval: float | None = 1.0,
    ) -> None:
        directory = Path(directory)
        self._svid_path = directory / svid_file
        self._key_path = directory / key_file
        self._bundle_path = directory / bundle_file
        self._federated: dict[TrustDomain, Path] = {}
        for name, path in (federated_bundles or {}).items():
            try:
                self._federated[parse_trust_domain(name)] = Path(path)
            except InvalidArgument as err:
                raise SourceError(f"federated_bundles: {err.message}") from err
        self._lock = threading.Lock()
        self._subscribers = _Subscribers()
        self._state = self._read()
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None
        if poll_interval is not None:
            self._poller = threading.Thread(
                target=self._poll, args=(poll_interval,), name="tessera-file-source", daemon=True
            )
            self._poller.start()

    def x509_svid(self) -> X509Svid:
        with self._lock:
            return self._state.svid

    def x509_bundle_for(self, trust_domain: TrustDomain) -> X509Bundle | None:
        with self._lock:
            return self._state.bundles.get(trust_domain)

    def x509_bundles(self) -> Sequence[X509Bundle]:
        with self._lock:
            return list(self._state.bundles.values())

    def subscribe(self, callback: Callable[[], None]) -> Unsubscribe:
        return self._subscribers.add(callback)

    def refresh(self) -> bool:
        """Re-read the files; True (and subscribers called) if they changed and read whole."""
        try:
            state = self._read()
        except SourceError as err:
            _log.warning("keeping the X509-SVID read before: %s", err)
            return False
        with self._lock:
            if state.digest == self._state.digest:
                return False
            self._state = state
        _log.info("read a new X509-SVID for %s from %s", state.svid.spiffe_id, self._svid_path)
        self._subscribers.notify()
        return True

    def close(self) -> None:
        self._stop.set()
        if self._poller is not None and self._poller is not threading.current_thread():
            self._poller.join()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _poll(self, interval: float) -> None:
        while not self._stop.wait(interval):
            self.refresh()

    def _read(self) -> _FileState:
        paths = [self._svid_path, self._key_path, self._bundle_path, *self._federated.values()]
        contents = {path: _read_file(path) for path in paths}
        digest = hashlib.sha256(b"\0".join(contents[p] for p in paths)).digest()
        try:
            svid = X509Svid.parse(contents[self._svid_path], contents[self._key_path])
        except PySpiffeError as err:
            raise SourceError(
                f"{self._svid_path} and {self._key_path} are not a valid X509-SVID: {err}"
            ) from err
        if _spki(svid.leaf) != _spki_of_key(svid):
            raise SourceError(
                f"the key in {self._key_path} does not belong to the certificate in "
                f"{self._svid_path} (files written at different times?)"
            )
        bundles = {}
        trust_domain = svid.spiffe_id.trust_domain
        for domain, path in [(trust_domain, self._bundle_path), *self._federated.items()]:
            if b"-----BEGIN CERTIFICATE-----" not in contents[path]:
                raise SourceError(
                    f"{path} holds no PEM certificate; it should hold the CA certificates "
                    f"of trust domain {domain.name}"
                )
            try:
                bundles[domain] = X509Bundle.parse(domain, contents[path])
            except PySpiffeError as err:
                raise SourceError(f"{path} is not a PEM bundle: {err}") from err
        return _FileState(digest=digest, svid=svid, bundles=bundles)


def _read_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        raise SourceError(f"cannot read {path}: {err.strerror or err}") from err


def _spki(certificate: x509.Certificate) -> bytes:
    return certificate.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _spki_of_key(svid: X509Svid) -> bytes:
    return svid.private_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


# -- fixed material ----------------------------------------------------------------------


class StaticX509Source:
    """An X509-SVID and bundles held in memory; :meth:`update` replaces them and notifies."""

    def __init__(self, svid: X509Svid, bundles: Iterable[X509Bundle]) -> None:
        self._lock = threading.Lock()
        self._svid = svid
        self._bundles = _by_trust_domain(bundles)
        self._subscribers = _Subscribers()

    def x509_svid(self) -> X509Svid:
        with self._lock:
            return self._svid

    def x509_bundle_for(self, trust_domain: TrustDomain) -> X509Bundle | None:
        with self._lock:
            return self._bundles.get(trust_domain)

    def x509_bundles(self) -> Sequence[X509Bundle]:
        with self._lock:
            return list(self._bundles.values())

    def subscribe(self, callback: Callable[[], None]) -> Unsubscribe:
        return self._subscribers.add(callback)

    def update(
        self, *, svid: X509Svid | None = None, bundles: Iterable[X509Bundle] | None = None
    ) -> None:
        """Replace the SVID and/or all the bundles, then call the subscribers."""
        with self._lock:
            if svid is not None:
                self._svid = svid
            if bundles is not None:
                self._bundles = _by_trust_domain(bundles)
        self._subscribers.notify()


def _by_trust_domain(bundles: Iterable[X509Bundle]) -> dict[TrustDomain, X509Bundle]:
    return {bundle.trust_domain: bundle for bundle in bundles}


# -- subscriptions -----------------------------------------------------------------------


class ChangeCounter:
    """Counts a source's changes, for code that rebuilds something lazily when it moved.

    The subscription holds the counter weakly and ends when the counter is
    collected, so a forgotten counter does not stay subscribed forever::

        changes = ChangeCounter(source)
        if changes.value != built_for: ...rebuild...
    """

    def __init__(self, source: X509BundleSource) -> None:
        self._lock = threading.Lock()
        self._value = 0
        this = weakref.ref(self)

        def changed() -> None:
            counter = this()
            if counter is not None:
                counter._increment()

        weakref.finalize(self, source.subscribe(changed))

    @property
    def value(self) -> int:
        with self._lock:
            return self._value

    def _increment(self) -> None:
        with self._lock:
            self._value += 1


class _Subscribers:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._callbacks: list[Callable[[], None]] = []

    def add(self, callback: Callable[[], None]) -> Unsubscribe:
        with self._lock:
            self._callbacks.append(callback)

        def unsubscribe() -> None:
            with self._lock, contextlib.suppress(ValueError):
                self._callbacks.remove(callback)

        return unsubscribe

    def notify(self) -> None:
        with self._lock:
            callbacks = list(self._callbacks)
        for callback in callbacks:
            try:
                callback()
            except Exception:
                _log.exception("a source subscriber failed")
