"""The Tessera agent: attests its node, syncs and rotates SVIDs, serves the Workload API.

    agent = Agent(agent_config({...}), progress=print)
    asyncio.run(agent.run())            # until SIGINT/SIGTERM, or agent.stop()

What it does, in order:

1. **Its own identity.** It loads the SVID it stored in its data directory; a
   restarted agent goes on with it and needs no new join token. Without one
   (or with an expired one) it attests with the configured node attestor. A
   join-token agent whose SVID expired must be given a new token; an x509pop
   agent attests again by itself. The SVID is renewed at half its life.
2. **Sync.** One loop long-polls the server for the entries authorized for
   the agent (``GET /v1/agent/entries?since=R&wait=S``): the server answers as
   soon as an entry changes, else after ``S`` seconds (at most 5: the
   fallback interval, and the next rotation's due time). Each round also
   fetches the bundles, generates an EC P-256 key per entry that needs an
   SVID (new, changed, or due for rotation), sends the CSRs in batches, and
   renews the agent's own SVID when due. The same long poll wakes when the
   mesh configuration changes; the agent then fetches the resources changed
   since its mesh revision into :attr:`Agent.mesh`
   (:class:`~workload_api.mesh_sync.MeshState`), what the proxies on the node
   read.
3. **Serving.** The agent is the :class:`~workload_api.identity.IdentityProvider`
   of the Workload API server: it attests callers with the workload
   attestors (in a worker thread) and answers from the cache. JWT-SVIDs are
   minted on demand and cached per (SPIFFE ID, audience set).
4. **Mesh instances.** Proxies on the node register the apps they front over the
   agent's socket (:mod:`workload_api.mesh_service`); the agent checks their health
   and reports the set to the server (:mod:`workload_api.instances`).

When no server answers, the agent keeps serving what it has and retries with
capped exponential backoff, moving between the ``--server`` addresses. An
*evicted* agent also keeps serving until it attests again. A *banned* one does
not: once the server refuses it as banned, the agent drops its entries and
SVIDs (workloads get ``PERMISSION_DENIED``), logs one ERROR saying so, and its
``/ready`` answers 503 with that reason until an operator unbans it. A server of
another trust domain ends the agent with a sentence (``WrongTrustDomain``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from attestor.selector import Selector
from attestor.workload import (
    DEFAULT_PROC_ROOT,
    PeerCredentials,
    WorkloadAttestor,
    attest_with_pid_guard,
    load_workload_attestor,
)
from mesh.envoy import RenderOptions
from sdk.bundle import TrustBundle
from sdk.clock import SYSTEM_CLOCK, Clock
from sdk.csr import build_csr
from sdk.errors import (
    ConfigError,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    TesseraError,
    Unauthenticated,
    Unavailable,
)
from sdk.jwtsvid import JwtSvidError, claimed_spiffe_id, parse_and_validate_jwt_svid
from sdk.keys import KeyType, generate_private_key, private_key_to_pkcs8_der
from sdk.spiffeid import SpiffeId, TrustDomain, parse_trust_domain
from workload_api import health
from workload_api.cache import AuthorizedEntry, JwtSvidCache, SvidCache, leaf_authority_id
from workload_api.config import AgentConfig
from workload_api.grpc_limits import ServerLimits
from workload_api.identity import JwtSvidMaterial, ValidatedToken, X509Context
from workload_api.instances import LocalInstances
from workload_api.mesh_resources import MeshResourceSource
from workload_api.mesh_service import MeshService
from workload_api.mesh_sync import MeshState
from workload_api.node_attestation import (
    NodeAttestorAgent,
    attest,
    join_token_of,
    load_node_attestor_agent,
    renew,
)
from workload_api.node_client import (
    MAX_BATCH,
    AgentBanned,
    InstancesAnswer,
    NodeClient,
    WrongTrustDomain,
    retry_backoff,
)
from workload_api.proxy_rejections import rejections_report
from workload_api.server import WorkloadApiServer
from workload_api.storage import AgentIdentity, AgentStorage
from workload_api.xds import DiscoveryStatus, discovery_services

__all__ = ["SYNC_INTERVAL", "Agent", "AgentSvidExpired"]

SYNC_INTERVAL: Final = 5.0
"""The longest the agent goes without asking the server for changes."""
STARTUP_SYNC_TIMEOUT: Final = 10.0
MIN_RETRY_WAIT: Final = 1.0

_log = logging.getLogger(__name__)


class AgentSvidExpired(ConfigError):
    """The agent's SVID lapsed and the agent cannot attest again by itself."""


def _new_token_sentence(identity: AgentIdentity) -> str:
    return (
        f"the agent's SVID ({identity.spiffe_id}) expired at "
        f"{identity.expires_at:%Y-%m-%d %H:%M:%S} UTC and a join token works only once: "
        "generate a new join token with 'tessera server token generate' and start the "
        "agent with --join-token <token>"
    )


class Agent:
    """The agent process; also the Workload API's IdentityProvider."""

    def __init__(
        self,
        config: AgentConfig,
        *,
        clock: Clock = SYSTEM_CLOCK,
        rng: random.Random | None = None,
        progress: Callable[[str], None] | None = None,
        workload_attestors: Sequence[WorkloadAttestor] | None = None,
        node_client: NodeClient | None = None,
    ) -> None:
        self.config = config
        self._clock = clock
        self._rng = rng or random.Random()
        self._progress = progress or (lambda message: _log.info("%s", message))
        self.cache = SvidCache(config.trust_domain, clock=clock, rng=self._rng)
        self.jwt_cache = JwtSvidCache(clock=clock)
        self.mesh = MeshState()
        self.discovery_status = DiscoveryStatus()
        """What each Envoy on the node accepted and refused (NACKs with Envoy's reason)."""
        self.instances = LocalInstances(
            report=self._report_instances, mesh=self.mesh,
            node=lambda: str(self._identity.spiffe_id) if self._identity is not None else None,
            rejections=lambda: rejections_report(self.discovery_status),
        )
        self.discovery_status.on_change = self.instances.rejections_changed
        self._attestors: list[WorkloadAttestor] = (
            list(workload_attestors)
            if workload_attestors is not None
            else [
                load_workload_attestor(p.name, p.settings, proc_root=DEFAULT_PROC_ROOT)
                for p in config.workload_attestors
            ]
        )
        self._storage = AgentStorage(config.data_dir)
        self._client = node_client or NodeClient(config.servers, config.trust_domain)
        self._identity: AgentIdentity | None = None
        self._revision = 0
        self._bundle_sequence: int | None = None
        self._synced_once = False
        self._last_sync: float | None = None  # time.time() of the last successful sync
        self._problem: str | None = None
        self._banned: str | None = None  # why the server refuses the agent as banned
        self._jwt_locks: dict[tuple[str, frozenset[str]], asyncio.Lock] = {}
        self._signing_stuck = False  # some due SVID could not be signed in the last round
        self._stop = asyncio.Event()
        health.LAST_SYNC.set_function(lambda: self._last_sync or 0.0)
        health.SYNC_LAG.set_function(
            lambda: time.time() - self._last_sync if self._last_sync else 0.0
        )
        health.ENTRIES.set_function(lambda: len(self.cache.entries))
        health.CACHED_X509_SVIDS.set_function(lambda: self.cache.x509_svid_count)
        health.CACHED_JWT_SVIDS.set_function(lambda: len(self.jwt_cache))
        health.MESH_LOCAL_INSTANCES.set_function(lambda: len(self.instances))

    @property
    def identity(self) -> AgentIdentity | None:
        return self._identity

    # -- running ------------------------------------------------------------------------

    def stop(self) -> None:
        self._stop.set()

    async def run(
        self,
        *,
        on_ready: Callable[[Agent], None] | None = None,
        handle_signals: bool = True,
    ) -> None:
        """Attest (or load the stored SVID), sync, serve; return on stop or a signal."""
        loop = asyncio.get_running_loop()
        if handle_signals:
            for sig in (signal.SIGINT, signal.SIGTERM):
                with contextlib.suppress(NotImplementedError, RuntimeError):
                    loop.add_signal_handler(sig, self.stop)
        workload_api = WorkloadApiServer(
            self,
            limits=ServerLimits(
                idle_timeout=self.config.workload_api_idle_timeout,
                max_connections_per_uid=self.config.workload_api_max_connections_per_uid,
            ),
            services=[
                MeshService(self, self.instances, self.mesh),
                # Envoy's SDS and ADS: each Envoy's view of the mesh, rendered.
                *discovery_services(
                    self, self.config.trust_domain,
                    resources=MeshResourceSource(
                        self.mesh,
                        RenderOptions(otlp_endpoint=self.config.otlp_endpoint,
                                      access_log=self.config.envoy_access_log),
                        bundles=self,
                    ),
                    status=self.discovery_status,
                ),
            ],
        )
        health_server = (
            health.HealthServer(self.config.health_bind, self.ready_problem)
            if self.config.health_bind is not None
            else None
        )
        sync: asyncio.Task[None] | None = None
        reporting: asyncio.Task[None] | None = None
        stop = asyncio.create_task(self._stop.wait())
        try:
            starting = asyncio.create_task(self.start())
            await asyncio.wait({starting, stop}, return_when=asyncio.FIRST_COMPLETED)
            if not starting.done():  # stopped while attesting or syncing for the first time
                starting.cancel()
                await asyncio.gather(starting, return_exceptions=True)
                return
            starting.result()
            await workload_api.start(self.config.socket_path)
            self._progress(f"Workload API serving on {self.config.socket_path}")
            if health_server is not None:
                await health_server.start()
                self._progress(
                    f"Health endpoints on http://{self.config.health_bind} "
                    "(/live, /ready, /metrics)"
                )
            self._progress(f"export SPIFFE_ENDPOINT_SOCKET=unix://{self.config.socket_path}")
            sync = asyncio.create_task(self.sync_forever())
            reporting = asyncio.create_task(self.instances.run())
            if on_ready is not None:
                on_ready(self)
            await asyncio.wait({sync, stop}, return_when=asyncio.FIRST_COMPLETED)
            if sync.done():
                sync.result()  # a crash of the loop ends the agent with its error
        finally:
            stop.cancel()
            # Reporting stops before the proxies' calls end: their instances stay at the
            # server until the lease runs out, as the apps go on serving.
            for task in (sync, reporting):
                if task is not None:
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
            await workload_api.close()
            if health_server is not None:
                await health_server.stop()
            await self._client.aclose()
            if handle_signals:
                for sig in (signal.SIGINT, signal.SIGTERM):
                    with contextlib.suppress(NotImplementedError, RuntimeError):
                        loop.remove_signal_handler(sig)

    async def _report_instances(
        self, instances: Sequence[Mapping[str, Any]], rejections: Sequence[Mapping[str, Any]]
    ) -> InstancesAnswer:
        await self._current_identity()
        return await self._client.report_instances(instances, rejections)

    async def start(self) -> None:
        """Get the agent's identity and try a first sync, so it serves SVIDs right away."""
        self._storage.prepare()
        await self._establish_identity()
        try:
            try:
                await asyncio.wait_for(self.sync_once(wait=0), STARTUP_SYNC_TIMEOUT)
            except AgentBanned as err:
                raise ConfigError(self._banned_sentence(err)) from err
            except (PermissionDenied, Unauthenticated) as err:
                if not await self._attest_again(err):
                    raise ConfigError(
                        f"the server refused the agent's SVID: {err.message}; generate a new "
                        "join token with 'tessera server token generate' and start the agent "
                        "with --join-token <token>"
                    ) from err
                await asyncio.wait_for(self.sync_once(wait=0), STARTUP_SYNC_TIMEOUT)
        except (Unavailable, TimeoutError) as err:
            reason = err.message if isinstance(err, Unavailable) else "timed out"
            self._problem = reason
            self._progress(f"Could not sync yet ({reason}); retrying in the background")
            return
        svids = self.cache.x509_svid_count
        entries = len(self.cache.entries)
        self._progress(
            f"Synced {entries} {'entry' if entries == 1 else 'entries'} "
            f"({svids} X509-SVID{'' if svids == 1 else 's'})"
        )

    async def sync_forever(self) -> None:
        """Sync until cancelled; failures are retried with capped exponential backoff."""
        backoff = retry_backoff(self._rng)
        while True:
            try:
                await self.sync_once(wait=self._poll_wait())
                backoff.reset()
                continue
            except Unavailable as err:
                health.SYNC_FAILURES.inc()
                self._problem = err.message
                _log.warning("%s; serving cached SVIDs and retrying", err.message)
            except AgentSvidExpired as err:
                self._problem = err.message
                _log.error("%s", err.message)
            except AgentBanned as err:
                self._refused_as_banned(err)
            except (PermissionDenied, Unauthenticated) as err:
                self._problem = err.message
                await self._identity_refused(err)
            except TesseraError as err:
                self._problem = err.message
                _log.error("sync failed: %s", err.message)
            except Exception:
                # A bug must not stop the agent from serving what it has; say so loudly.
                self._problem = "sync failed unexpectedly; see the agent's log"
                _log.exception("sync failed unexpectedly")
            await asyncio.sleep(backoff.next())

    async def sync_once(self, wait: float) -> None:
        """One round: entries (long poll), bundles, CSRs for due entries, own SVID renewal."""
        identity = await self._current_identity()
        update = await self._client.entries(
            self._revision,
            wait if self._revision else 0,
            bundle_sequence=self._bundle_sequence,
            mesh_revision=self.mesh.revision,
        )
        try:
            changed = [AuthorizedEntry.from_json(e) for e in update.entries]
        except InvalidArgument as err:
            raise Unavailable(err.message) from err
        self.cache.apply_entries(changed, update.entry_ids)
        self._revision = update.revision
        self.jwt_cache.forget_except({e.spiffe_id for e in self.cache.entries.values()})
        # Bundles are fetched again only when the server's bundle sequence moved (every
        # time with a server that does not send one).
        if update.bundle_sequence is None or update.bundle_sequence != self._bundle_sequence:
            await self._refresh_bundles()
            self._bundle_sequence = update.bundle_sequence
        # The mesh configuration: only what changed since the agent's revision.
        if update.mesh_revision is not None and update.mesh_revision != self.mesh.revision:
            self.mesh.apply(await self._client.mesh_changes(self.mesh.revision))
        tainted = update.tainted_authorities
        x509_tainted = self.cache.set_tainted(tainted)
        jwt_tainted = self.jwt_cache.forget_signed_by(tainted)
        if x509_tainted or jwt_tainted:
            _log.info(
                "replacing %d X509-SVIDs and %d JWT-SVIDs signed by tainted authorities %s",
                x509_tainted, jwt_tainted, ", ".join(sorted(tainted)),
            )
        await self._sign_due_svids()
        if self._clock.now() >= identity.renew_at or _signed_by(identity, tainted):
            await self._renew_identity(identity)
        self._synced_once = True
        self._last_sync = time.time()
        self._problem = None
        if self._banned is not None:
            self._banned = None
            _log.warning("the server serves this agent again: it is no longer banned")

    def ready_problem(self) -> str | None:
        """Why the agent is not ready, or None: it has an identity and has synced."""
        if self._identity is None:
            return "the agent has not attested yet"
        if self._banned is not None:
            return self._banned
        if self._identity.expired(self._clock.now()):
            return self._problem or "the agent's SVID has expired"
        if not self._synced_once:
            return self._problem or "the agent has not synced with a server yet"
        return None

    def _poll_wait(self) -> float:
        """How long the next long poll may wait: until the next rotation, at most 5 s."""
        now = self._clock.now()
        deadlines = [self.cache.next_rotation()]
        if self._identity is not None:
            deadlines.append(self._identity.renew_at)
        wait = SYNC_INTERVAL
        for deadline in deadlines:
            if deadline is not None:
                wait = min(wait, (deadline - now).total_seconds())
        # An SVID whose renewal the server refuses stays due; do not spin on it.
        return max(wait, MIN_RETRY_WAIT if self._signing_stuck else 0.0)

    # -- the agent's own identity -------------------------------------------------------

    async def _establish_identity(self) -> None:
        trust_domain = self.config.trust_domain
        stored = self._storage.load_identity(trust_domain)
        bundle = self._storage.load_bundle(trust_domain)
        now = self._clock.now()
        if stored is not None and not stored.expired(now):
            if bundle is None:
                raise ConfigError(
                    f"the data directory {self.config.data_dir} holds the agent's SVID but not "
                    "the trust bundle; restore bundle.json there or remove agent.json to attest "
                    "again"
                )
            if self.config.node_attestor:
                self._progress(
                    f"Already attested as {stored.spiffe_id}; the node attestor flags are only "
                    "needed for the first start"
                )
            self._use(stored, bundle)
            self._progress(
                f"Loaded the agent SVID of {stored.spiffe_id} from {self.config.data_dir} "
                f"(expires {stored.expires_at:%Y-%m-%d %H:%M:%S} UTC)"
            )
            return
        attestor = load_node_attestor_agent(self.config)
        if stored is not None:
            token = join_token_of(stored)
            if not stored.reattestable and (attestor is None or self.config.join_token == token):
                raise AgentSvidExpired(_new_token_sentence(stored))
        if attestor is None:
            raise ConfigError(
                "the agent has not attested yet and no node attestor is configured; pass "
                "--join-token (from 'tessera server token generate') or --x509pop-cert and "
                "--x509pop-key"
            )
        await self._attest(attestor, bundle, expired=stored)

    async def _attest(
        self,
        attestor: NodeAttestorAgent,
        bundle: TrustBundle | None,
        *,
        expired: AgentIdentity | None = None,
    ) -> None:
        """Attest, retrying while no server answers; refusals end the agent with the reason."""
        anchors: Sequence[x509.Certificate] | None
        if bundle is not None:
            anchors = bundle.x509_authorities
        elif self.config.trust_bundle is not None:
            anchors = _read_trust_bundle(self.config.trust_bundle, self.config)
        elif self.config.insecure_bootstrap:
            anchors = None
            self._progress(
                "Bootstrapping without verifying the server (--insecure-bootstrap); the bundle "
                "it returns is pinned from now on"
            )
        else:
            raise ConfigError(
                "the agent has no trust bundle to verify the server with; pass --trust-bundle "
                "FILE (saved with 'tessera server bundle show') or --insecure-bootstrap"
            )
        self._client.configure(anchors=anchors, identity=None)
        backoff = retry_backoff(self._rng)
        while True:
            try:
                identity, pinned = await attest(self._client, attestor, self.config.trust_domain)
                break
            except Unavailable as err:
                delay = backoff.next()
                self._progress(f"Cannot attest yet: {err.message}; retrying in {delay:.1f}s")
                await asyncio.sleep(delay)
            except WrongTrustDomain:
                raise  # a server answered, for another trust domain: retrying cannot help
            except TesseraError as err:
                if expired is not None and not expired.reattestable:
                    raise AgentSvidExpired(
                        f"{_new_token_sentence(expired)} (the server said: {err.message})"
                    ) from err
                raise ConfigError(f"node attestation was refused: {err.message}") from err
        self._storage.save_bundle(pinned)
        self._storage.save_identity(identity)
        self._use(identity, pinned)
        self._progress(f"Attested as {identity.spiffe_id} ({attestor.name})")

    def _use(self, identity: AgentIdentity, bundle: TrustBundle | None = None) -> None:
        """Present ``identity`` from now on; ``bundle`` is the one to trust if none is yet."""
        self._identity = identity
        if self.cache.bundle is None and bundle is not None:
            self.cache.set_bundles(bundle, {})
        trusted = self.cache.bundle
        if trusted is None:
            raise RuntimeError("the agent has no trust bundle to verify the server with")
        self._client.configure(
            anchors=trusted.x509_authorities, identity=(identity.chain, identity.private_key)
        )
        health.AGENT_SVID_EXPIRY.set(identity.expires_at.timestamp())

    async def _current_identity(self) -> AgentIdentity:
        """The agent's SVID, attesting again first if it lapsed and the attestor allows it."""
        identity = self._identity
        if identity is None:
            raise RuntimeError("the agent has no identity; call start() first")
        if not identity.expired(self._clock.now()):
            return identity
        attestor = load_node_attestor_agent(self.config)
        if identity.reattestable and attestor is not None:
            _log.warning("the agent's SVID expired; attesting again")
            await self._reattest(attestor)
            assert self._identity is not None
            return self._identity
        raise AgentSvidExpired(_new_token_sentence(identity))

    async def _attest_again(self, refusal: TesseraError) -> bool:
        """After the server refused the agent's SVID: attest again, if the attestor can.

        An x509pop agent can; a join-token agent only with a new token (a token
        other than the one its current ID was made from).
        """
        identity = self._identity
        attestor = load_node_attestor_agent(self.config)
        if identity is None or attestor is None:
            return False
        new_token = attestor.name == "join_token" and self.config.join_token != join_token_of(
            identity
        )
        if not (identity.reattestable or new_token):
            return False
        _log.warning(
            "the server refused the agent's SVID (%s); attesting again with %s",
            refusal.message, attestor.name,
        )
        await self._reattest(attestor)
        return True

    async def _reattest(self, attestor: NodeAttestorAgent) -> None:
        bundle = self.cache.bundle
        if bundle is None:
            raise RuntimeError("the agent has no trust bundle to verify the server with")
        self._client.configure(anchors=bundle.x509_authorities, identity=None)
        try:
            identity, pinned = await attest(self._client, attestor, self.config.trust_domain)
        except BaseException:
            if self._identity is not None:
                self._use(self._identity)  # go on presenting the SVID we have
            raise
        self._storage.save_identity(identity)
        self._storage.save_bundle(pinned)
        self._use(identity, pinned)
        _log.info("attested again as %s", identity.spiffe_id)

    async def _renew_identity(self, identity: AgentIdentity) -> None:
        renewed = await renew(self._client, identity)
        # Stored before use: the server already treats the old SVID as superseded.
        self._storage.save_identity(renewed)
        self._use(renewed)
        health.SVIDS_ROTATED.labels("agent").inc()
        _log.info("renewed the agent SVID; it now expires at %s", renewed.expires_at)

    def _banned_sentence(self, err: AgentBanned) -> str:
        agent_id = self._identity.spiffe_id if self._identity is not None else "<agent ID>"
        return (
            f"the server refused this agent as banned ({err.message}); it serves workloads "
            f"no SVIDs until an operator runs 'tessera server agent unban --spiffe-id "
            f"{agent_id}'"
        )

    def _refused_as_banned(self, err: AgentBanned) -> None:
        """Stop serving SVIDs: a banned agent's workloads must not go on with its SVIDs."""
        self.cache.forget_entries()
        self.jwt_cache.forget_except(())
        self._revision = 0  # once unbanned, sync every entry again
        self._bundle_sequence = None
        if self._banned is None:
            self._banned = self._banned_sentence(err)
            _log.error("%s", self._banned)

    async def _identity_refused(self, err: TesseraError) -> None:
        """The server refused the agent's SVID (evicted, or superseded)."""
        try:
            if await self._attest_again(err):
                return
        except TesseraError as again:
            _log.error("attesting again failed: %s", again.message)
            return
        _log.error(
            "the server refused the agent's SVID: %s; a join-token agent must be given a new "
            "join token ('tessera server token generate') and restarted with --join-token",
            err.message,
        )

    # -- bundles and X509-SVIDs ---------------------------------------------------------

    async def _refresh_bundles(self) -> None:
        answer = await self._client.bundles()
        td = self.config.trust_domain
        try:
            own = TrustBundle.from_spiffe_json(td, json.dumps(answer["bundle"]).encode())
            federated = {
                name: TrustBundle.from_spiffe_json(
                    parse_trust_domain(name), json.dumps(document).encode()
                )
                for name, document in dict(answer.get("federated") or {}).items()
            }
        except (KeyError, TypeError, InvalidArgument) as err:
            raise Unavailable(f"the server sent malformed bundles: {err}") from err
        if not own.x509_authorities:
            raise Unavailable("the server sent a trust bundle without X.509 authorities")
        previous = self.cache.bundle
        if self.cache.set_bundles(own, federated) and own != previous:
            self._storage.save_bundle(own)
            if self._identity is not None and (
                previous is None or own.x509_authorities != previous.x509_authorities
            ):
                self._client.configure(
                    anchors=own.x509_authorities,
                    identity=(self._identity.chain, self._identity.private_key),
                )

    async def _sign_due_svids(self) -> None:
        due = self.cache.entries_needing_svids()
        self._signing_stuck = False
        # One server batch at a time, stored before the next is made: keys, CSRs and
        # answers for 10,000 entries at once would leave the agent's memory at that
        # high-water mark for good, and workloads would wait for the last batch.
        for start in range(0, len(due), MAX_BATCH):
            await self._sign_batch(due[start : start + MAX_BATCH])

    async def _sign_batch(self, due: Sequence[AuthorizedEntry]) -> None:
        try:
            await self._sign(due)
        except AgentBanned:
            raise
        except (PermissionDenied, InvalidArgument, NotFound) as err:
            # The whole batch is refused when one entry changed meanwhile: sign one by one.
            _log.info("batch signing refused (%s); signing entry by entry", err.message)
            for entry in due:
                try:
                    await self._sign([entry])
                except AgentBanned:
                    raise
                except (PermissionDenied, InvalidArgument, NotFound) as single:
                    self._signing_stuck = True
                    _log.warning("no X509-SVID for entry %s: %s", entry.id, single.message)

    async def _sign(self, entries: Sequence[AuthorizedEntry]) -> None:
        keys = {entry.id: generate_private_key(KeyType.EC_P256) for entry in entries}
        requests = [
            (entry.id, build_csr(keys[entry.id], SpiffeId(entry.spiffe_id), entry.dns_names))
            for entry in entries
        ]
        by_id = {entry.id: entry for entry in entries}
        for issued in await self._client.sign_x509(requests):
            entry = by_id.get(issued.entry_id)
            if entry is None:
                continue
            previous = self.cache.store_x509_svid(
                entry,
                issued.chain_der,
                private_key_to_pkcs8_der(keys[entry.id]),
                issued.expires_at,
            )
            if previous is not None:
                health.SVIDS_ROTATED.labels("x509").inc()

    # -- IdentityProvider ---------------------------------------------------------------

    async def attest(self, peer: PeerCredentials) -> frozenset[Selector]:
        return await asyncio.to_thread(attest_with_pid_guard, self._attestors, peer)

    def x509_context(self, selectors: frozenset[Selector]) -> X509Context:
        return self.cache.x509_context(selectors)

    def x509_bundles(self, selectors: frozenset[Selector]) -> Mapping[str, bytes]:
        return self.cache.x509_bundles(selectors)

    def jwt_bundles(self, selectors: frozenset[Selector]) -> Mapping[str, bytes]:
        return self.cache.jwt_bundles(selectors)

    async def fetch_jwt_svids(
        self, selectors: frozenset[Selector], audience: Sequence[str], spiffe_id: str | None
    ) -> list[JwtSvidMaterial]:
        svids: list[JwtSvidMaterial] = []
        seen: set[str] = set()
        for entry in self.cache.matching_entries(selectors):
            if entry.spiffe_id in seen or (spiffe_id is not None and entry.spiffe_id != spiffe_id):
                continue
            seen.add(entry.spiffe_id)
            token = await self._jwt_svid(entry, audience)
            svids.append(JwtSvidMaterial(spiffe_id=entry.spiffe_id, token=token, hint=entry.hint))
        return svids

    async def _jwt_svid(self, entry: AuthorizedEntry, audience: Sequence[str]) -> str:
        key = (entry.spiffe_id, frozenset(audience))
        lock = self._jwt_locks.setdefault(key, asyncio.Lock())
        try:
            async with lock:
                cached = self.jwt_cache.fresh(entry.spiffe_id, audience)
                if cached is not None:
                    return cached.token
                renewing = self.jwt_cache.usable(entry.spiffe_id, audience)
                try:
                    _, token, expires_at = await self._client.sign_jwt(entry.id, sorted(key[1]))
                except Unavailable as err:
                    if renewing is not None:
                        return renewing.token
                    raise Unavailable(
                        f"no Tessera server answered to mint a JWT-SVID for {entry.spiffe_id}; "
                        "try again shortly"
                    ) from err
                self.jwt_cache.store(entry.spiffe_id, audience, token, expires_at)
                if renewing is not None:
                    health.SVIDS_ROTATED.labels("jwt").inc()
                return token
        finally:
            if not lock.locked():
                self._jwt_locks.pop(key, None)

    def validate_jwt_svid(self, token: str, audience: str) -> ValidatedToken:
        try:
            trust_domain: TrustDomain | None = claimed_spiffe_id(token).trust_domain
        except JwtSvidError:
            trust_domain = None  # checking it with the own bundle says what is wrong
        bundle = self.cache.bundle if trust_domain is None else self.cache.bundle_for(trust_domain)
        if bundle is None:
            name = trust_domain.name if trust_domain is not None else None
            raise InvalidArgument(
                f"no JWT bundle for trust domain {name}; the agent can validate JWT-SVIDs of "
                "its own trust domain and of federated ones"
            )
        from spiffe import JwtBundle  # the package's Workload API client loads on first use

        keys = JwtBundle(bundle.trust_domain, {**bundle.jwt_authorities})
        validated = parse_and_validate_jwt_svid(token, keys, audience, clock=self._clock)
        return ValidatedToken(spiffe_id=str(validated.spiffe_id), claims=validated.claims)

    def version(self) -> int:
        return self.cache.version()

    async def wait_for_change(self, seen_version: int) -> int:
        return await self.cache.wait_for_change(seen_version)


def _signed_by(identity: AgentIdentity, authority_ids: frozenset[str]) -> bool:
    """True when the agent's own SVID was signed by one of ``authority_ids``."""
    if not authority_ids or not identity.chain:
        return False
    leaf = identity.chain[0].public_bytes(serialization.Encoding.DER)
    return leaf_authority_id(leaf) in authority_ids


def _read_trust_bundle(path: Any, config: AgentConfig) -> tuple[x509.Certificate, ...]:
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ConfigError(f"cannot read the trust bundle file {path}: {err.strerror}") from err
    try:
        return TrustBundle.from_pem(config.trust_domain, data).x509_authorities
    except InvalidArgument as err:
        raise ConfigError(f"the trust bundle file {path} is not usable: {err.message}") from err
