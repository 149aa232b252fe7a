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
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Final, Protocol, Self

import spiffe
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from spiffe import JwtBundle, JwtSvid, SpiffeId, TrustDomain, X509Bundle, X509Svid
from spiffe.errors import PySpiffeError

from sdk.errors import InvalidArgument, SourceError
from sdk.spiffeid import parse_trust_domain

__all__ = [
    "ENDPOINT_SOCKET_ENV",
    "ChangeCounter",
    "FileX509Source",
    "JwtBundleSource",
    "JwtSource",
    "SpiffeIdPicker",
    "StaticX509Source",
    "Unsubscribe",
    "WorkloadApiJwtSource",
    "WorkloadApiX509Source",
    "X509BundleSource",
    "X509Source",
]

ENDPOINT_SOCKET_ENV: Final = "SPIFFE_ENDPOINT_SOCKET"
DEFAULT_TIMEOUT_SECONDS: Final = 10.0

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


class SpiffeIdPicker:
    """Picks one SPIFFE ID's SVID when the Workload API gives a workload several (py-spiffe's
    ``svid_picker``): the wanted ID; if an update no longer offers it, the SVID picked
    before (logged: it is kept until it expires); SourceError if it was never offered."""

    def __init__(self, spiffe_id: SpiffeId | str) -> None:
        self.spiffe_id = spiffe_id if isinstance(spiffe_id, SpiffeId) else SpiffeId(spiffe_id)
        self._lock = threading.Lock()
        self._picked: X509Svid | None = None

    def __call__(self, svids: list[X509Svid]) -> X509Svid:
        wanted = self.spiffe_id
        with self._lock:
            for svid in svids:
                if svid.spiffe_id == wanted:
                    self._picked = svid
                    return svid
            offered = ", ".join(str(s.spiffe_id) for s in svids) or "none"
            if self._picked is not None:
                _log.error(
                    "the Workload API no longer offers %s (it offers %s); keeping the SVID "
                    "held until now, which expires at %s",
                    wanted, offered, self._picked.leaf.not_valid_after_utc,
                )  # fmt: skip
                return self._picked
            raise SourceError(f"no SVID for {wanted} (the Workload API offers {offered})")


class WorkloadApiX509Source:
    """The X509-SVID and bundles streamed by the Workload API (``FetchX509SVID``).

    ``socket_path`` is ``unix:///path/agent.sock`` or a plain absolute path;
    without it, ``$SPIFFE_ENDPOINT_SOCKET``. The source serves the first SVID
    the Workload API lists (the default), or with ``spiffe_id`` that identity's
    when the workload has several. The constructor waits up to ``timeout``
    seconds for the first SVID and raises SourceError if none comes (no agent,
    no identity for this workload, or none for ``spiffe_id``).
    """

    def __init__(
        self,
        socket_path: str | None = None,
        *,
        spiffe_id: SpiffeId | str | None = None,
        timeout: float = DEFAULT_TIMEOUT_SECONDS,
    ) -> None:
        self.address = workload_api_address(socket_path)
        with _translated(f"cannot get an X509-SVID from the Workload API at {self.address}"):
            picker = SpiffeIdPicker(spiffe_id) if spiffe_id is not None else None
            self._source = spiffe.X509Source(
                socket_path=self.address, timeout_in_seconds=timeout, svid_picker=picker
            )

    def x509_svid(self) -> X509Svid:
        with _translated("cannot read the X509-SVID from the Workload API"):
            return self._source.get_x509_context().default_svid

    def x509_bundle_for(self, trust_domain: TrustDomain) -> X509Bundle | None:
        with _translated("cannot read the X.509 bundles from the Workload API"):
            return self._source.get_bundle_for_trust_domain(trust_domain)

    def x509_bundles(self) -> Sequence[X509Bundle]:
        with _translated("cannot read the X.509 bundles from the Workload API"):
            return list(self._source.get_x509_context().x509_bundle_set.bundles)

    def subscribe(self, callback: Callable[[], None]) -> Unsubscribe:
        self._source.subscribe_for_updates(callback)
        return lambda: self._source.unsubscribe_for_updates(callback)

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
