"""SDS and ADS as grpclib services on the agent's socket (what they serve: :mod:`workload_api.xds`).

Both services run one loop per stream (:class:`_Session`):

1. the first request must describe the Envoy node (``node.id`` and ``node.cluster``,
   else ``INVALID_ARGUMENT`` with a sentence); the caller's pid/uid/gid come from the
   kernel (``SO_PEERCRED``) and are attested by the identity provider, once per stream;
2. then the loop waits for whichever comes first: a request (subscriptions, ACK,
   NACK: :mod:`workload_api.xds_protocol`), a change of the caller's identity (an SVID
   rotated: its secrets are built again), a change of the :class:`ResourceSource`, or
   the server closing (the stream ends with ``UNAVAILABLE``);
3. after each, it sends what is due, in :data:`~workload_api.xds.PUSH_ORDER`.

A NACK is logged at WARNING with Envoy's reason and kept in :class:`DiscoveryStatus`;
a secret the caller may not have is logged once at INFO. Resources from the source
arrive as Envoy JSON and are checked against Envoy's API here: one that does not parse
is left out and logged once at ERROR (a bug in whatever made it).

The incremental (delta) variants answer ``UNIMPLEMENTED`` with what to configure instead.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import pkgutil
from collections.abc import Awaitable, Callable, Iterable, Mapping
from datetime import UTC, datetime
from typing import Any, Final

from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2, descriptor_pool, json_format, message_factory
from grpclib.const import Cardinality, Handler, Status
from grpclib.exceptions import GRPCError, StreamTerminatedError
from grpclib.server import Stream
from prometheus_client import Counter

from attestor.selector import Selector
from attestor.workload import PeerCredentials
from sdk.errors import InvalidArgument, TesseraError, Unavailable
from workload_api.grpc_limits import RefusalLog, describe_peer
from workload_api.identity import IdentityProvider, X509Context
from workload_api.sds import IdentitySecrets
from workload_api.server import (
    SHUTTING_DOWN,
    ExtraService,
    caller_credentials,
    grpc_status,
    receive_request,
)
from workload_api.xds import (
    MAX_REASON_CHARS,
    SECRET_TYPE,
    AttestedProxy,
    DiscoveryStatus,
    NodeInfo,
    Rejection,
    Resources,
    ResourceSource,
)
from workload_api.xds_protocol import (
    MAX_NAME_CHARS,
    Ack,
    DiscoveryState,
    Nack,
    RequestLimits,
    Stale,
    Subscribed,
)

__all__ = [
    "AggregatedDiscoveryService",
    "SecretDiscoveryService",
    "discovery_services",
    "node_info",
    "pack_resources",
]

XDS_CALLS: Final = Counter(
    "tessera_agent_xds_calls_total",
    "Envoy discovery calls (SDS, ADS), by method and the gRPC status they ended with",
    ["method", "status"],
)
XDS_RESPONSES: Final = Counter(
    "tessera_agent_xds_responses_total", "Discovery responses sent to Envoy, by type", ["type"]
)
XDS_REJECTIONS: Final = Counter(
    "tessera_agent_xds_rejections_total",
    "Discovery responses Envoy refused (NACK), by type",
    ["type"],
)

ADS_SERVICE: Final = "envoy.service.discovery.v3.AggregatedDiscoveryService"
SDS_SERVICE: Final = "envoy.service.secret.v3.SecretDiscoveryService"
DELTA_UNSUPPORTED: Final = (
    "the Tessera agent serves xDS state of the world, not the incremental (delta) variant: "
    "set api_type: GRPC, not DELTA_GRPC, in Envoy's bootstrap"
)
# Packages whose generated modules may be imported to find a resource's "@type".
_PROTO_ROOTS: Final = frozenset({"envoy", "xds", "udpa", "validate", "google"})

_log = logging.getLogger(__name__)

# The generated module builds its classes at import time, out of mypy's sight.
_discovery: Any = discovery_pb2
_AnyStream = Stream[Any, Any]
_NO_SVIDS: Final = X509Context(svids=(), federated_bundles={})
_Body = Callable[[_AnyStream, PeerCredentials], Awaitable[None]]


def discovery_services(
    provider: IdentityProvider,
    trust_domain: str,
    *,
    resources: ResourceSource,
    status: DiscoveryStatus,
    limits: RequestLimits | None = None,
) -> list[ExtraService]:
    """The SDS and ADS services (see :func:`workload_api.xds.discovery_services`)."""
    return [
        SecretDiscoveryService(provider, trust_domain, status=status, limits=limits),
        AggregatedDiscoveryService(
            provider, trust_domain, resources=resources, status=status, limits=limits
        ),
    ]


class _DiscoveryService:
    """What both services share: calls tracked for shutdown, errors as gRPC statuses."""

    def __init__(
        self,
        provider: IdentityProvider,
        trust_domain: str,
        *,
        resources: ResourceSource | None,
        status: DiscoveryStatus,
        limits: RequestLimits | None,
    ) -> None:
        self.provider = provider
        self.trust_domain = trust_domain
        self.resources = resources
        self.status = status
        self.limits = limits or RequestLimits()
        self.refusals = RefusalLog(_log)
        self.closing = asyncio.Event()
        self._active: set[asyncio.Task[Any]] = set()

    async def shut_down(self, grace: float) -> None:
        """Refuse new calls, end open streams with UNAVAILABLE, wait for them."""
        self.closing.set()
        active = {task for task in self._active if task is not asyncio.current_task()}
        if active:
            await asyncio.wait(active, timeout=grace)

    async def _call(self, method: str, stream: _AnyStream, body: _Body) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._active.add(task)
            task.add_done_callback(self._active.discard)
        status = Status.OK
        peer: PeerCredentials | None = None
        try:
            if self.closing.is_set():
                raise Unavailable(SHUTTING_DOWN)
            peer = caller_credentials(stream)
            await body(stream, peer)
        except TesseraError as err:
            status = grpc_status(err)
            self._log_refusal(method, peer, status, err.message)
            raise GRPCError(status, err.message) from err
        except GRPCError as err:
            status = err.status
            self._log_refusal(method, peer, status, err.message or "")
            raise
        except (asyncio.CancelledError, StreamTerminatedError):
            status = Status.CANCELLED  # Envoy went away
            raise
        except Exception:
            status = Status.INTERNAL
            _log.exception("Envoy discovery %s failed for %s", method, describe_peer(peer))
            raise GRPCError(
                Status.INTERNAL, "internal error in the Tessera agent; see the agent's log"
            ) from None
        finally:
            XDS_CALLS.labels(method=method, status=status.name).inc()

    def _log_refusal(
        self, method: str, peer: PeerCredentials | None, status: Status, message: str
    ) -> None:
        self.refusals.log(
            (method, peer), (status, message), logging.INFO,
            "Envoy discovery %s refused %s: %s: %s", method, describe_peer(peer), status.name,
            message,
        )  # fmt: skip

    async def _stream(
        self, stream: _AnyStream, peer: PeerCredentials, state: DiscoveryState
    ) -> None:
        first = await receive_request(stream)
        if first is None:
            return
        node = node_info(first)
        selectors = await self.provider.attest(peer)
        session = _Session(self, stream, peer, node, selectors, state)
        self.status.stream_opened(node.id)
        try:
            await session.serve(first)
        finally:
            self.status.stream_closed(node.id)

    async def _unimplemented(self, stream: _AnyStream) -> None:
        raise GRPCError(Status.UNIMPLEMENTED, DELTA_UNSUPPORTED)


class SecretDiscoveryService(_DiscoveryService):
    """``envoy.service.secret.v3.SecretDiscoveryService``: the caller's own secrets.

    A stream that names no secrets gets every one it may have (each SVID by its SPIFFE
    ID, each bundle by its trust domain's), as from SPIRE's agent.
    """

    def __init__(
        self,
        provider: IdentityProvider,
        trust_domain: str,
        *,
        status: DiscoveryStatus,
        limits: RequestLimits | None = None,
    ) -> None:
        super().__init__(provider, trust_domain, resources=None, status=status, limits=limits)

    def __mapping__(self) -> dict[str, Handler]:
        request, response = _discovery.DiscoveryRequest, _discovery.DiscoveryResponse
        delta_request = _discovery.DeltaDiscoveryRequest
        delta_response = _discovery.DeltaDiscoveryResponse
        return {
            f"/{SDS_SERVICE}/StreamSecrets": Handler(
                self.StreamSecrets, Cardinality.STREAM_STREAM, request, response
            ),
            f"/{SDS_SERVICE}/FetchSecrets": Handler(
                self.FetchSecrets, Cardinality.UNARY_UNARY, request, response
            ),
            f"/{SDS_SERVICE}/DeltaSecrets": Handler(
                self.DeltaSecrets, Cardinality.STREAM_STREAM, delta_request, delta_response
            ),
        }

    async def StreamSecrets(self, stream: _AnyStream) -> None:
        await self._call(
            "StreamSecrets", stream, lambda s, peer: self._stream(s, peer, self._state())
        )

    async def FetchSecrets(self, stream: _AnyStream) -> None:
        await self._call("FetchSecrets", stream, self._fetch)

    async def DeltaSecrets(self, stream: _AnyStream) -> None:
        await self._call("DeltaSecrets", stream, lambda s, peer: self._unimplemented(s))

    def _state(self) -> DiscoveryState:
        return DiscoveryState(
            wildcard_types={SECRET_TYPE},
            default_type_url=SECRET_TYPE,
            only_types={SECRET_TYPE},
            limits=self.limits,
        )

    async def _fetch(self, stream: _AnyStream, peer: PeerCredentials) -> None:
        request = await receive_request(stream)
        if request is None:
            raise InvalidArgument("FetchSecrets needs a request message")
        node = node_info(request)
        selectors = await self.provider.attest(peer)
        session = _Session(self, stream, peer, node, selectors, self._state())
        await stream.send_message(session.fetch(request))


class AggregatedDiscoveryService(_DiscoveryService):
    """``envoy.service.discovery.v3.AggregatedDiscoveryService``, state of the world:
    every type over one stream, secrets included (by the same names as over SDS)."""

    def __init__(
        self,
        provider: IdentityProvider,
        trust_domain: str,
        *,
        resources: ResourceSource,
        status: DiscoveryStatus,
        limits: RequestLimits | None = None,
    ) -> None:
        super().__init__(
            provider, trust_domain, resources=resources, status=status, limits=limits
        )

    def __mapping__(self) -> dict[str, Handler]:
        request, response = _discovery.DiscoveryRequest, _discovery.DiscoveryResponse
        delta_request = _discovery.DeltaDiscoveryRequest
        delta_response = _discovery.DeltaDiscoveryResponse
        return {
            f"/{ADS_SERVICE}/StreamAggregatedResources": Handler(
                self.StreamAggregatedResources, Cardinality.STREAM_STREAM, request, response
            ),
            f"/{ADS_SERVICE}/DeltaAggregatedResources": Handler(
                self.DeltaAggregatedResources,
                Cardinality.STREAM_STREAM,
                delta_request,
                delta_response,
            ),
        }

    async def StreamAggregatedResources(self, stream: _AnyStream) -> None:
        await self._call(
            "StreamAggregatedResources",
            stream,
            lambda s, peer: self._stream(s, peer, DiscoveryState(limits=self.limits)),
        )

    async def DeltaAggregatedResources(self, stream: _AnyStream) -> None:
        await self._call(
            "DeltaAggregatedResources", stream, lambda s, peer: self._unimplemented(s)
        )


class _Session:
    """One discovery stream of one proxy: its identity, its resources, what was sent."""

    def __init__(
        self,
        service: _DiscoveryService,
        stream: _AnyStream,
        peer: PeerCredentials,
        node: NodeInfo,
        selectors: frozenset[Selector],
        state: DiscoveryState,
    ) -> None:
        self._service = service
        self._stream = stream
        self._peer = peer
        self._node = node
        self._selectors = selectors
        self._state = state
        self._source = service.resources
        self._identity_key: object = None
        self._secrets = IdentitySecrets(_NO_SVIDS, {}, service.trust_domain)
        self._packed_secrets: dict[str, Any] = {}
        self._proxy = AttestedProxy(peer, selectors, ())
        self._resources: dict[str, dict[str, Any]] = {}
        self._resources_for: object = None  # (source version, SPIFFE IDs) they were built for

    # -- the loop ---------------------------------------------------------------------------

    async def serve(self, first: Any) -> None:
        """Answer ``first`` and what follows until Envoy leaves or the server closes."""
        provider, service = self._service.provider, self._service
        identity_version = provider.version()
        self._refresh_identity()
        source_version = self._source.version() if self._source is not None else 0
        self._refresh_resources(source_version)
        _log.debug("Envoy node %s connected: %s", self._describe(), self._proxy.spiffe_ids)
        self._take(first)
        receiving = _spawn(self._stream.recv_message())
        identity_changed = _spawn(provider.wait_for_change(identity_version))
        source_changed = (
            _spawn(self._source.wait_for_change(source_version))
            if self._source is not None
            else None
        )
        closing = _spawn(service.closing.wait())
        try:
            while True:
                await self._send_due()
                waiting = {receiving, identity_changed, closing}
                if source_changed is not None:
                    waiting.add(source_changed)
                done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                if closing in done:
                    raise Unavailable(SHUTTING_DOWN)
                if identity_changed in done:
                    identity_version = identity_changed.result()
                    identity_changed = _spawn(provider.wait_for_change(identity_version))
                    self._refresh_identity()
                    self._refresh_resources(source_version)
                if source_changed is not None and source_changed in done:
                    assert self._source is not None
                    source_version = source_changed.result()
                    source_changed = _spawn(self._source.wait_for_change(source_version))
                    self._refresh_resources(source_version)
                if receiving in done:
                    request = receiving.result()
                    if request is None:
                        return  # Envoy closed its side of the stream
                    self._take(request)
                    receiving = _spawn(self._stream.recv_message())
        finally:
            tasks = [receiving, identity_changed, closing]
            if source_changed is not None:
                tasks.append(source_changed)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def fetch(self, request: Any) -> Any:
        """The one response of a unary FetchSecrets."""
        self._refresh_identity()
        self._state.receive(request)
        responses = self._state.responses(self._select)
        if responses:
            return responses[0]
        return _discovery.DiscoveryResponse(type_url=SECRET_TYPE)

    def _take(self, request: Any) -> None:
        """Apply one request: subscriptions, ACK or NACK."""
        for outcome in self._state.receive(request):
            if isinstance(outcome, Ack):
                self._service.status.record_ack(self._node.id, outcome.type_url, outcome.version)
                _log.debug("Envoy node %s accepted %s version %s",
                           self._describe(), outcome.type_url, outcome.version)  # fmt: skip
            elif isinstance(outcome, Nack):
                self._rejected(outcome)
            elif isinstance(outcome, Subscribed):
                _log.debug("Envoy node %s subscribed to %s: %s", self._describe(),
                           outcome.type_url, "every resource" if outcome.names is None
                           else f"{len(outcome.names)} names")  # fmt: skip
            elif isinstance(outcome, Stale):
                _log.debug("Envoy node %s answered an older response of %s (nonce %s)",
                           self._describe(), outcome.type_url, outcome.nonce)  # fmt: skip

    def _rejected(self, nack: Nack) -> None:
        reason = nack.reason[:MAX_REASON_CHARS]
        _log.warning(
            "Envoy node %s refused %s version %s (it keeps version %s): %s",
            self._describe(), nack.type_url, nack.version, nack.kept_version or "none", reason,
        )  # fmt: skip
        XDS_REJECTIONS.labels(type=_short(nack.type_url)).inc()
        self._service.status.record_nack(
            Rejection(
                node_id=self._node.id,
                node_cluster=self._node.cluster,
                type_url=nack.type_url,
                version=nack.version,
                reason=reason,
                at=datetime.now(UTC),
                pid=self._peer.pid,
                metadata=self._node.metadata,
            )
        )

    async def _send_due(self) -> None:
        for response in self._state.responses(self._select):
            await self._stream.send_message(response)
            XDS_RESPONSES.labels(type=_short(response.type_url)).inc()
            _log.debug(
                "sent Envoy node %s %d of %s (version %s)", self._describe(),
                len(response.resources), response.type_url, response.version_info,
            )  # fmt: skip

    # -- what the proxy gets ----------------------------------------------------------------

    def _refresh_identity(self) -> None:
        """Read the caller's SVIDs and bundles again; rebuild its secrets if they changed."""
        provider = self._service.provider
        context = provider.x509_context(self._selectors)
        bundles = provider.x509_bundles(self._selectors)
        key = (context.svids, tuple(sorted(bundles.items())))
        if key == self._identity_key:
            return
        self._identity_key = key
        self._secrets = IdentitySecrets(context, bundles, self._service.trust_domain)
        self._packed_secrets.clear()
        self._proxy = AttestedProxy(self._peer, self._selectors, self._secrets.spiffe_ids)

    def _refresh_resources(self, source_version: int) -> None:
        """Ask the source again if its version or the caller's SPIFFE IDs changed."""
        if self._source is None:
            return
        built_for = (source_version, self._proxy.spiffe_ids)
        if built_for == self._resources_for:
            return
        self._resources_for = built_for
        self._resources = pack_resources(
            self._source.resources(self._node, self._proxy), self._invalid_resource
        )

    def _select(self, type_url: str, names: frozenset[str] | None) -> Mapping[str, Any]:
        if type_url == SECRET_TYPE:
            return self._select_secrets(names)
        available = self._resources.get(type_url, {})
        if names is None:
            return available
        return {name: available[name] for name in names if name in available}

    def _select_secrets(self, names: frozenset[str] | None) -> dict[str, Any]:
        from_source = self._resources.get(SECRET_TYPE, {})
        wanted: Iterable[str] = (
            [*self._secrets.names(), *from_source] if names is None else names
        )
        selected: dict[str, Any] = {}
        for name in wanted:
            packed = self._packed_secret(name)
            if packed is None:
                packed = from_source.get(name)
            if packed is None:
                self._secret_refused(name)
                continue
            self._service.refusals.forget(("secret", self._node.id, self._peer, name))
            selected[name] = packed
        return selected

    def _packed_secret(self, name: str) -> Any | None:
        packed = self._packed_secrets.get(name)
        if packed is None:
            secret = self._secrets.secret(name)
            if secret is None:
                return None
            packed = self._packed_secrets[name] = _pack(secret)
        return packed

    def _secret_refused(self, name: str) -> None:
        ids = self._proxy.spiffe_ids
        self._service.refusals.log(
            ("secret", self._node.id, self._peer, name), ids, logging.INFO,
            "Envoy node %s asked for the secret %r, which it may not have (%s); it gets none "
            "until it may", self._describe(), name,
            f"its SVIDs: {', '.join(ids)}" if ids else "it has no SVID",
        )  # fmt: skip

    def _invalid_resource(self, resource: str, error: str) -> None:
        self._service.refusals.log(
            ("resource", self._node.id, resource), error, logging.ERROR,
            "%s for Envoy node %s is not valid for Envoy's API, so the node does not get it: "
            "%s", resource, self._describe(), error,
        )  # fmt: skip

    def _describe(self) -> str:
        return f"{self._node.id} (cluster {self._node.cluster}; {describe_peer(self._peer)})"


# -- requests and resources -----------------------------------------------------------------


def node_info(request: Any) -> NodeInfo:
    """The node of a stream's first request; ``InvalidArgument`` without an id or cluster."""
    node = request.node if request.HasField("node") else None
    for field in ("id", "cluster"):
        value = getattr(node, field) if node is not None else ""
        if not value:
            raise InvalidArgument(
                f"the Envoy node has no {field}: set node.id and node.cluster in Envoy's "
                "bootstrap, so the agent can tell its proxies apart"
            )
        if len(value) > MAX_NAME_CHARS:
            raise InvalidArgument(
                f"the Envoy node's {field} is {len(value)} characters long, more than the "
                f"{MAX_NAME_CHARS} the Tessera agent accepts"
            )
    assert node is not None
    return NodeInfo(
        id=node.id,
        cluster=node.cluster,
        metadata=json_format.MessageToDict(node.metadata),
        user_agent=f"{node.user_agent_name} {_user_agent_version(node)}".strip(),
    )


def _user_agent_version(node: Any) -> str:
    """``user_agent_version``, or the ``major.minor.patch`` of ``user_agent_build_version``
    (which Envoy sends)."""
    if node.WhichOneof("user_agent_version_type") == "user_agent_build_version":
        version = node.user_agent_build_version.version
        return f"{version.major_number}.{version.minor_number}.{version.patch}"
    return str(node.user_agent_version)


def pack_resources(
    resources: Resources, invalid: Callable[[str, str], None]
) -> dict[str, dict[str, Any]]:
    """Envoy JSON -> type URL -> name -> the resource packed in an ``Any``.

    A resource that is not valid for Envoy's API (unknown field, wrong ``@type``, no
    name) is left out and reported as ``invalid(which resource, error)``.
    """
    packed: dict[str, dict[str, Any]] = {}
    for type_url, items in resources.items():
        by_name = packed.setdefault(type_url, {})
        for index, item in enumerate(items):
            try:
                message = _parse(type_url, item)
                name = _resource_name(message)
            except (json_format.ParseError, ValueError, TypeError, KeyError) as err:
                # json_format lists every field a message has after its first line.
                invalid(_describe_resource(type_url, index, item), str(err).split("\n")[0])
                continue
            by_name[name] = _pack(message)
    return packed


def _parse(type_url: str, item: Mapping[str, Any]) -> Any:
    declared = item.get("@type")
    if declared != type_url:
        raise ValueError(f'its "@type" is {declared!r}, not {type_url}')
    _register_types(item)
    message_class = message_factory.GetMessageClass(
        descriptor_pool.Default().FindMessageTypeByName(type_url.rsplit("/", 1)[-1])
    )
    body = {key: value for key, value in item.items() if key != "@type"}
    return json_format.ParseDict(body, message_class())


def _describe_resource(type_url: str, index: int, item: Any) -> str:
    name = (item.get("name") or item.get("cluster_name")) if isinstance(item, Mapping) else None
    which = f"{name!r}" if isinstance(name, str) else f"#{index}"
    return f"the {_short(type_url)} {which} ({type_url})"


def _resource_name(message: Any) -> str:
    fields = message.DESCRIPTOR.fields_by_name
    field = "cluster_name" if "cluster_name" in fields and "name" not in fields else "name"
    if field not in fields:
        raise ValueError(f"{message.DESCRIPTOR.full_name} has no name field")
    name = getattr(message, field)
    if not name:
        raise ValueError(f"it has no {field}")
    return str(name)


_imported_packages: set[str] = set()


def _register_types(value: Any) -> None:
    """Import the generated modules of every ``"@type"`` in ``value`` not imported yet.

    ``json_format`` finds a type only once its module is imported, and xds-protos has
    hundreds; each proto package's modules are imported the first time one of its
    types is named.
    """
    if isinstance(value, Mapping):
        type_url = value.get("@type")
        if isinstance(type_url, str):
            _import_package_of(type_url.rsplit("/", 1)[-1])
        for item in value.values():
            _register_types(item)
    elif isinstance(value, list):
        for item in value:
            _register_types(item)


def _import_package_of(full_name: str) -> None:
    try:
        descriptor_pool.Default().FindMessageTypeByName(full_name)
        return
    except KeyError:
        pass
    package = full_name.rsplit(".", 1)[0]
    if package in _imported_packages or package.split(".")[0] not in _PROTO_ROOTS:
        return
    _imported_packages.add(package)
    try:
        module = importlib.import_module(package)
    except ImportError:
        return  # json_format then says which type it cannot find
    for info in pkgutil.iter_modules(getattr(module, "__path__", [])):
        if info.name.endswith("_pb2"):
            importlib.import_module(f"{package}.{info.name}")


def _pack(message: Any) -> Any:
    resource = any_pb2.Any()
    resource.Pack(message, deterministic=True)
    return resource


def _short(type_url: str) -> str:
    return type_url.rsplit(".", 1)[-1]


def _spawn(awaitable: Awaitable[Any]) -> asyncio.Task[Any]:
    return asyncio.ensure_future(awaitable)

