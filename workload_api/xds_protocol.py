"""The xDS state-of-the-world protocol of one stream: subscriptions, versions, nonces, ACK/NACK.

Pure bookkeeping, no I/O: the stream's loop (:mod:`workload_api.xds_server`) feeds it
each request Envoy sends and asks it, after every event, which responses to send::

    state = DiscoveryState()
    for outcome in state.receive(request):        # Subscribed, Ack, Nack or Stale
        ...
    for response in state.responses(select):      # select(type_url, names) -> {name: Any}
        await stream.send_message(response)

The rules, per type URL (the xDS protocol's, as Envoy follows them):

- **Subscriptions.** A request names the resources it wants (``resource_names``). For
  the wildcard types (listeners, clusters), no names (or ``*``) means every resource,
  and every response carries all of them. For the others, the names are the whole
  subscription; a response carries those of them that exist, and none is sent while
  none exists (Envoy keeps waiting rather than taking an empty answer for a removal).
- **Versions.** ``version_info`` is a digest of the resources sent, so the same
  resources always have the same version, on every stream and after a restart; a
  response is sent when the digest differs from the last one sent, or when a request
  is owed one (the first of its type, or a changed subscription).
- **Nonces.** Each response has a new nonce. A request that echoes the latest one
  answers that response: an **ACK** (no ``error_detail``; ``version_info`` is now
  Envoy's) or a **NACK** (``error_detail`` says why; Envoy keeps its previous version,
  and the refused resources are not sent again until they change). A request echoing
  an older nonce was sent before Envoy saw the latest response: it is ignored (**stale**),
  since the answer to the latest one brings its subscription again.

Bounds on what a peer controls are checked here (:class:`RequestLimits`): names per
request and their length, the length of a type URL, and how many types one stream may
subscribe to.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from envoy.service.discovery.v3 import discovery_pb2
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from workload_api.xds import PUSH_ORDER, WILDCARD_TYPES

__all__ = [
    "Ack",
    "DiscoveryState",
    "Nack",
    "Outcome",
    "RequestLimits",
    "Select",
    "Stale",
    "Subscribed",
    "resource_version",
]

MAX_RESOURCE_NAMES: Final = 10_000
MAX_NAME_CHARS: Final = 1024
MAX_TYPE_URL_CHARS: Final = 256
MAX_TYPES_PER_STREAM: Final = 32
VERSION_DIGEST_CHARS: Final = 16

Select = Callable[[str, "frozenset[str] | None"], Mapping[str, Any]]
"""``(type_url, names)`` -> name -> the resource packed in an ``Any``; ``names`` None
means every resource of the type."""

_WILDCARD: Final = "*"
# The generated module builds its classes at import time, out of mypy's sight.
_discovery: Any = discovery_pb2
_RANK: Final = {type_url: rank for rank, type_url in enumerate(PUSH_ORDER)}


@dataclass(frozen=True)
class RequestLimits:
    """What one discovery request, and one stream, may ask of the agent."""

    max_resource_names: int = MAX_RESOURCE_NAMES
    max_name_chars: int = MAX_NAME_CHARS
    max_type_url_chars: int = MAX_TYPE_URL_CHARS
    max_types: int = MAX_TYPES_PER_STREAM


@dataclass(frozen=True)
class Subscribed:
    """The first request of a type, or one that changed what it asks for."""

    type_url: str
    names: frozenset[str] | None
    """None: every resource of the type."""


@dataclass(frozen=True)
class Ack:
    type_url: str
    version: str


@dataclass(frozen=True)
class Nack:
    type_url: str
    version: str
    """The version Envoy refused."""
    kept_version: str
    """The version it goes on with ("" if none yet)."""
    reason: str


@dataclass(frozen=True)
class Stale:
    """A request that echoes an older nonce than the latest response's: ignored."""

    type_url: str
    nonce: str


Outcome = Subscribed | Ack | Nack | Stale


@dataclass
class _Subscription:
    names: frozenset[str] | None
    owed: bool = True
    """A response is due whatever the version (a new or changed subscription)."""
    nonce: str = ""
    """Of the latest response sent."""
    sent_version: str | None = None
    acked_version: str = ""


class DiscoveryState:
    """The subscriptions of one stream and what was sent on it.

    ``wildcard_types`` are those for which no names means every resource (by default
    listeners and clusters; the dedicated SDS stream adds secrets, as SPIRE's does).
    ``default_type_url`` stands in for a request without one, and ``only_types`` (if
    given) are the types the stream serves (the SDS stream's: secrets).
    """

    def __init__(
        self,
        *,
        wildcard_types: Iterable[str] = WILDCARD_TYPES,
        default_type_url: str = "",
        only_types: Iterable[str] | None = None,
        limits: RequestLimits | None = None,
    ) -> None:
        self._wildcard_types = frozenset(wildcard_types)
        self._default_type_url = default_type_url
        self._only_types = frozenset(only_types) if only_types is not None else None
        self._limits = limits or RequestLimits()
        self._subscriptions: dict[str, _Subscription] = {}
        self._nonces = 0

    def subscriptions(self) -> dict[str, frozenset[str] | None]:
        """Type URL -> the names subscribed to (None: every resource)."""
        return {type_url: sub.names for type_url, sub in self._subscriptions.items()}

    def acked_version(self, type_url: str) -> str:
        sub = self._subscriptions.get(type_url)
        return sub.acked_version if sub is not None else ""

    def receive(self, request: Any) -> list[Outcome]:
        """Take one ``DiscoveryRequest``; what it meant. Raises ``GRPCError`` when it asks
        for more than :class:`RequestLimits` allow."""
        type_url = request.type_url or self._default_type_url
        names = self._requested_names(type_url, request.resource_names)
        sub = self._subscriptions.get(type_url)
        if sub is None:
            if len(self._subscriptions) >= self._limits.max_types:
                raise GRPCError(
                    Status.RESOURCE_EXHAUSTED,
                    f"one discovery stream may subscribe to at most {self._limits.max_types} "
                    "resource types",
                )
            self._subscriptions[type_url] = _Subscription(
                names=names, acked_version=request.version_info
            )
            return [Subscribed(type_url, names)]
        outcomes: list[Outcome] = []
        nonce = request.response_nonce
        if nonce and sub.nonce:
            if nonce != sub.nonce:
                return [Stale(type_url, nonce)]
            if request.HasField("error_detail"):
                outcomes.append(
                    Nack(
                        type_url,
                        sub.sent_version or "",
                        request.version_info,
                        request.error_detail.message,
                    )
                )
            else:
                sub.acked_version = request.version_info
                outcomes.append(Ack(type_url, request.version_info))
        elif not nonce:
            sub.owed = True  # asked again from scratch: answer even if nothing changed
        if names != sub.names:
            sub.names = names
            sub.owed = True
            outcomes.append(Subscribed(type_url, names))
        return outcomes

    def responses(self, select: Select) -> list[Any]:
        """The ``DiscoveryResponse`` messages to send now, in :data:`PUSH_ORDER`."""
        responses = []
        for type_url in sorted(self._subscriptions, key=_push_rank):
            sub = self._subscriptions[type_url]
            selected = select(type_url, sub.names)
            if not selected and type_url not in WILDCARD_TYPES:
                continue  # nothing of what it asked for exists: Envoy keeps waiting
            version = resource_version(selected.items())
            if not sub.owed and version == sub.sent_version:
                continue
            self._nonces += 1
            sub.nonce, sub.sent_version, sub.owed = str(self._nonces), version, False
            responses.append(
                _discovery.DiscoveryResponse(
                    version_info=version,
                    type_url=type_url,
                    nonce=sub.nonce,
                    resources=[selected[name] for name in sorted(selected)],
                )
            )
        return responses

    def _requested_names(self, type_url: str, names: Any) -> frozenset[str] | None:
        limits = self._limits
        if len(type_url) > limits.max_type_url_chars:
            raise GRPCError(
                Status.INVALID_ARGUMENT,
                f"the type_url is {len(type_url)} characters long, more than the "
                f"{limits.max_type_url_chars} the Tessera agent accepts",
            )
        if not type_url:
            raise GRPCError(Status.INVALID_ARGUMENT, "a discovery request must name its type_url")
        if self._only_types is not None and type_url not in self._only_types:
            raise GRPCError(
                Status.INVALID_ARGUMENT,
                f"this discovery stream serves {', '.join(sorted(self._only_types))}, "
                f"not {type_url}; ask for it over ADS",
            )
        if len(names) > limits.max_resource_names:
            raise GRPCError(
                Status.RESOURCE_EXHAUSTED,
                f"the request names {len(names)} resources, more than the "
                f"{limits.max_resource_names} the Tessera agent accepts in one request",
            )
        requested = frozenset(names)
        longest = max(requested, key=len, default="")
        if len(longest) > limits.max_name_chars:
            raise GRPCError(
                Status.INVALID_ARGUMENT,
                f"a resource name is {len(longest)} characters long, more than the "
                f"{limits.max_name_chars} the Tessera agent accepts: {longest[:80]!r}...",
            )
        if type_url in self._wildcard_types and (not requested or _WILDCARD in requested):
            return None
        return requested


def resource_version(resources: Iterable[tuple[str, Any]]) -> str:
    """The version of a set of (name, packed ``Any``) resources: a digest of their bytes,
    so equal resources have equal versions wherever and whenever they are served."""
    digest = hashlib.sha256()
    for name, resource in sorted(resources, key=lambda item: item[0]):
        for part in (name.encode(), resource.type_url.encode(), resource.value):
            digest.update(len(part).to_bytes(8, "big"))
            digest.update(part)
    return digest.hexdigest()[:VERSION_DIGEST_CHARS]


def _push_rank(type_url: str) -> tuple[int, str]:
    return (_RANK.get(type_url, len(_RANK)), type_url)
