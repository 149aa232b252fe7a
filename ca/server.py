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
import logging
import os
import signal
import socket
import stat
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

from attestor.node import NodeAttestorServer, ServerContext, load_node_attestor_server
from ca import metrics
from ca.api.admin import create_admin_app
from ca.api.limits import (
    ConnectionGuard,
    LimitedServer,
    connections_per_listener,
    listener_config,
)
from ca.api.node import create_node_app
from ca.api.tls import RotatingServerContext, ServerIdentity
from ca.authority import JWT, X509, Authorities, AuthorityPolicy
from ca.clock import SYSTEM_CLOCK, Clock
from ca.config import ServerConfig
from ca.datastore.store import Datastore
from ca.errors import CAError, ConfigError
from ca.federation.endpoint import bundle_endpoint_server_config
from ca.federation.refresher import BundleRefresher
from ca.issuance import IssuanceSettings, IssuedX509, Issuer
from ca.keymanager import load_key_manager
from ca.keys import KeyType, PrivateKey, generate_private_key
from ca.revisions import RevisionWatcher
from ca.upstream import UpstreamContext, load_upstream_authority

log = logging.getLogger(__name__)

TICK_SECONDS = 1.0
COUNT_SECONDS = 15.0
ISSUED_SVID_RETENTION = timedelta(days=1)
SERVER_SVID_TTL = timedelta(hours=1)


class _Uvicorn(LimitedServer):
    """uvicorn without its own signal handling: the Server stops both APIs together."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class Server:
    def __init__(self, config: ServerConfig, *, clock: Clock = SYSTEM_CLOCK) -> None:
        self.config = config
        self.clock = clock
        prepare_private_dir(config.data_dir)
        prepare_private_dir(config.admin_socket_path.parent)
        self.server_id = _server_id(config.data_dir)
        self.store = Datastore.open(config.database_url, clock=clock)
        try:
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
                    jwt_key_type=config.jwt_key_type,
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
                consume_join_token=lambda token: self.store.consume_join_token(token).alias_id,
                clock=clock,
            )
            self.attestors: dict[str, NodeAttestorServer] = {
                plugin.name: load_node_attestor_server(plugin.name, plugin.settings, context)
                for plugin in config.node_attestors
            }
        except BaseException:
            self.store.close()
            raise
        self.watcher = RevisionWatcher(self.store.sync_counters)
        self.refresher = BundleRefresher(self.store, clock=clock, changed=self.watcher.poke)
        self._svid: tuple[IssuedX509, PrivateKey] | None = None
        self._db_problem: str | None = None
        self.started_at = time.monotonic()
        self._stop: Callable[[], None] | None = None
        self._stop_early = False
        self._next_count = 0.0

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
            trust_anchors=bundle.x509_authorities,
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
            "node_api": f"{self.config.bind_host}:{self.config.bind_port}",
            "uptime_seconds": int(time.monotonic() - self.started_at),
            "x509_authority": x509.record.authority_id,
            "x509_authority_expires_at": int(x509.not_after.timestamp()),
        }

    # -- running --------------------------------------------------------------------------

    def _apps(self) -> tuple[Any, Any]:
        node_app = create_node_app(
            store=self.store,
            authorities=self.authorities,
            issuer=self.issuer,
            attestors=self.attestors,
            watcher=self.watcher,
            ready=self.ready_problem,
        )
        admin_app = create_admin_app(
            store=self.store,
            authorities=self.authorities,
            issuer=self.issuer,
            clock=self.clock,
            changed=self.watcher.poke,
            health=self.health,
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
        tls = RotatingServerContext(self.server_identity, require_client=False)
        # Every listener is held to the same limits, each with its own guard, so a
        # flood on one (the public bundle endpoint, say) cannot starve another.
        limits, endpoint = self.config.limits, self.config.federation.bundle_endpoint
        cap = connections_per_listener(limits, 3 if endpoint is not None else 2)

        def guard(listener: str) -> ConnectionGuard:
            return ConnectionGuard(listener, cap, limits.max_connections_per_peer)

        node_config = listener_config(
            node_app, guard("node API"), limits,
            host=self.config.bind_host, port=self.config.bind_port, ssl_context=tls.context,
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
            self.store.close()

    async def _tick(self) -> None:
        """Rotate authorities, follow other servers' bundle changes, update gauges."""
        while True:
            try:
                await asyncio.to_thread(self._tick_once)
                self._db_problem = None
            except CAError as err:
                self._db_problem = err.message
                log.warning("periodic work failed: %s", err.message)
            except Exception:
                log.exception("periodic work failed")
            await asyncio.sleep(TICK_SECONDS)

    def _tick_once(self) -> None:
        self.authorities.rotate()
        self.store.prune_join_tokens()
        for kind in (X509, JWT):
            expiry = self.authorities.active(kind).not_after.timestamp()
            metrics.AUTHORITY_EXPIRY.labels(kind).set(expiry)
        metrics.ENTRY_REVISION.set(self.watcher.revision)
        if time.monotonic() >= self._next_count:  # counting is a query: every 15 s is plenty
            metrics.ENTRIES.set(self.store.count_entries())
            metrics.AGENTS.set(self.store.count_agents())
            # The issuance record keeps a day of expired SVIDs, then lets them go.
            self.store.prune_issued_svids(self.clock.now() - ISSUED_SVID_RETENTION)
            self._next_count = time.monotonic() + COUNT_SECONDS


def prepare_private_dir(path: Path) -> None:
    """Create ``path`` 0700, or tighten it to 0700 if this user owns it."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    info = path.stat()
    if stat.S_IMODE(info.st_mode) & 0o077:
        if info.st_uid != os.getuid():
            raise ConfigError(
                f"directory {path} is open to other users and not owned by you; "
                "use a private directory (mode 0700) for the data dir and admin socket"
            )
        os.chmod(path, 0o700)


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


def _server_id(data_dir: Path) -> str:
    """A stable ID for this server, kept in its data dir (one per HA member)."""
    path = data_dir / "server-id"
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        server_id = uuid.uuid4().hex
        path.write_text(server_id + "\n")
        return server_id


def _authority_of(issued: IssuedX509) -> str:
    from cryptography import x509

    aki = issued.leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    return (aki.key_identifier or b"").hex()
