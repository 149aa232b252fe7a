"""``proxy.toml``: where ``tessera sidecar proxy`` listens and forwards, and whom it lets through.

::

    health_bind = "127.0.0.1:8090"          # /live, /ready, /metrics; "0" turns them off
    spiffe_id = "spiffe://example.org/api"  # which of the workload's SVIDs to present

    [[inbound]]                             # mTLS listener -> local plaintext app
    listen = "0.0.0.0:8443"
    forward = "127.0.0.1:8080"
    policy = "policy.toml"                  # or an inline [inbound.policy] table
    protocol = "http"                       # "tcp" (default) or "http"

    [[outbound]]                            # local plaintext listener -> mTLS upstream
    listen = "127.0.0.1:9000"
    upstream = "api.internal:8443"
    spiffe_id = "spiffe://example.org/api"  # or trust_domain = "..." or one_of = [...]

    config = load_proxy_config("proxy.toml")   # SidecarConfigError names the key and the fix

Relative policy paths are read from the directory of ``proxy.toml``.
Unknown keys, bad addresses, unreadable or invalid policies, a listener
address used twice, and policy rules with ``methods``/``paths`` on a
``protocol = "tcp"`` listener (where there is no request to match them
against) are all refused with a sentence naming the key.
"""

from __future__ import annotations

import enum
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from sdk.address import HostPort
from sdk.authorize import Authorizer, authorize_id, authorize_member_of, authorize_one_of
from sdk.errors import ConfigError, InvalidArgument, PolicyError
from sdk.policy import Policy
from sdk.sidecar.errors import SidecarConfigError
from sdk.spiffeid import SpiffeId, parse_spiffe_id, parse_trust_domain

__all__ = [
    "DEFAULT_PROXY_HEALTH_BIND",
    "HostPort",
    "InboundConfig",
    "ListenerProtocol",
    "OutboundConfig",
    "ProxyConfig",
    "load_proxy_config",
    "parse_health_bind",
    "parse_host_port",
    "parse_proxy_config",
    "parse_svid_id",
]

DEFAULT_PROXY_HEALTH_BIND: Final = "127.0.0.1:8090"

_TOP_LEVEL_KEYS: Final = frozenset({"health_bind", "socket", "spiffe_id", "inbound", "outbound"})
_INBOUND_KEYS: Final = frozenset({"name", "listen", "forward", "policy", "protocol"})
_OUTBOUND_KEYS: Final = frozenset({"name", "listen", "upstream", "spiffe_id", "trust_domain",
                                   "one_of"})  # fmt: skip
_UPSTREAM_CHOICES: Final = ("spiffe_id", "trust_domain", "one_of")

_Fail = Callable[[str], SidecarConfigError]


class ListenerProtocol(enum.StrEnum):
    TCP = "tcp"
    """Bytes both ways; the policy judges the peer once, at the handshake."""
    HTTP = "http"
    """HTTP/1.1 requests, each judged with its method and path."""


@dataclass(frozen=True)
class InboundConfig:
    """An mTLS listener that forwards the connections the policy allows to a local app."""

    name: str
    listen: HostPort
    forward: HostPort
    policy: Policy
    protocol: ListenerProtocol = ListenerProtocol.TCP
    policy_file: Path | None = None
    """The policy file, when ``policy`` names one (it is reloaded when it changes)."""

    def load_policy(self) -> Policy:
        """Read :attr:`policy_file` again, checked as at start; SidecarConfigError says why not."""
        if self.policy_file is None:
            return self.policy
        try:
            policy = Policy.load(self.policy_file)
        except PolicyError as err:
            raise SidecarConfigError(f"{self.name}: {err.message}") from err
        _check_rules_fit(policy, self.protocol, self.name, SidecarConfigError)
        return policy


@dataclass(frozen=True)
class OutboundConfig:
    """A local plaintext listener whose connections go out over mTLS to ``upstream``."""

    name: str
    listen: HostPort
    upstream: HostPort
    accept: str
    """Which key says what upstream is accepted: ``spiffe_id``, ``trust_domain`` or ``one_of``."""
    accepted: tuple[str, ...]
    """Its value(s), validated."""

    def authorizer(self) -> Authorizer:
        if self.accept == "spiffe_id":
            return authorize_id(self.accepted[0])
        if self.accept == "trust_domain":
            return authorize_member_of(self.accepted[0])
        return authorize_one_of(*self.accepted)

    @property
    def expected(self) -> str:
        """Which upstream IDs are accepted, in words (``spiffe_id spiffe://example.org/api``)."""
        return f"{self.accept} {', '.join(self.accepted)}"


@dataclass(frozen=True)
class ProxyConfig:
    source: str
    """The file this came from (for messages)."""
    inbound: tuple[InboundConfig, ...] = ()
    outbound: tuple[OutboundConfig, ...] = ()
    health_bind: HostPort | None = None
    socket: str | None = None
    spiffe_id: SpiffeId | None = None

    @property
    def listeners(self) -> tuple[InboundConfig | OutboundConfig, ...]:
        return (*self.inbound, *self.outbound)


def load_proxy_config(path: str | Path) -> ProxyConfig:
    """Read and validate ``proxy.toml``; SidecarConfigError says what is wrong and where."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        raise SidecarConfigError(f"cannot read the proxy config {path}: {reason}") from err
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise SidecarConfigError(f"{path}: not valid TOML: {err}") from err
    return parse_proxy_config(data, source=path)


def parse_proxy_config(data: Mapping[str, Any], *, source: str | Path) -> ProxyConfig:
    """Validate the parsed TOML; relative policy paths are taken from ``source``'s directory."""
    source_path = Path(source)
    where = str(source)

    def fail(message: str) -> SidecarConfigError:
        return SidecarConfigError(f"{where}: {message}")

    _no_unknown_keys(data, _TOP_LEVEL_KEYS, "at the top level", fail)
    inbound_tables = _tables(data, "inbound", fail)
    outbound_tables = _tables(data, "outbound", fail)
    if not inbound_tables and not outbound_tables:
        raise fail("nothing to do: add an [[inbound]] or an [[outbound]] table")
    inbound = tuple(
        _inbound(table, f"inbound[{i}]", source_path.parent, fail)
        for i, table in enumerate(inbound_tables)
    )
    outbound = tuple(
        _outbound(table, f"outbound[{i}]", fail) for i, table in enumerate(outbound_tables)
    )
    used: dict[HostPort, str] = {}
    labelled: list[tuple[str, InboundConfig | OutboundConfig]] = [
        *((f"inbound[{i}]", listener) for i, listener in enumerate(inbound)),
        *((f"outbound[{i}]", listener) for i, listener in enumerate(outbound)),
    ]
    for label, listener in labelled:
        if listener.listen in used:
            raise fail(
                f"{label}.listen {listener.listen} is already used by {used[listener.listen]}"
            )
        used[listener.listen] = label
    names = [listener.name for _, listener in labelled]
    for name in names:
        if names.count(name) > 1:
            raise fail(f"the listener name {name!r} is used twice; names must be unique")

    socket = data.get("socket")
    if socket is not None and (not isinstance(socket, str) or not socket.strip()):
        raise fail('socket must be the Workload API socket, e.g. "unix:///run/tessera/agent.sock"')
    spiffe_id = None
    if "spiffe_id" in data:
        spiffe_id = _svid_id(data["spiffe_id"], "spiffe_id", fail)
    try:
        health_bind = parse_health_bind(
            data.get("health_bind", DEFAULT_PROXY_HEALTH_BIND), what="health_bind"
        )
    except SidecarConfigError as err:
        raise fail(err.message) from err
    return ProxyConfig(
        source=where,
        inbound=inbound,
        outbound=outbound,
        health_bind=health_bind,
        socket=socket.strip() if isinstance(socket, str) else None,
        spiffe_id=spiffe_id,
    )


def parse_host_port(value: object, *, what: str, example: str) -> HostPort:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6); SidecarConfigError otherwise."""
    try:
        return HostPort.parse(value, what=what, example=example)
    except ConfigError as err:
        raise SidecarConfigError(err.message) from err


def parse_health_bind(value: object, *, what: str = "--health-bind") -> HostPort | None:
    """A health endpoint address, or None for ``0`` / empty (turned off)."""
    text = "" if value is None else str(value).strip()
    if text in ("", "0"):
        return None
    try:
        return parse_host_port(text, what=what, example="127.0.0.1:8090")
    except SidecarConfigError as err:
        raise SidecarConfigError(f"{err.message}; use 0 to turn the health endpoints off") from err


def parse_svid_id(value: str, *, what: str) -> SpiffeId:
    """The SPIFFE ID of a workload (with a path), as a sidecar selects its SVID by it."""

    return _svid_id(value, what, SidecarConfigError)


# -- listeners ---------------------------------------------------------------------------


def _inbound(table: Mapping[str, Any], label: str, base: Path, fail: _Fail) -> InboundConfig:
    _no_unknown_keys(table, _INBOUND_KEYS, f"in {label}", fail)
    name = _name(table, label, fail)
    listen = _address(table, "listen", label, "0.0.0.0:8443",
                      "the HOST:PORT to accept mTLS connections on", fail)  # fmt: skip
    forward = _address(table, "forward", label, "127.0.0.1:8080",
                       "the HOST:PORT of the local app", fail)  # fmt: skip
    protocol_value = table.get("protocol", ListenerProtocol.TCP.value)
    if protocol_value not in {p.value for p in ListenerProtocol}:
        raise fail(f'{label}.protocol must be "tcp" or "http", not {protocol_value!r}')
    protocol = ListenerProtocol(protocol_value)
    policy, policy_file = _policy(table, label, base, fail)
    _check_rules_fit(policy, protocol, label, fail)
    return InboundConfig(name=name, listen=listen, forward=forward, policy=policy,
                         protocol=protocol, policy_file=policy_file)  # fmt: skip


def _check_rules_fit(policy: Policy, protocol: ListenerProtocol, label: str, fail: _Fail) -> None:
    if protocol is not ListenerProtocol.TCP:
        return
    for rule in (*policy.allow, *policy.deny):
        if rule.methods or rule.paths:
            raise fail(
                f"{label}: policy rule {rule.name!r} names methods or paths, which only HTTP "
                'requests have; set protocol = "http" on this listener, or drop them from '
                "the rule"
            )


def _outbound(table: Mapping[str, Any], label: str, fail: _Fail) -> OutboundConfig:
    _no_unknown_keys(table, _OUTBOUND_KEYS, f"in {label}", fail)
    name = _name(table, label, fail)
    listen = _address(table, "listen", label, "127.0.0.1:9000",
                      "the local HOST:PORT your app connects to", fail)  # fmt: skip
    upstream = _address(table, "upstream", label, "api.internal:8443",
                        "the HOST:PORT of the mTLS service to reach", fail)  # fmt: skip
    given = [key for key in _UPSTREAM_CHOICES if key in table]
    if not given:
        raise fail(
            f"{label}: say which upstream SPIFFE IDs to accept: give one of "
            f"{', '.join(_UPSTREAM_CHOICES)}"
        )
    if len(given) > 1:
        raise fail(
            f"{label}: give only one of {', '.join(_UPSTREAM_CHOICES)}, not {' and '.join(given)}"
        )
    key = given[0]
    value = table[key]
    accepted: tuple[str, ...]
    if key == "spiffe_id":
        accepted = (str(_svid_id(value, f"{label}.spiffe_id", fail)),)
    elif key == "trust_domain":
        if not isinstance(value, str):
            raise fail(f"{label}.trust_domain must be a string, e.g. \"example.org\"")
        try:
            accepted = (parse_trust_domain(value).name,)
        except InvalidArgument as err:
            raise fail(f"{label}.trust_domain: {err.message}") from err
    else:
        if not isinstance(value, list) or not value:
            raise fail(f"{label}.one_of must be a non-empty array of SPIFFE IDs")
        accepted = tuple(str(_svid_id(item, f"{label}.one_of entry", fail)) for item in value)
    return OutboundConfig(name, listen, upstream, accept=key, accepted=accepted)


def _policy(
    table: Mapping[str, Any], label: str, base: Path, fail: _Fail
) -> tuple[Policy, Path | None]:
    value = table.get("policy")
    try:
        if isinstance(value, str) and value.strip():
            path = Path(value)
            path = path if path.is_absolute() else base / path
            return Policy.load(path), path
        if isinstance(value, Mapping):
            return Policy.from_dict(value, source=f"[{label}.policy]"), None
    except PolicyError as err:
        raise fail(f"{label}.policy: {err.message}") from err
    if value is None:
        raise fail(
            f'{label}: policy is missing; give policy = "policy.toml" (a policy file) or an '
            "inline [inbound.policy] table (an empty table allows every SPIFFE ID the trust "
            "bundles vouch for)"
        )
    raise fail(f"{label}.policy must be a file name or a table, not {_type_name(value)}")


def _address(table: Mapping[str, Any], key: str, label: str, example: str, meaning: str,
             fail: _Fail) -> HostPort:  # fmt: skip
    if key not in table:
        raise fail(f'{label}: {key} is missing; give {meaning}, e.g. {key} = "{example}"')
    try:
        return parse_host_port(table[key], what=f"{label}.{key}", example=example)
    except SidecarConfigError as err:
        raise fail(err.message) from err


def _name(table: Mapping[str, Any], label: str, fail: _Fail) -> str:
    name = table.get("name", label)
    if not isinstance(name, str) or not name.strip():
        raise fail(f"{label}.name must be a non-empty string")
    return name.strip()


def _svid_id(value: object, what: str, fail: _Fail) -> SpiffeId:
    if not isinstance(value, str):
        raise fail(f"{what} must be a SPIFFE ID string, e.g. \"spiffe://example.org/api\"")
    try:
        spiffe_id = parse_spiffe_id(value, what=what)
    except InvalidArgument as err:
        raise fail(err.message) from err
    if not spiffe_id.path:
        raise fail(
            f"{what} {value!r} names a trust domain, not a workload; give the SPIFFE ID of a "
            "workload, e.g. spiffe://example.org/api"
        )
    return spiffe_id


def _tables(data: Mapping[str, Any], key: str, fail: _Fail) -> Sequence[Mapping[str, Any]]:
    value = data.get(key, [])
    if not isinstance(value, list) or not all(isinstance(t, Mapping) for t in value):
        raise fail(f"{key} must be an array of tables, written [[{key}]]")
    return value


def _no_unknown_keys(data: Mapping[str, Any], known: frozenset[str], where: str,
                     fail: _Fail) -> None:  # fmt: skip
    for key in data:
        if key not in known:
            raise fail(f"unknown key {key!r} {where}; expected one of {', '.join(sorted(known))}")


def _type_name(value: object) -> str:
    names = {dict: "a table", list: "an array", str: "a string", int: "an integer"}
    return names.get(type(value), type(value).__name__)
