"""The agent's client of the server's node API: mTLS, the server's identity, failover.

    client = NodeClient([Address("tessera-1", 8081), Address("tessera-2", 8081)], trust_domain)
    client.configure(anchors=bundle.x509_authorities, identity=None)   # first contact
    answer = await client.attest("join_token", {"token": "..."}, csr_der, answer=agent.answer)
    client.configure(anchors=..., identity=(chain, key))   # from now on, present the SVID
    update = await client.entries(since=0, wait=0)
    svids = await client.sign_x509([(entry_id, csr_der)])
    mesh = await client.mesh_changes(since=0)   # when update.mesh_revision moved
    await client.aclose()

Every connection checks, during the TLS handshake and before a byte of the
request is sent, that the server's certificate chains to the trust bundle and
carries the server's SPIFFE ID ``spiffe://<trust-domain>/tessera/server`` as its
URI SAN (host names are not checked: servers are named by SPIFFE ID). With
``anchors=None`` (``--insecure-bootstrap``) the chain is not verified; that is
used once, for the first attestation, and the bundle it returns is pinned.

The agent presents its own SVID as the TLS client certificate; the server
reads the agent's identity from the handshake only. When the SVID or the
bundle changes, :meth:`NodeClient.configure` builds a new connection pool, so
no request goes out with an SVID the server no longer accepts.

Failover: calls go to the server that answered last; when it cannot be
reached (or answers 5xx) the call moves on to the next one, each tried once.
When none answers the call raises ``Unavailable``; callers retry after a
:func:`retry_backoff` delay. A server that answers as another trust domain's server
is not unreachable but misconfigured: the call raises :class:`WrongTrustDomain`
at once. A refusal because the agent is banned raises ``AgentBanned`` (the
server's error code ``agent_banned``), so the agent can tell it from an eviction.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import random
import ssl
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

import httpcore
import httpx
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from mesh.catalog import Instance
from sdk.backoff import Backoff
from sdk.errors import (
    AlreadyExists,
    AuthenticationError,
    ConfigError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    TesseraError,
    Unauthenticated,
    Unavailable,
)
from sdk.keys import PrivateKey
from sdk.peer import spiffe_id_from_der, uri_sans
from sdk.spiffeid import SpiffeId, TrustDomain
from sdk.tls_material import load_identity
from workload_api.config import Address

__all__ = [
    "AgentBanned",
    "EntriesUpdate",
    "IssuedSvid",
    "MeshUpdate",
    "NodeClient",
    "WrongTrustDomain",
    "retry_backoff",
    "server_spiffe_id",
]

CONNECT_TIMEOUT: Final = 5.0
REQUEST_TIMEOUT: Final = 15.0
LONG_POLL_MARGIN: Final = 10.0
MAX_CHALLENGE_ROUNDS: Final = 4
MAX_BATCH: Final = 500
KEEPALIVE_EXPIRY: Final = 4.0
"""Idle connections are dropped before the server's own keep-alive timeout (uvicorn: 5 s)."""

_log = logging.getLogger(__name__)

_ERRORS_BY_STATUS: Final[Mapping[int, type[TesseraError]]] = {
    400: InvalidArgument,
    401: Unauthenticated,
    403: PermissionDenied,
    404: NotFound,
    409: AlreadyExists,
    412: FailedPrecondition,
    413: InvalidArgument,
}


class AgentBanned(PermissionDenied):
    """The server refused because this agent is banned (wire code ``agent_banned``).

    The agent's own class: the server's is ``ca.errors.AgentBanned``, and the code on
    the wire, not a shared class, is the contract between them."""

    code = "agent_banned"


_ERRORS_BY_CODE: Final[Mapping[str, type[TesseraError]]] = {"agent_banned": AgentBanned}

SERVER_PATH: Final = "/tessera/server"


class WrongTrustDomain(ConfigError):
    """A server answered as the server of another trust domain than the agent's."""


def server_spiffe_id(trust_domain: TrustDomain) -> SpiffeId:
    """The SPIFFE ID every server of the trust domain presents."""
    return SpiffeId(f"spiffe://{trust_domain.name}{SERVER_PATH}")


@dataclass(frozen=True)
class EntriesUpdate:
    """One answer of ``GET /v1/agent/entries``."""

    revision: int
    entries: tuple[Mapping[str, Any], ...]
    """Entries changed since the revision asked for (all of them for ``since=0``)."""
    entry_ids: frozenset[str]
    """Every entry authorized for the agent now; anything else is gone."""
    bundle_sequence: int | None = None
    """The server's bundle sequence; a change means the bundles must be fetched again."""
    tainted_authorities: frozenset[str] = frozenset()
    """Authorities (X.509 SKIs, JWT key IDs) whose SVIDs must be replaced now."""
    mesh_revision: int | None = None
    """The server's mesh revision; when it differs from the agent's, the agent fetches
    the mesh configuration's changes. None from a server without a mesh."""


@dataclass(frozen=True)
class MeshUpdate:
    """One answer of ``GET /v1/agent/mesh``: what changed since the revision asked for."""

    revision: int
    full: bool
    """The resources are the whole configuration: drop everything else."""
    resources: tuple[Mapping[str, Any], ...]
    """Created or changed resources: ``{"kind", "name", "revision", "document"}``."""
    deleted: tuple[tuple[str, str], ...]
    """(kind, name) of each resource deleted."""
    instances: tuple[Instance, ...] = ()
    """Instances registered or changed (the whole catalog when ``full``)."""
    removed_instances: tuple[tuple[str, str, str], ...] = ()
    """(node, service, address) of each instance gone."""


@dataclass(frozen=True)
class InstancesAnswer:
    """The answer of ``PUT /v1/agent/instances``."""

    revision: int
    lease_seconds: float
    """Report again well within this, or the instances leave the catalog."""
    refused: tuple[tuple[str, str, str], ...]
    """(service, address, reason) of each instance the server did not keep."""


@dataclass(frozen=True)
class IssuedSvid:
    entry_id: str
    spiffe_id: str
    chain_der: tuple[bytes, ...]
    expires_at: datetime


def retry_backoff(rng: random.Random | None = None) -> Backoff:
    """The delays between tries while no server answers: 0.5 s, 1 s, 2 s, 4 s, 5 s, 5 s...

    Each delay is drawn between half and all of the nominal one, so agents that
    lost the same server do not come back in step.
    """
    return Backoff(initial=0.5, maximum=5.0, multiplier=2.0, jitter=0.5, rng=rng)


class NodeClient:
    def __init__(
        self,
        servers: Sequence[Address],
        trust_domain: TrustDomain,
        *,
        connect_timeout: float = CONNECT_TIMEOUT,
        request_timeout: float = REQUEST_TIMEOUT,
    ) -> None:
        if not servers:
            raise ValueError("a NodeClient needs at least one server address")
        self._servers = tuple(servers)
        self._trust_domain = trust_domain
        self._connect_timeout = connect_timeout
        self._request_timeout = request_timeout
        self._current = 0
        self._client: httpx.AsyncClient | None = None
        self._in_flight: dict[httpx.AsyncClient, int] = {}
        self._retired: set[httpx.AsyncClient] = set()

    @property
    def server(self) -> Address:
        """The server calls go to first (the one that answered last)."""
        return self._servers[self._current]

    @property
    def servers(self) -> tuple[Address, ...]:
        return self._servers

    def configure(
        self,
        *,
        anchors: Sequence[x509.Certificate] | None,
        identity: tuple[Sequence[x509.Certificate], PrivateKey] | None,
    ) -> None:
        """Trust ``anchors`` (None: do not verify the chain) and present ``identity``."""
        context = _client_context(anchors, identity)
        transport = httpx.AsyncHTTPTransport(verify=context, trust_env=False)
        # httpx offers no hook into the handshake; its transport's connection pool
        # is rebuilt here with a network backend that checks the server's SPIFFE ID.
        if not isinstance(getattr(transport, "_pool", None), httpcore.AsyncConnectionPool):
            raise RuntimeError(
                "this httpx version keeps its connection pool elsewhere; Tessera cannot check "
                "the server's SPIFFE ID with it"
            )
        transport._pool = httpcore.AsyncConnectionPool(
            ssl_context=context,
            max_connections=20,
            max_keepalive_connections=10,
            keepalive_expiry=KEEPALIVE_EXPIRY,
            network_backend=_ServerIdCheckingBackend(str(server_spiffe_id(self._trust_domain))),
        )
        previous, self._client = self._client, httpx.AsyncClient(
            transport=transport, trust_env=False, follow_redirects=False
        )
        if previous is not None:
            self._retire(previous)

    async def aclose(self) -> None:
        clients = {*self._retired, *([self._client] if self._client else [])}
        self._client = None
        self._retired.clear()
        for client in clients:
            await client.aclose()

    # -- the node API -------------------------------------------------------------------

    async def attest(
        self,
        attestation_type: str,
        payload: Mapping[str, Any],
        csr_der: bytes,
        *,
        answer: Callable[[Mapping[str, Any]], Mapping[str, Any]],
    ) -> dict[str, Any]:
        """Attest, answering the server's challenges; the server's final answer.

        A refused challenge response restarts the exchange once: the answer may
        have reached another server than the one that issued the challenge.
        """
        for exchange in range(2):
            body: dict[str, Any] = {
                "attestation_type": attestation_type,
                "payload": dict(payload),
                "csr": _b64(csr_der),
            }
            try:
                for _ in range(MAX_CHALLENGE_ROUNDS + 1):
                    result = await self._call("POST", "/v1/agent/attest", json_body=body)
                    challenge = result.get("challenge")
                    if challenge is None:
                        return result
                    if not isinstance(challenge, Mapping):
                        raise InvalidArgument("the server sent a malformed attestation challenge")
                    body["challenge_response"] = dict(answer(challenge))
            except (Unauthenticated, InvalidArgument):
                if exchange == 0 and "challenge_response" in body:
                    continue
                raise
            break
        raise InvalidArgument(
            f"the server sent more than {MAX_CHALLENGE_ROUNDS} attestation challenges; "
            "check that agent and server run the same Tessera version"
        )

    async def renew(self, csr_der: bytes) -> tuple[tuple[bytes, ...], datetime]:
        """Renew the agent's own SVID; its chain (DER) and expiry."""
        result = await self._call("POST", "/v1/agent/renew", json_body={"csr": _b64(csr_der)})
        svid = _issued(result.get("svid"))
        return svid.chain_der, svid.expires_at

    async def entries(
        self,
        since: int,
        wait: float,
        *,
        bundle_sequence: int | None = None,
        mesh_revision: int | None = None,
    ) -> EntriesUpdate:
        """Entries changed since ``since``; with ``wait``, held until the entries, the
        bundle (when ``bundle_sequence`` names the one the agent has) or the mesh
        configuration (when ``mesh_revision`` names the one it has) change."""
        params: dict[str, Any] = {"since": since}
        if wait > 0:
            params["wait"] = round(wait, 3)
        if bundle_sequence is not None:
            params["bundle"] = bundle_sequence
        if mesh_revision is not None:
            params["mesh"] = mesh_revision
        result = await self._call(
            "GET", "/v1/agent/entries", params=params, timeout=wait + LONG_POLL_MARGIN
        )
        try:
            return EntriesUpdate(
                revision=int(result["revision"]),
                entries=tuple(result["entries"]),
                entry_ids=frozenset(str(i) for i in result["entry_ids"]),
                bundle_sequence=(
                    int(result["bundle_sequence"]) if "bundle_sequence" in result else None
                ),
                tainted_authorities=frozenset(
                    str(i) for i in result.get("tainted_authorities", ())
                ),
                mesh_revision=(
                    int(result["mesh_revision"]) if "mesh_revision" in result else None
                ),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise Unavailable(f"the server sent a malformed entries answer: {err}") from err

    async def mesh_changes(self, since: int) -> MeshUpdate:
        """The mesh configuration's changes since mesh revision ``since`` (all of it for 0)."""
        result = await self._call("GET", "/v1/agent/mesh", params={"since": since})
        try:
            resources = tuple(result["resources"])
            for resource in resources:
                if not isinstance(resource, Mapping) or not isinstance(
                    resource.get("document"), Mapping
                ):
                    raise TypeError("a resource without its document")
            return MeshUpdate(
                revision=int(result["revision"]),
                full=bool(result["full"]),
                resources=resources,
                deleted=tuple((str(d["kind"]), str(d["name"])) for d in result["deleted"]),
                instances=tuple(
                    Instance.from_json(item) for item in result.get("instances", ())
                ),
                removed_instances=tuple(
                    (str(r["node"]), str(r["service"]), str(r["address"]))
                    for r in result.get("removed_instances", ())
                ),
            )
        except (KeyError, TypeError, ValueError, ConfigError) as err:
            raise Unavailable(f"the server sent a malformed mesh answer: {err}") from err

    async def report_instances(
        self,
        instances: Sequence[Mapping[str, Any]],
        rejections: Sequence[Mapping[str, Any]] = (),
    ) -> InstancesAnswer:
        """Tell the server the whole set of mesh instances on this node (``service``,
        ``address``, ``spiffe_id``, ``labels``, ``health``, ``detail`` each) and the NACKs
        still standing among its Envoys (:mod:`workload_api.proxy_rejections`); renews
        their lease."""
        result = await self._call(
            "PUT", "/v1/agent/instances",
            json_body={"instances": list(instances), "rejections": list(rejections)},
        )  # fmt: skip
        try:
            return InstancesAnswer(
                revision=int(result["revision"]),
                lease_seconds=float(result["lease_seconds"]),
                refused=tuple(
                    (str(r["service"]), str(r["address"]), str(r["reason"]))
                    for r in result["refused"]
                ),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise Unavailable(f"the server sent a malformed instances answer: {err}") from err

    async def sign_x509(self, requests: Sequence[tuple[str, bytes]]) -> list[IssuedSvid]:
        """Sign CSRs, one per entry, in batches of at most 500."""
        issued: list[IssuedSvid] = []
        for start in range(0, len(requests), MAX_BATCH):
            batch = requests[start : start + MAX_BATCH]
            body = {"requests": [{"entry_id": e, "csr": _b64(csr)} for e, csr in batch]}
            result = await self._call("POST", "/v1/agent/svids/x509", json_body=body)
            svids = result.get("svids")
            if not isinstance(svids, list):
                raise Unavailable("the server sent a malformed X509-SVID batch answer")
            issued.extend(_issued(svid) for svid in svids)
        return issued

    async def sign_jwt(
        self, entry_id: str, audience: Sequence[str]
    ) -> tuple[str, str, datetime]:
        """A JWT-SVID for the entry: (SPIFFE ID, token, expiry)."""
        body = {"entry_id": entry_id, "audience": list(audience)}
        result = await self._call("POST", "/v1/agent/svids/jwt", json_body=body)
        try:
            expires_at = datetime.fromtimestamp(int(result["expires_at"]), UTC)
            return str(result["spiffe_id"]), str(result["token"]), expires_at
        except (KeyError, TypeError, ValueError) as err:
            raise Unavailable(f"the server sent a malformed JWT-SVID answer: {err}") from err

    async def bundles(self) -> dict[str, Any]:
        """``{"bundle": <SPIFFE bundle>, "federated": {trust domain: <SPIFFE bundle>}}``."""
        return await self._call("GET", "/v1/agent/bundles")

    # -- transport ----------------------------------------------------------------------

    async def _call(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        params: Mapping[str, Any] | None = None,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        client = self._client
        if client is None:
            raise RuntimeError("NodeClient.configure must be called before the first request")
        timeouts = httpx.Timeout(timeout or self._request_timeout, connect=self._connect_timeout)
        failures: list[str] = []
        for _ in self._servers:
            server = self.server
            self._in_flight[client] = self._in_flight.get(client, 0) + 1
            try:
                response = await client.request(
                    method, server.https_url + path, json=json_body, params=params,
                    timeout=timeouts,
                )
                content = await response.aread()
            except httpx.TransportError as err:
                foreign = _foreign_trust_domain(err)
                if foreign is not None:
                    raise WrongTrustDomain(
                        f"the server at {server} serves trust domain {foreign}, not "
                        f"{self._trust_domain.name}; check --trust-domain (and --server)"
                    ) from err
                failures.append(f"{server}: {_describe_transport_error(err)}")
                self._fail_over()
                continue
            finally:
                self._done(client)
            if response.status_code >= 500:
                failures.append(f"{server}: {_error_message(response.status_code, content)}")
                self._fail_over()
                continue
            if response.status_code >= 400:
                error = _ERRORS_BY_CODE.get(_error_code(content) or "") or _ERRORS_BY_STATUS.get(
                    response.status_code, InvalidArgument
                )
                raise error(_error_message(response.status_code, content))
            try:
                document = json.loads(content)
            except ValueError:
                failures.append(f"{server}: the answer is not JSON")
                self._fail_over()
                continue
            if not isinstance(document, dict):
                failures.append(f"{server}: the answer is not a JSON object")
                self._fail_over()
                continue
            return document
        raise Unavailable("no Tessera server answered: " + "; ".join(failures))

    def _fail_over(self) -> None:
        self._current = (self._current + 1) % len(self._servers)

    def _retire(self, client: httpx.AsyncClient) -> None:
        """Close a replaced pool once the requests still using it are done."""
        if self._in_flight.get(client, 0):
            self._retired.add(client)
            return
        self._close_soon(client)

    def _done(self, client: httpx.AsyncClient) -> None:
        remaining = self._in_flight.get(client, 1) - 1
        if remaining:
            self._in_flight[client] = remaining
            return
        self._in_flight.pop(client, None)
        if client in self._retired:
            self._retired.discard(client)
            self._close_soon(client)

    def _close_soon(self, client: httpx.AsyncClient) -> None:
        self._in_flight.pop(client, None)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # not started yet: nothing was opened
        task = loop.create_task(client.aclose())
        _background.add(task)
        task.add_done_callback(_background.discard)


_background: set[asyncio.Task[None]] = set()


# -- TLS ----------------------------------------------------------------------------------


def _client_context(
    anchors: Sequence[x509.Certificate] | None,
    identity: tuple[Sequence[x509.Certificate], PrivateKey] | None,
) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = False  # servers are named by their SPIFFE ID, checked below
    if anchors is None:
        context.verify_mode = ssl.CERT_NONE
    else:
        if not anchors:
            raise InvalidArgument("the trust bundle holds no X.509 authority to verify the server")
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(
            cadata="".join(c.public_bytes(serialization.Encoding.PEM).decode() for c in anchors)
        )
    if identity is not None:
        chain, key = identity
        load_identity(context, chain, key)
    return context


def server_id_problem(certificate_der: bytes | None, expected: str) -> str | None:
    """Why the server's certificate does not name ``expected``; None when it does."""
    if not certificate_der:
        return "the server presented no certificate"
    try:
        uris = uri_sans(x509.load_der_x509_certificate(certificate_der))
    except ValueError:
        uris = []
    if uris != [expected]:
        shown = ", ".join(uris) if uris else "no SPIFFE ID"
        return (
            f"the server presented {shown} instead of {expected}; it is not a Tessera "
            "server of this trust domain"
        )
    return None


class _ForeignServer(httpcore.ConnectError):
    """The peer is the Tessera server of another trust domain."""

    def __init__(self, message: str, trust_domain: str) -> None:
        super().__init__(message)
        self.trust_domain = trust_domain


def _foreign_trust_domain(err: BaseException) -> str | None:
    """The trust domain a :class:`_ForeignServer` behind ``err`` named, if any."""
    cause: BaseException | None = err
    while cause is not None:
        if isinstance(cause, _ForeignServer):
            return cause.trust_domain
        cause = cause.__cause__ or cause.__context__
    return None


def _server_trust_domain(certificate_der: bytes | None) -> str | None:
    """The trust domain whose server the certificate names (``spiffe://TD/tessera/server``)."""
    if not certificate_der:
        return None
    try:
        spiffe_id = spiffe_id_from_der(certificate_der, leaf=False)
    except (AuthenticationError, ValueError):
        return None
    return spiffe_id.trust_domain.name if spiffe_id.path == SERVER_PATH else None


class _ServerIdCheckingStream(httpcore.AsyncNetworkStream):
    def __init__(self, inner: httpcore.AsyncNetworkStream, expected: str) -> None:
        self._inner = inner
        self._expected = expected

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return await self._inner.read(max_bytes, timeout)

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        await self._inner.write(buffer, timeout)

    async def aclose(self) -> None:
        await self._inner.aclose()

    async def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.AsyncNetworkStream:
        stream = await self._inner.start_tls(ssl_context, server_hostname, timeout)
        ssl_object = stream.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        problem = server_id_problem(der, self._expected)
        if problem is not None:
            await stream.aclose()
            foreign = _server_trust_domain(der)
            if foreign is not None:
                raise _ForeignServer(problem, foreign)
            raise httpcore.ConnectError(problem)
        return stream

    def get_extra_info(self, info: str) -> typing.Any:
        return self._inner.get_extra_info(info)


class _ServerIdCheckingBackend(httpcore.AsyncNetworkBackend):
    """Refuses a TLS connection whose peer is not the server's SPIFFE ID."""

    def __init__(self, expected: str) -> None:
        self._inner = httpcore.AnyIOBackend()
        self._expected = expected

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: typing.Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        stream = await self._inner.connect_tcp(
            host, port, timeout=timeout, local_address=local_address,
            socket_options=socket_options,
        )
        return _ServerIdCheckingStream(stream, self._expected)

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: typing.Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        stream = await self._inner.connect_unix_socket(
            path, timeout=timeout, socket_options=socket_options
        )
        return _ServerIdCheckingStream(stream, self._expected)

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


# -- answers ------------------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _issued(raw: Any) -> IssuedSvid:
    try:
        return IssuedSvid(
            entry_id=str(raw.get("entry_id") or ""),
            spiffe_id=str(raw["spiffe_id"]),
            chain_der=tuple(base64.b64decode(c, validate=True) for c in raw["cert_chain"]),
            expires_at=datetime.fromtimestamp(int(raw["expires_at"]), UTC),
        )
    except (AttributeError, KeyError, TypeError, ValueError) as err:
        raise Unavailable(f"the server sent a malformed SVID: {err}") from err


def _error_message(status: int, content: bytes) -> str:
    """The server's own sentence from ``{"error": {"message": ...}}``, or the status."""
    try:
        message = json.loads(content)["error"]["message"]
        if isinstance(message, str) and message:
            return message
    except (ValueError, KeyError, TypeError):
        pass
    return f"the server answered HTTP {status}"


def _error_code(content: bytes) -> str | None:
    """The server's error code from ``{"error": {"code": ...}}``, if any."""
    try:
        code = json.loads(content)["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return None
    return code if isinstance(code, str) else None


def _describe_transport_error(err: httpx.TransportError) -> str:
    text = str(err) or type(err).__name__
    if isinstance(err, httpx.TimeoutException):
        return f"timed out ({text})" if str(err) else "timed out"
    if "CERTIFICATE_VERIFY_FAILED" in text:
        return (
            f"its certificate does not chain to the trust bundle ({text}); check that "
            "--trust-bundle is this trust domain's bundle"
        )
    return text
