"""Authorization policy: which SPIFFE IDs may call, shared by the SDK and the sidecar.

A policy is a small TOML file::

    mode = "enforce"                 # or "audit": log what would be refused, refuse nothing

    [[allow]]
    name = "web-to-api"
    ids = ["spiffe://example.org/web"]           # exact SPIFFE IDs
    prefixes = ["spiffe://example.org/ops/"]     # IDs under this path
    trust_domains = ["partner.org"]              # any ID of these trust domains
    methods = ["GET", "POST"]                    # optional, HTTP requests only
    paths = ["/api/", "/health"]                 # optional, HTTP path prefixes

    [[deny]]
    name = "no-legacy"
    ids = ["spiffe://example.org/legacy"]

and is used like this::

    policy = Policy.load("/etc/tessera/policy.toml")
    decision = policy.decide(peer_id, method="GET", path="/api/items")
    if not decision.allowed:
        ...  # decision.rule names the rule, decision.reason says why

How a decision is made (the same as Istio's AuthorizationPolicy):

1. a matching deny rule refuses, whatever the allow rules say;
2. otherwise a matching allow rule allows;
3. otherwise the peer is refused as soon as the policy has any allow rule
   (rule ``default-deny``), and allowed when it has none (rule
   ``default-allow``): a policy without allow rules, or an empty one, only
   refuses what its deny rules name.

A rule matches when the peer is named by one of ``ids``, ``prefixes`` or
``trust_domains`` *and* the request fits ``methods`` and ``paths`` when the
rule has them. A rule with ``methods`` or ``paths`` only matches HTTP
requests: when ``decide`` is called without a method and path (at the TLS
handshake), such a rule matches nothing, neither to allow nor to deny. Check
those per request (``sdk.integrations.fastapi.enforce_policy``).

Prefixes and paths match whole segments: ``spiffe://example.org/ops/`` and
``spiffe://example.org/ops`` both match ``spiffe://example.org/ops/db`` and
neither matches ``spiffe://example.org/opsec``; ``/api`` matches ``/api`` and
``/api/items``, not ``/apis``. Request paths are normalised first (``//``
collapsed, ``.`` and ``..`` resolved), so ``/api/../admin`` is ``/admin``.

Every decision is logged on the ``tessera.policy`` logger with the rule that
made it: allows at DEBUG, refusals at INFO, and in audit mode what would have
been refused at WARNING.
"""

from __future__ import annotations

import enum
import logging
import posixpath
import re
import tomllib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from sdk.errors import InvalidArgument, PolicyError
from sdk.spiffeid import SpiffeId, TrustDomain, parse_spiffe_id, parse_trust_domain

__all__ = ["Decision", "Mode", "Policy", "Rule"]

_log = logging.getLogger("tessera.policy")

DEFAULT_DENY: Final = "default-deny"
DEFAULT_ALLOW: Final = "default-allow"

HTTP_METHODS: Final = frozenset(
    {"CONNECT", "DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT", "TRACE"}
)
_TOP_LEVEL_KEYS: Final = frozenset({"mode", "allow", "deny"})
_RULE_KEYS: Final = frozenset({"name", "ids", "prefixes", "trust_domains", "methods", "paths"})
_REPEATED_SLASHES: Final = re.compile(r"/{2,}")


class Mode(enum.StrEnum):
    ENFORCE = "enforce"
    """Refuse what the policy refuses."""
    AUDIT = "audit"
    """Log what the policy would refuse, and allow it."""


@dataclass(frozen=True)
class Decision:
    """What the policy says about one peer (and request)."""

    allowed: bool
    rule: str
    """The name of the rule that decided, or ``default-deny`` / ``default-allow``."""
    reason: str
    """Why, in words fit for a log line or a 403 body."""
    status: int = 403
    """What a refused HTTP request is answered (429 for one a rate limit held back)."""
    headers: tuple[tuple[str, str], ...] = ()
    """Response fields added to that answer."""


@dataclass(frozen=True)
class Rule:
    """One ``[[allow]]`` or ``[[deny]]`` table, validated."""

    name: str
    ids: frozenset[SpiffeId] = frozenset()
    prefixes: tuple[str, ...] = ()
    """SPIFFE ID prefixes without their trailing ``/``."""
    trust_domains: frozenset[TrustDomain] = frozenset()
    methods: frozenset[str] = frozenset()
    paths: tuple[str, ...] = ()
    """Path prefixes without their trailing ``/`` (``/`` itself stays)."""

    def match(self, peer_id: SpiffeId, method: str | None, path: str | None) -> str | None:
        """Which part of the rule names the peer ("its ids", ...), or None if it does not match."""
        if self.methods and (method is None or method not in self.methods):
            return None
        if self.paths and (path is None or not any(_within(path, p) for p in self.paths)):
            return None
        if peer_id in self.ids:
            return "its ids"
        for prefix in self.prefixes:
            if _within(str(peer_id), prefix):
                return f"its prefix {prefix}/"
        if peer_id.trust_domain in self.trust_domains:
            return f"its trust domain {peer_id.trust_domain.name}"
        return None


@dataclass(frozen=True)
class Policy:
    """Allow and deny rules over SPIFFE IDs; build with :meth:`load` or :meth:`from_dict`."""

    allow: tuple[Rule, ...] = ()
    deny: tuple[Rule, ...] = ()
    mode: Mode = Mode.ENFORCE
    source: str = "<dict>"
    """Where the policy came from (the file), for log lines and errors."""

    @classmethod
    def load(cls, path: str | Path) -> Policy:
        """Read and validate a policy file; PolicyError says what is wrong and where."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
            raise PolicyError(f"cannot read the policy file: {reason}", source=path) from err
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            raise PolicyError(f"not valid TOML: {err}", source=path) from err
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "<dict>") -> Policy:
        """Validate a policy given as a dict (the parsed TOML)."""
        _no_unknown_keys(data, _TOP_LEVEL_KEYS, source=source, rule=None)
        mode_value = data.get("mode", Mode.ENFORCE.value)
        if mode_value not in {m.value for m in Mode}:
            raise PolicyError(
                f'mode must be "enforce" or "audit", not {mode_value!r}', source=source
            )
        names: dict[str, str] = {}
        allow = tuple(_parse_rules(data, "allow", names, source))
        deny = tuple(_parse_rules(data, "deny", names, source))
        return cls(allow=allow, deny=deny, mode=Mode(mode_value), source=source)

    def decide(
        self, peer_id: SpiffeId, method: str | None = None, path: str | None = None
    ) -> Decision:
        """Allow or refuse ``peer_id`` (for ``method`` and ``path`` when it is an HTTP request)."""
        if path is not None:
            path = _normalise_path(path)
        decision = self._evaluate(peer_id, method, path)
        request = _describe_request(method, path)
        if decision.allowed:
            _log.debug(
                "policy %s: allowed %s%s by rule %r: %s",
                self.source, peer_id, request, decision.rule, decision.reason,
                extra=_log_fields(peer_id, decision),
            )  # fmt: skip
            return decision
        if self.mode is Mode.AUDIT:
            _log.warning(
                "policy %s: audit mode, would have refused %s%s by rule %r: %s",
                self.source, peer_id, request, decision.rule, decision.reason,
                extra=_log_fields(peer_id, decision),
            )  # fmt: skip
            return Decision(
                allowed=True,
                rule=decision.rule,
                reason=f"audit mode, would have refused: {decision.reason}",
            )
        _log.info(
            "policy %s: refused %s%s by rule %r: %s",
            self.source, peer_id, request, decision.rule, decision.reason,
            extra=_log_fields(peer_id, decision),
        )  # fmt: skip
        return decision

    def _evaluate(self, peer_id: SpiffeId, method: str | None, path: str | None) -> Decision:
        request = _describe_request(method, path)
        for rule in self.deny:
            matched = rule.match(peer_id, method, path)
            if matched is not None:
                return Decision(False, rule.name, f"denied by {matched}{request}")
        for rule in self.allow:
            matched = rule.match(peer_id, method, path)
            if matched is not None:
                return Decision(True, rule.name, f"allowed by {matched}{request}")
        if self.allow:
            return Decision(False, DEFAULT_DENY, f"no allow rule matches it{request}")
        return Decision(
            True, DEFAULT_ALLOW, f"no deny rule matches it{request}, and there are no allow rules"
        )


# -- parsing -----------------------------------------------------------------------------


def _parse_rules(
    data: Mapping[str, Any], kind: str, names: dict[str, str], source: str
) -> Iterable[Rule]:
    tables = data.get(kind, [])
    if not isinstance(tables, list):
        raise PolicyError(
            f"{kind} must be an array of tables ([[{kind}]]), not {_type_name(tables)}",
            source=source,
        )
    for index, table in enumerate(tables):
        label = f"{kind}[{index}]"
        if not isinstance(table, Mapping):
            raise PolicyError(
                f"must be a table ([[{kind}]]), not {_type_name(table)}", source=source, rule=label
            )
        name = table.get("name")
        if name is not None:
            label = f"{label} ({name!r})" if isinstance(name, str) else label
        rule = _parse_rule(table, f"{kind}[{index}]", source, label)
        if rule.name in names:
            raise PolicyError(
                f"name {rule.name!r} is already used by {names[rule.name]}",
                source=source,
                rule=label,
            )
        names[rule.name] = f"{kind}[{index}]"
        yield rule


def _parse_rule(table: Mapping[str, Any], default_name: str, source: str, label: str) -> Rule:
    def fail(message: str) -> PolicyError:
        return PolicyError(message, source=source, rule=label)

    _no_unknown_keys(table, _RULE_KEYS, source=source, rule=label)
    name = table.get("name", default_name)
    if not isinstance(name, str) or not name.strip():
        raise fail("name must be a non-empty string")
    if name in {DEFAULT_DENY, DEFAULT_ALLOW}:
        raise fail(f"name {name!r} is reserved for the policy's default decision")

    try:
        ids = frozenset(
            parse_spiffe_id(value, what="ids entry") for value in _strings(table, "ids", fail)
        )
        prefixes = tuple(_parse_prefix(value) for value in _strings(table, "prefixes", fail))
        trust_domains = frozenset(
            parse_trust_domain(value) for value in _strings(table, "trust_domains", fail)
        )
    except InvalidArgument as err:
        raise fail(err.message) from err
    if not (ids or prefixes or trust_domains):
        raise fail("the rule names no peer: give at least one of ids, prefixes, trust_domains")

    methods = _strings(table, "methods", fail, required_if_present=True)
    for method in methods:
        if method not in HTTP_METHODS:
            raise fail(
                f"{method!r} in methods is not an HTTP method; use one of "
                f"{', '.join(sorted(HTTP_METHODS))} (upper case)"
            )
    paths = _strings(table, "paths", fail, required_if_present=True)
    for path in paths:
        if not path.startswith("/"):
            raise fail(f"{path!r} in paths must start with '/'")
    return Rule(
        name=name,
        ids=ids,
        prefixes=prefixes,
        trust_domains=trust_domains,
        methods=frozenset(methods),
        paths=tuple(_normalise_path(p) for p in paths),
    )


def _strings(
    table: Mapping[str, Any],
    key: str,
    fail: Callable[[str], PolicyError],
    *,
    required_if_present: bool = False,
) -> list[str]:
    value = table.get(key, [])
    if not isinstance(value, list):
        raise fail(f"{key} must be an array of strings, not {_type_name(value)}")
    for item in value:
        if not isinstance(item, str):
            raise fail(f"{key} must be an array of strings; {item!r} is {_type_name(item)}")
    if required_if_present and key in table and not value:
        raise fail(
            f"{key} is empty, which would match nothing; leave it out to match every {key[:-1]}"
        )
    return value


def _parse_prefix(value: str) -> str:
    """``spiffe://example.org/ops/`` -> ``spiffe://example.org/ops`` (validated as a SPIFFE ID)."""
    stripped = value.rstrip("/") if value.startswith("spiffe://") else value
    try:
        parse_spiffe_id(stripped, what="prefixes entry")
    except InvalidArgument as err:
        raise InvalidArgument(err.message.replace(repr(stripped), repr(value), 1)) from err
    return stripped


def _no_unknown_keys(
    data: Mapping[str, Any], known: frozenset[str], *, source: str, rule: str | None
) -> None:
    for key in data:
        if key not in known:
            raise PolicyError(
                f"unknown key {key!r}; expected one of {', '.join(sorted(known))}",
                source=source,
                rule=rule,
            )


def _type_name(value: object) -> str:
    names = {dict: "a table", list: "an array", str: "a string", int: "an integer"}
    return names.get(type(value), type(value).__name__)


# -- matching ----------------------------------------------------------------------------


def _within(value: str, prefix: str) -> bool:
    """Whether ``value`` is ``prefix`` or below it, segment by segment."""
    if prefix == "/":
        return value.startswith("/")
    return value == prefix or value.startswith(prefix + "/")


def _normalise_path(path: str) -> str:
    """Collapse ``//``, resolve ``.`` and ``..``; keep the leading ``/`` and drop a trailing one."""
    collapsed = _REPEATED_SLASHES.sub("/", path)
    normalised = posixpath.normpath(collapsed) if collapsed else "/"
    return normalised if normalised.startswith("/") else "/" + normalised


def _describe_request(method: str | None, path: str | None) -> str:
    parts: Sequence[str] = [p for p in (method, path) if p is not None]
    return f" for {' '.join(parts)}" if parts else ""


def _log_fields(peer_id: SpiffeId, decision: Decision) -> dict[str, Any]:
    return {
        "peer_spiffe_id": str(peer_id),
        "policy_rule": decision.rule,
        "policy_allowed": decision.allowed,
    }
