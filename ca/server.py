"""``tessera server run``: the trust domain's server as one asyncio process.

It serves the node API (mTLS, on ``--bind``) and the admin API (Unix socket),
rotates its authorities on a one-second tick of the injected clock, renews its
own serving SVID, and follows the datastore's entry revision so waiting agents
hear of changes at once.

    server = Server(config)
    asyncio.run(server.run())
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import re
import signal
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

from attestor.node import NodeAttestorServer, ServerContext, load_node_attestor_server
from ca import metrics
from ca.agent_activity import AgentActivity
from ca.api.admin import create_admin_app
from ca.api.limits import (
    ConnectionGuard,
    LimitedServer,
    connections_per_listener,
    listener_config,
)
from ca.api.node import create_node_app
from ca.api.tls import ServerIdentity, server_tls_context
from ca.authority import JWT, X509, Authorities, AuthorityPolicy
from ca.config import ServerConfig
from ca.datastore.store import Datastore
from ca.federation.endpoint import bundle_endpoint_server_config
from ca.federation.refresher import BundleRefresher
from ca.issuance import IssuanceSettings, IssuedX509, Issuer
from ca.keymanager import load_key_manager
from ca.proxy_rejections import ProxyRejections
from ca.revisions import RevisionWatcher
from ca.serverlease import LeaseLost, ServerIdLease
from ca.tombstones import TombstoneHorizon
from ca.upstream import UpstreamContext, load_upstream_authority
from sdk.clock import SYSTEM_CLOCK, Clock
from sdk.errors import ConfigError, FailedPrecondition, TesseraError
from sdk.keys import KeyType, PrivateKey, generate_private_key
from sdk.privatefiles import (
    os_error_sentence,
    prepare_private_dir,
    prepare_socket_dir,
    write_file_atomically,
)

log = logging.getLogger(__name__)

TICK_SECONDS = 1.0
COUNT_SECONDS = 15.0
ISSUED_SVID_RETENTION = timedelta(days=1)
SERVER_SVID_TTL = timedelta(hours=1)
SERVER_ID_FILE = "server-id"
SERVER_ID_PATTERN = re.compile(r"[0-9a-f]{32}")

__all__ = ["Server", "load_server_id", "prepare_private_dir"]


class _Uvicorn(LimitedServer):
    """uvicorn without its own signal handling: the Server stops both APIs together."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class Server:
    def __init__(
        self,
        config: ServerConfig,
        *,
        clock: Clock = SYSTEM_CLOCK,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        """Start up: check the listen addresses are free before making anything, prepare
        the data dir, read (or make) the server ID, open the datastore, take the lease on
        the server ID, then load the authorities. Every failure is a sentence (CAError)."""
        self.config = config
        self.clock = clock
        try:
            _check_listen_addresses(config)
            prepare_private_dir(config.data_dir)
            socket_dir = config.admin_socket_path.parent
            if socket_dir.resolve() != config.data_dir.resolve():
                prepare_socket_dir(socket_dir, what="admin socket", flag="--admin-socket")
            self.server_id = load_server_id(config.data_dir)
        except OSError as err:
            raise ConfigError(os_error_sentence(err, "start the server")) from err
        self.store = Datastore.open(config.database_url, clock=clock)
        self.lease: ServerIdLease | None = None
        try:
            self.lease = ServerIdLease.claim(
                self.store, self.server_id, ttl=config.server_lease_ttl, clock=clock,
                sleep=sleep,
            )
            key_manager = load_key_manager(
                config.key_manager.name, config.key_manager.settings, config.data_dir
            )
            upstream = (
                load_upstream_authority(
                    config.upstream_authority.name,
                    config.upstream_authority.settings,
                    config.data_dir,
                    UpstreamContext(datastore=self.store, clock=clock, ca_ttl=config.ca_ttl),
                )
                if config.upstream_authority
                else None
            )
            self.authorities = Authorities(
                AuthorityPolicy(
                    trust_domain=config.trust_domain,
                    server_id=self.server_id,
                    ca_ttl=config.ca_ttl,
                    x509_key_type=config.ca_key_type,
                    jwt_key_type=config.jwt_authority_key_type,
                ),
                self.store,
                key_manager,
                upstream=upstream,
                clock=clock,
            )
            self.authorities.rotate()
            self.issuer = Issuer(
                IssuanceSettings(
                    trust_domain=config.trust_domain,
                    default_x509_svid_ttl=config.default_x509_svid_ttl,
                    default_jwt_svid_ttl=config.default_jwt_svid_ttl,
                ),
                self.store,
                self.authorities,
                clock,
            )
            context = ServerContext(
                trust_domain=config.trust_domain,
                find_join_token=lambda token: self.store.find_join_token(token).alias_id,
                clock=clock,
            )
            self.attestors: dict[str, NodeAttestorServer] = {
                plugin.name: load_node_attestor_server(plugin.name, plugin.settings, context)
                for plugin in config.node_attestors
            }
        except OSError as err:  # a key written to a full or read-only disk, say
            self._close_store()
            raise ConfigError(os_error_sentence(err, "start the server")) from err
        except BaseException:
            self._close_store()
            raise
        self._lease_lost: str | None = None
        self.watcher = RevisionWatcher(self.store.sync_counters)
        self.refresher = BundleRefresher(self.store, clock=clock, changed=self.watcher.poke)
        self._svid: tuple[IssuedX509, PrivateKey] | None = None
        self._db_problem: str | None = None
        self.started_at = time.monotonic()
        self._stop: Callable[[], None] | None = None
        self._stop_early = False
        self.node_api_port: int = config.bind_port
        """The node API's port: the one bound, once serving (``bind`` may ask for 0)."""
        self._next_count = 0.0
        self.tombstones = TombstoneHorizon(config.tombstone_retention)
        self._purged_below = 0
        self.mesh_tombstones = TombstoneHorizon(config.tombstone_retention)
        self._mesh_purged_below = 0

    def _close_store(self) -> None:
        """Give up the lease (so the server may start again at once) and close the store."""
        if self.lease is not None:
            with contextlib.suppress(TesseraError):
                self.lease.release()
        self.store.close()

    # -- the server's own SVID ----------------------------------------------------------

    def _server_svid(self) -> tuple[IssuedX509, PrivateKey]:
        current = self._svid
        now = self.clock.now()
        active = self.authorities.active(X509).record.authority_id
        if current is not None:
            issued, _ = current
            life = issued.leaf.not_valid_after_utc - issued.leaf.not_valid_before_utc
            fresh = now < issued.leaf.not_valid_before_utc + life / 2
            if fresh and _authority_of(issued) == active:
                return current
        key = generate_private_key(KeyType.EC_P256)
        leaf, intermediates, _ = self.authorities.sign_x509_svid(
            self.issuer.settings.server_id, key.public_key(), ttl=SERVER_SVID_TTL
        )
        self._svid = (IssuedX509(self.issuer.settings.server_id, leaf, intermediates), key)
        return self._svid

    def server_identity(self) -> ServerIdentity:
        issued, key = self._server_svid()
        bundle = self.authorities.bundle()
        return ServerIdentity(
            chain=(issued.leaf, *issued.intermediates),
            private_key=key,
            bundle=bundle,
            version=(bundle.sequence, issued.leaf.serial_number),
        )

    # -- health ---------------------------------------------------------------------------

    def ready_problem(self) -> str | None:
        return self._db_problem

    def health(self) -> dict[str, Any]:
        x509 = self.authorities.active(X509)
        return {
            "status": "serving",
            "trust_domain": self.config.trust_domain.name,
            "server_id": self.server_id,
            "node_api": f"{self.config.bind_host}:{self.node_api_port}",
            "uptime_seconds": int(time.monotonic() - self.started_at),
            "x509_authority": x509.record.authority_id,
            "x509_authority_expires_at": int(x509.not_after.timestamp()),
        }

    # -- running --------------------------------------------------------------------------

    def _apps(self) -> tuple[Any, Any]:
        rejections = ProxyRejections(self.clock)  # reported on one, shown by the other
        activity = AgentActivity(self.clock)  # recorded by one, shown by the other
        node_app = create_node_app(
            store=self.store,
            authorities=self.authorities,
            issuer=self.issuer,
            attestors=self.attestors,
            watcher=self.watcher,
            ready=self.ready_problem,
            instance_lease=self.config.mesh_instance_lease,
            rejections=rejections,
            activity=activity,
        )
        admin_app = create_admin_app(
            store=self.store,
            authorities=self.authorities,
            issuer=self.issuer,
            clock=self.clock,
            changed=self.watcher.poke,
            health=self.health,
            rejections=rejections,
            activity=activity,
            watcher=self.watcher,
        )
        return node_app, admin_app

    def stop(self) -> None:
        """Ask a running :meth:`run` to shut down (as SIGTERM does)."""
        if self._stop is not None:
            self._stop()
        else:
            self._stop_early = True  # run() has not got that far yet: it stops at once

    async def run(
        self,
        *,
        on_ready: Callable[[Server], None] | None = None,
        handle_signals: bool = True,
    ) -> None:
        """Serve until SIGINT/SIGTERM (with ``handle_signals``), :meth:`stop` or
        cancellation."""
        node_app, admin_app = self._apps()
        tls = server_tls_context(self.server_identity)
        # Every listener is held to the same limits, each with its own guard, so a
        # flood on one (the public bundle endpoint, say) cannot starve another.
        limits, endpoint = self.config.limits, self.config.federation.bundle_endpoint
        cap = connections_per_listener(limits, 3 if endpoint is not None else 2)

        def guard(listener: str) -> ConnectionGuard:
            return ConnectionGuard(listener, cap, limits.max_connections_per_peer)

        node_config = listener_config(
            node_app, guard("node API"), limits,
            host=self.config.bind_host, port=self.config.bind_port, ssl_context=tls,
        )
        servers = [_Uvicorn(node_config, limits)]
        if endpoint is not None:
            servers.append(_Uvicorn(bundle_endpoint_server_config(
                endpoint, self.authorities.bundle, self.server_identity,
                guard("bundle endpoint"), limits), limits))
        admin_path = self.config.admin_socket_path
        _claim_socket(admin_path)
        admin_config = listener_config(admin_app, guard("admin API"), limits, uds=str(admin_path))
        servers.append(_Uvicorn(admin_config, limits))

        loop = asyncio.get_running_loop()

        def stop() -> None:
            self.watcher.close()  # long polls return now instead of holding the shutdown
            for server in servers:
                server.should_exit = True

        self._stop = stop
        if self._stop_early:
            stop()
        signals = (signal.SIGINT, signal.SIGTERM) if handle_signals else ()
        for sig in signals:
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, stop)
        background = [
            asyncio.create_task(self.watcher.run()),
            asyncio.create_task(self._tick()),
            asyncio.create_task(self.refresher.run()),
        ]
        serving = [asyncio.create_task(s.serve()) for s in servers]
        try:
            while not all(s.started for s in servers):
                if any(t.done() for t in serving):
                    break
                await asyncio.sleep(0.01)
            if all(s.started for s in servers):
                os.chmod(admin_path, 0o600)
                self.node_api_port = _bound_port(servers[0], self.node_api_port)
                if on_ready is not None:
                    on_ready(self)
            done, _ = await asyncio.wait(serving, return_when=asyncio.FIRST_COMPLETED)
            stop()
            await asyncio.gather(*serving, return_exceptions=True)
            for task in done:
                if task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
            if not all(s.started for s in servers):
                raise ConfigError(
                    f"could not start: is {self.config.bind_host}:{self.config.bind_port} "
                    "already in use? Choose another address with --bind"
                )
        finally:
            stop()
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            self._stop = None
            for sig in signals:
                with contextlib.suppress(NotImplementedError, RuntimeError):
                    loop.remove_signal_handler(sig)
            with contextlib.suppress(FileNotFoundError):
                admin_path.unlink()
            self._close_store()
        if self._lease_lost is not None:
            raise FailedPrecondition(self._lease_lost)

    async def _tick(self) -> None:
        """Rotate authorities, follow other servers' bundle changes, update gauges."""
        while True:
            try:
                await asyncio.to_thread(self._tick_once)
                self._db_problem = None
            except LeaseLost as err:
                self._lease_lost = err.message
                log.error("%s", err.message)
                self.stop()
                return
            except TesseraError as err:
                self._db_problem = err.message
                log.warning("periodic work failed: %s", err.message)
            except Exception:
                log.exception("periodic work failed")
            await asyncio.sleep(TICK_SECONDS)

    def _tick_once(self) -> None:
        if self.lease is not None:
            self.lease.renew()  # first: a slow rotation must not let the lease lapse
        self.authorities.rotate()
        self.store.prune_join_tokens()
        if expired := self.store.expire_mesh_instances():
            for node in sorted({key.node for key in expired}):
                gone = [f"{k.service} {k.address}" for k in expired if k.node == node]
                log.info("agent %s stopped reporting: its mesh instances leave the catalog "
                         "(%s)", node, ", ".join(gone))
            self.watcher.poke()
        self._purge_tombstones()
        for kind in (X509, JWT):
            expiry = self.authorities.active(kind).not_after.timestamp()
            metrics.AUTHORITY_EXPIRY.labels(kind).set(expiry)
        metrics.ENTRY_REVISION.set(self.watcher.revision)
        metrics.MESH_REVISION.set(self.watcher.mesh_revision)
        if time.monotonic() >= self._next_count:  # counting is a query: every 15 s is plenty
            metrics.ENTRIES.set(self.store.count_entries())
            metrics.AGENTS.set(self.store.count_agents())
            # The issuance record keeps a day of expired SVIDs, then lets them go.
            self.store.prune_issued_svids(self.clock.now() - ISSUED_SVID_RETENTION)
            self._next_count = time.monotonic() + COUNT_SECONDS

    def _purge_tombstones(self) -> None:
        """Forget the tombstones of entries deleted longer than the retention ago: a
        sync answer names every entry an agent gets, so no agent needs them (see
        ca.tombstones). A purge is written only when the horizon moved."""
        now = self.clock.now()
        self.tombstones.sample(now, self.store.current_revision())
        horizon = self.tombstones.revision(now)
        if horizon > self._purged_below:
            metrics.TOMBSTONES_PURGED.inc(self.store.purge_tombstones(horizon))
            self._purged_below = horizon
        # The mesh's tombstones likewise; an agent synced below the horizon gets the
        # whole configuration again (Datastore.mesh_changed_since).
        self.mesh_tombstones.sample(now, self.store.mesh_revision())
        mesh_horizon = self.mesh_tombstones.revision(now)
        if mesh_horizon > self._mesh_purged_below:
            metrics.MESH_TOMBSTONES_PURGED.inc(self.store.purge_mesh_tombstones(mesh_horizon))
            self._mesh_purged_below = mesh_horizon


def _check_listen_addresses(config: ServerConfig) -> None:
    """Refuse at once, before anything is made, an address the server cannot listen on."""
    _check_can_listen(config.bind_host, config.bind_port, "choose another address with --bind")
    if (endpoint := config.federation.bundle_endpoint) is not None:
        _check_can_listen(endpoint.host, endpoint.port,
                          "choose another [federation.bundle_endpoint] address")


def _check_can_listen(host: str, port: int, advice: str) -> None:
    shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                       flags=socket.AI_PASSIVE)
    except socket.gaierror as err:
        raise ConfigError(f"cannot listen on {shown}: {err.strerror}; {advice}") from err
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
            try:
                probe.bind(address)
            except OSError as err:
                if err.errno == errno.EADDRINUSE:
                    raise ConfigError(
                        f"port {shown} is in use; stop the process listening there, or {advice}"
                    ) from err
                if err.errno == errno.EADDRNOTAVAIL:
                    raise ConfigError(
                        f"cannot listen on {shown}: this machine has no address {host}; {advice}"
                    ) from err
                if err.errno == errno.EACCES:
                    raise ConfigError(
                        f"cannot listen on {shown}: {err.strerror} (ports below 1024 need "
                        f"privileges); {advice}"
                    ) from err
                raise ConfigError(f"cannot listen on {shown}: {err.strerror}; {advice}") from err


def _claim_socket(path: Path) -> None:
    """Remove a stale admin socket; refuse if a live server answers on it."""
    if not path.exists():
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        path.unlink()
        return
    finally:
        probe.close()
    raise ConfigError(
        f"another server is already using the admin socket {path}; stop it first or "
        "pass a different --admin-socket"
    )


def load_server_id(data_dir: Path) -> str:
    """This server's stable ID, kept in ``<data-dir>/server-id`` (one per HA member):
    made on the first start (written whole), refused when empty or not an ID."""
    path = data_dir / SERVER_ID_FILE
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        server_id = uuid.uuid4().hex
        try:
            write_file_atomically(path, f"{server_id}\n".encode(), mode=0o600, replace=False)
        except FileExistsError:  # another process made it first: take that one
            return load_server_id(data_dir)
        except OSError as err:
            raise ConfigError(os_error_sentence(err, f"write the server ID file {path}")) from err
        return server_id
    except OSError as err:
        raise ConfigError(os_error_sentence(err, f"read the server ID file {path}")) from err
    text = data.decode("ascii", errors="replace").strip()
    if not text:
        raise ConfigError(
            f"the server ID file {path} is empty, so this server's ID is lost (a start on a "
            "full disk could leave it so); restore the file from a backup, or delete it to "
            "have the server make a new ID (the old ID's authorities leave the bundle when "
            "they expire)"
        )
    if not SERVER_ID_PATTERN.fullmatch(text):
        raise ConfigError(
            f"the server ID file {path} does not hold a server ID (32 lower-case hex "
            "digits, as the server writes it); restore the file from a backup, or delete it "
            "to have the server make a new ID"
        )
    return text


def _authority_of(issued: IssuedX509) -> str:
    from cryptography import x509

    aki = issued.leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    return (aki.key_identifier or b"").hex()


def _bound_port(server: _Uvicorn, asked: int) -> int:
    """The TCP port ``server`` listens on (``asked`` when it cannot tell)."""
    for listening in getattr(server, "servers", ()):
        for sock in listening.sockets:
            address = sock.getsockname()
            if isinstance(address, tuple) and len(address) >= 2:
                return int(address[1])
    return asked
