"""``tessera up``: a whole trust domain in one process, for a first look.

    tessera up                                   # example.org, data in .tessera/
    export SPIFFE_ENDPOINT_SOCKET=unix://$PWD/.tessera/agent/agent.sock
    tessera agent api fetch x509                 # your own X509-SVID

One asyncio loop runs a server (:class:`ca.server.Server`) and an agent
(:class:`workload_api.agent.Agent`) on the embedded defaults (SQLite, CA keys on
disk), and registers whoever started it: the entry ``spiffe://TD/user/<name>``
with the selector ``unix:uid:<uid>``, under the agent's alias
``spiffe://TD/node/local``. The data directory holds::

    <data-dir>/server/   the server's data dir: datastore, keys, admin.sock
    <data-dir>/agent/    the agent's data dir: its SVID, the pinned bundle, agent.sock

The admin socket works as with ``tessera server run``, so ``tessera server ...
--data-dir <data-dir>/server`` commands do too. Started again on the same data
dir, it goes on with the same CA, agent identity and entry.

    local = LocalTrustDomain(UpSettings(parse_trust_domain("example.org"), Path(".tessera")))
    asyncio.run(local.run(on_ready=lambda summary: print(summary.text())))
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pwd
import re
import signal
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from attestor.node.join_token import generate_token
from attestor.selector import Selector
from ca.config import DEFAULT_BIND, parse_bind, server_config
from ca.datastore.interface import Datastore
from ca.datastore.records import RegistrationEntry
from ca.entries import new_entry
from ca.server import Server, prepare_private_dir
from sdk.clock import SYSTEM_CLOCK, Clock
from sdk.errors import ConfigError, FailedPrecondition, NotFound
from sdk.spiffeid import SpiffeId, TrustDomain, parse_spiffe_id
from workload_api.agent import Agent
from workload_api.config import DEFAULT_HEALTH_BIND, agent_config
from workload_api.storage import AgentStorage

__all__ = [
    "LocalTrustDomain",
    "UpSettings",
    "UpSummary",
    "claim_trust_domain",
    "ensure_user_entry",
    "listenable_port",
    "login_name",
    "user_spiffe_id",
]

NODE_ALIAS_PATH: Final = "/node/local"
"""The agent's alias; the user's entry names it as its parent."""
JOIN_TOKEN_TTL: Final = timedelta(minutes=5)
AUDIT_ACTOR: Final = "tessera up"
TRUST_DOMAIN_FILE: Final = "trust-domain"
SIGNALS: Final = (signal.SIGINT, signal.SIGTERM)

_NOT_IN_PATH_SEGMENT = re.compile(r"[^A-Za-z0-9._-]+")
_log = logging.getLogger(__name__)


# -- who is "you" ---------------------------------------------------------------------------


def login_name(uid: int) -> str | None:
    """The user name of ``uid`` in the password database, or None if it has none."""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return None


def user_spiffe_id(trust_domain: TrustDomain, uid: int, user_name: str | None) -> SpiffeId:
    """``spiffe://TD/user/<name>`` for a local user.

    Runs of characters a SPIFFE path segment may not hold become ``-``; a user
    without a usable name is ``uid-<n>``.
    """
    segment = _NOT_IN_PATH_SEGMENT.sub("-", user_name or "").strip("-")
    if segment in ("", ".", ".."):
        segment = f"uid-{uid}"
    return parse_spiffe_id(f"spiffe://{trust_domain.name}/user/{segment}")


def ensure_user_entry(
    store: Datastore, trust_domain: TrustDomain, *, spiffe_id: SpiffeId, parent_id: SpiffeId,
    uid: int,
) -> tuple[RegistrationEntry, bool]:
    """The entry giving ``uid`` its SPIFFE ID under ``parent_id``: the stored one, else a
    new one. True when it was created."""
    selector = Selector("unix", f"uid:{uid}")
    found = store.list_entries(
        spiffe_id=str(spiffe_id), parent_id=str(parent_id), selectors=[selector],
        selector_match="exact",
    )
    if found:
        return found[0], False
    entry = store.create_entry(new_entry(
        trust_domain, spiffe_id=str(spiffe_id), parent_id=str(parent_id), selectors=[str(selector)]
    ))
    store.append_audit(actor=AUDIT_ACTOR, action="entry.create", target=entry.id,
                       details={"spiffe_id": entry.spiffe_id})
    return entry, True


def claim_trust_domain(data_dir: Path, trust_domain: TrustDomain) -> None:
    """Remember which trust domain ``data_dir`` holds; refuse to start it as another."""
    marker = data_dir / TRUST_DOMAIN_FILE
    try:
        held = marker.read_text().strip()
    except FileNotFoundError:
        marker.write_text(trust_domain.name + "\n")
        return
    if held != trust_domain.name:
        raise ConfigError(
            f"the data dir {data_dir} holds trust domain {held}, not {trust_domain.name}; "
            f"pass --trust-domain {held}, or another --data-dir for {trust_domain.name}"
        )


# -- ports --------------------------------------------------------------------------------


def listenable_port(host: str, port: int) -> int:
    """``port`` if one can listen on it at ``host`` now, else a free ephemeral port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for candidate in (port, 0):
        with contextlib.suppress(OSError), socket.create_server(
            (host, candidate), family=family
        ) as probe:
            return int(probe.getsockname()[1])
    raise ConfigError(
        f"cannot listen on {host}; pass an address of this machine, e.g. --bind 127.0.0.1:8081"
    )


def _port_or_fallback(value: str, what: str, progress: Callable[[str], None]) -> tuple[str, int]:
    bind = parse_bind(value)
    host, wanted = bind.host, bind.port
    port = listenable_port(host, wanted)
    if wanted and port != wanted:
        progress(f"{host}:{wanted} is in use; the {what} listens on {host}:{port} instead")
    return host, port


def _connect_host(bind_host: str) -> str:
    """Where the agent reaches a server listening on ``bind_host``: loopback for "any"."""
    anywhere = {"0.0.0.0": "127.0.0.1", "::": "::1"}  # noqa: S104  (read, not bound)
    return anywhere.get(bind_host, bind_host)


def _issued_by_any(certificate: x509.Certificate, authorities: Iterable[x509.Certificate]) -> bool:
    for authority in authorities:
        with contextlib.suppress(ValueError, TypeError, InvalidSignature):
            certificate.verify_directly_issued_by(authority)
            return True
    return False


def _serving(path: Path) -> bool:
    """True when a process accepts connections on the Unix socket ``path``."""
    if not path.exists():
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


# -- the trust domain ---------------------------------------------------------------------


@dataclass(frozen=True)
class UpSettings:
    trust_domain: TrustDomain
    data_dir: Path
    bind: str = DEFAULT_BIND
    """The node API's HOST:PORT; if the port is taken, an ephemeral one is used."""
    health_bind: str = DEFAULT_HEALTH_BIND
    """The agent's /live, /ready, /metrics; ``0`` turns them off. Falls back like bind."""
    log_level: str = "warning"


@dataclass(frozen=True)
class UpSummary:
    """What is up and how to use it, once the agent serves the user's SVID."""

    trust_domain: str
    spiffe_id: str
    selector: str
    parent_id: str
    agent_id: str
    server_address: str
    data_dir: Path
    server_data_dir: Path
    agent_data_dir: Path
    admin_socket: Path
    socket: Path
    agent_health: str | None
    ready_seconds: float

    @property
    def export_line(self) -> str:
        return f"export SPIFFE_ENDPOINT_SOCKET=unix://{self.socket}"

    def to_json(self) -> dict[str, Any]:
        return {
            "trust_domain": self.trust_domain,
            "spiffe_id": self.spiffe_id,
            "selector": self.selector,
            "parent_id": self.parent_id,
            "agent_id": self.agent_id,
            "server_address": self.server_address,
            "data_dir": str(self.data_dir.absolute()),
            "server_data_dir": str(self.server_data_dir.absolute()),
            "agent_data_dir": str(self.agent_data_dir.absolute()),
            "admin_socket": str(self.admin_socket.absolute()),
            "socket": str(self.socket),
            "endpoint_socket": f"unix://{self.socket}",
            "export": self.export_line,
            "agent_health": self.agent_health,
            "ready_seconds": round(self.ready_seconds, 3),
        }

    def text(self) -> str:
        return "\n".join([
            f"Tessera trust domain {self.trust_domain} is up ({self.ready_seconds:.1f}s).",
            f"  server     https://{self.server_address}   "
            f"(admin: tessera server ... --data-dir {self.server_data_dir})",
            f"  agent      {self.socket}",
            f"  you        {self.spiffe_id}   ({self.selector})",
            "",
            "In another shell:",
            f"  {self.export_line}",
            "  tessera agent api fetch x509",
            "",
            "Ctrl-C stops it.",
        ])


class LocalTrustDomain:
    """A server and an agent in one event loop, and an entry for the calling user.

    Constructing it opens the server's datastore and keys, registers the user
    and makes a join token; :meth:`run` serves until SIGINT or SIGTERM.
    ``started`` (a ``time.monotonic()`` reading) is when the summary's
    ``ready_seconds`` count from; by default, construction.
    """

    def __init__(
        self,
        settings: UpSettings,
        *,
        progress: Callable[[str], None] = _log.info,
        clock: Clock = SYSTEM_CLOCK,
        started: float | None = None,
    ) -> None:
        self.started = time.monotonic() if started is None else started
        self.settings = settings
        self.clock = clock
        self.server_dir = settings.data_dir / "server"
        self.agent_dir = settings.data_dir / "agent"
        prepare_private_dir(settings.data_dir)
        claim_trust_domain(settings.data_dir, settings.trust_domain)
        prepare_private_dir(self.agent_dir)
        socket_path = self.agent_dir.absolute() / "agent.sock"
        for path in (self.server_dir / "admin.sock", socket_path):
            if _serving(path):
                raise ConfigError(
                    f"tessera up is already running with the data dir {settings.data_dir} "
                    f"({path} answers); stop it first or pass another --data-dir"
                )
        bind = _port_or_fallback(settings.bind, "node API", progress)
        health = (
            _port_or_fallback(settings.health_bind, "agent's health endpoint", progress)
            if settings.health_bind.strip() not in ("", "0")
            else None
        )
        self.server = Server(server_config({
            "trust_domain": settings.trust_domain.name,
            "data_dir": str(self.server_dir),
            "bind": f"{bind[0]}:{bind[1]}",
            "log_level": settings.log_level,
        }), clock=clock)
        try:
            self.alias = parse_spiffe_id(f"spiffe://{settings.trust_domain.name}{NODE_ALIAS_PATH}")
            self.entry = self._register_user(progress)
            # A fresh token every start: a restarted agent goes on with its stored SVID
            # and leaves the token unused (burnt once ready); an evicted one attests again.
            self.join_token = self.server.store.create_join_token(
                generate_token(), alias_id=str(self.alias), expires_at=clock.now() + JOIN_TOKEN_TTL
            ).token
            self.server.store.append_audit(
                actor=AUDIT_ACTOR, action="token.generate", target=str(self.alias)
            )
            self.agent = self._agent(bind, health, socket_path)
        except BaseException:
            self.server.store.close()
            raise

    def _register_user(self, progress: Callable[[str], None]) -> RegistrationEntry:
        trust_domain = self.settings.trust_domain
        uid = os.getuid()
        entry, created = ensure_user_entry(
            self.server.store, trust_domain,
            spiffe_id=user_spiffe_id(trust_domain, uid, login_name(uid)),
            parent_id=self.alias, uid=uid,
        )
        if created:
            progress(f"Registered {entry.spiffe_id} for uid {uid}")
        return entry

    def _agent(
        self, bind: tuple[str, int], health: tuple[str, int] | None, socket_path: Path
    ) -> Agent:
        """The agent, trusting the bundle of the server next to it.

        The bundle is stored as the agent's pinned one on every start, not only the
        first, so a CA that rotated while ``up`` was stopped is trusted (an agent
        whose SVID lapsed meanwhile attests again with the fresh token). A live SVID
        from a server that is gone is refused: the agent could not use it.
        """
        storage = AgentStorage(self.agent_dir)
        bundle = self.server.authorities.bundle()
        stored = storage.load_identity(self.settings.trust_domain)
        if (
            stored is not None
            and not stored.expired(self.clock.now())
            and not _issued_by_any(stored.chain[-1], bundle.x509_authorities)
        ):
            raise ConfigError(
                f"the agent's SVID in {self.agent_dir} was issued by a CA this server does not "
                f"have (was {self.server_dir} made anew?); remove {self.agent_dir} and start again"
            )
        storage.save_bundle(bundle)
        config = agent_config({
            "trust_domain": self.settings.trust_domain.name,
            "server": [f"{_connect_host(bind[0])}:{bind[1]}"],
            "data_dir": str(self.agent_dir),
            "socket": str(socket_path),
            "join_token": self.join_token,
            "health_bind": f"{health[0]}:{health[1]}" if health else "0",
            "log_level": self.settings.log_level,
        }, environ={})
        agent_log = logging.getLogger("workload_api.agent")
        return Agent(config, clock=self.clock, progress=agent_log.info)

    def summary(self) -> UpSummary:
        server = self.server.config
        agent = self.agent.config
        identity = self.agent.identity
        return UpSummary(
            trust_domain=self.settings.trust_domain.name,
            spiffe_id=self.entry.spiffe_id,
            selector=", ".join(str(s) for s in self.entry.selectors),
            parent_id=self.entry.parent_id,
            agent_id=str(identity.spiffe_id) if identity else "",
            server_address=f"{server.bind_host}:{server.bind_port}",
            data_dir=self.settings.data_dir,
            server_data_dir=self.server_dir,
            agent_data_dir=self.agent_dir,
            admin_socket=server.admin_socket_path,
            socket=agent.socket_path,
            agent_health=f"http://{agent.health_bind}" if agent.health_bind else None,
            ready_seconds=time.monotonic() - self.started,
        )

    async def run(self, *, on_ready: Callable[[UpSummary], None]) -> None:
        """Serve until SIGINT/SIGTERM: the agent stops first, then the server."""
        loop = asyncio.get_running_loop()
        server_ready = asyncio.Event()
        serving = asyncio.create_task(
            self.server.run(on_ready=lambda _: server_ready.set(), handle_signals=False)
        )
        for sig in SIGNALS:  # until the agent is up, a signal stops the server alone
            loop.add_signal_handler(sig, self.server.stop)
        waiting = asyncio.create_task(server_ready.wait())
        await asyncio.wait({serving, waiting}, return_when=asyncio.FIRST_COMPLETED)
        waiting.cancel()
        if serving.done():  # it could not start, or a signal came first
            serving.result()
            return
        # From now on SIGINT/SIGTERM stop the agent, and the server after it, so no
        # agent request is cut off by the server going away.
        for sig in SIGNALS:
            loop.add_signal_handler(sig, self.agent.stop)
        agent = asyncio.create_task(
            self.agent.run(on_ready=lambda _: self._ready(on_ready), handle_signals=False)
        )
        try:
            await asyncio.wait({agent, serving}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self.agent.stop()
            await asyncio.gather(agent, return_exceptions=True)
            self.server.stop()
            await asyncio.gather(serving, return_exceptions=True)
            for sig in SIGNALS:
                loop.remove_signal_handler(sig)
        for task in (agent, serving):
            if not task.cancelled() and (error := task.exception()) is not None:
                raise error

    def _ready(self, on_ready: Callable[[UpSummary], None]) -> None:
        with contextlib.suppress(NotFound, FailedPrecondition):
            self.server.store.consume_join_token(self.join_token)  # unused when restarted
        on_ready(self.summary())
