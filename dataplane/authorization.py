"""Judging a sidecar's callers by the mesh's AuthorizationPolicies, in the built-in proxy.

The inbound listener of ``tessera sidecar run --proxy builtin`` asks a judge
(:class:`sdk.sidecar.proxy.Judge`) about each caller and request; this one reads the
AuthorizationPolicies that select the sidecar's labels, compiled by
:func:`mesh.compile.compile_authorization`::

    judge = MeshJudge(compile_authorization(config, {"app": "users"}), revision=7,
                      rate_limits=limiter)   # a dataplane.ratelimit.RateLimiter, or None
    listener.set_policy(judge)            # the next requests of open connections too
    judge.decide(peer_id, "GET", "/api")  # Decision(allowed, rule, reason)
    judge.at_handshake().decide(peer_id)  # right after the TLS handshake

A request is judged as Istio judges it (:meth:`mesh.view.Authorization.decide`): DENY
rules first, then ALLOW; when an ALLOW policy selects the workload, a request no ALLOW
rule matches is refused. Right after the handshake the caller alone is judged, so that
one no request could pass is told why at once (403) and its connection closed: a DENY
rule with no ``to`` and no ``when`` that names it refuses it, and so does an ALLOW
policy selecting the workload when no ALLOW rule names it (whatever that rule's ``to``
and ``when``); everyone else goes on to have each request judged.

A decision's ``rule`` is the source of the rule that decided, e.g.
``AuthorizationPolicy users-allow-web spec.rules[0]``, or of the ALLOW policy that
refused by default: the 403 and the ``tessera_sidecar_decisions_total`` metric name it.
Until the first mesh snapshot, :data:`NOT_READY` refuses everyone, saying why.

A request authorization allows then takes a token from each RateLimit of the Service
that applies to its caller (:class:`~dataplane.ratelimit.RateLimiter`); one held back is
refused with status 429 and ``x-envoy-ratelimited: true``, the decision's ``rule``
naming the RateLimit (``RateLimit web-to-users spec``) and its reason the limit. A
refused request takes no token, and neither does the judgement at the handshake.
"""

from __future__ import annotations

import logging
from typing import Final

from dataplane.ratelimit import RATE_LIMITED_HEADERS, RATE_LIMITED_STATUS, RateLimiter
from mesh.request import HttpRequest
from mesh.view import Authorization, AuthorizationRule, JwtRule
from mesh.view import Decision as Decided
from sdk.policy import Decision
from sdk.spiffeid import SpiffeId

__all__ = ["NOT_READY", "MeshJudge", "NotReady"]

_log = logging.getLogger("tessera.sidecar")

NOT_READY_RULE: Final = "not-ready"
MAX_REMEMBERED_DECISIONS: Final = 4096
"""Decisions a judge keeps (by caller, method and path); past that it starts again."""


class NotReady:
    """Refuses every caller: the sidecar has no mesh configuration yet."""

    def decide(
        self, peer_id: SpiffeId, method: str | None = None, path: str | None = None
    ) -> Decision:
        return Decision(
            False, NOT_READY_RULE,
            "this sidecar has not received the mesh configuration from its agent yet, so it "
            "lets nothing through; try again shortly",
        )  # fmt: skip

    def at_handshake(self) -> NotReady:
        return self


NOT_READY: Final = NotReady()


class MeshJudge:
    """The AuthorizationPolicies of one mesh revision, for one sidecar's labels, and the
    RateLimits of its Service (``rate_limits``, kept across revisions by the sidecar)."""

    def __init__(
        self,
        authorization: Authorization,
        *,
        revision: int,
        rate_limits: RateLimiter | None = None,
        jwt_rules: tuple[JwtRule, ...] = (),
    ) -> None:
        """``jwt_rules``: the RequestAuthentications that select the sidecar. The built-in
        proxy does not validate JWTs, so with any, every request is refused (401, naming
        the first) rather than passed on with a token nobody checked."""
        self.authorization = authorization
        self.revision = revision
        self.rate_limits = rate_limits
        self.jwt_rules = jwt_rules
        self._decided: dict[tuple[str, str, str], tuple[Decided, Decision]] = {}
        """What the policies said of a caller, method and path already judged: the same
        each time (the policies are this judge's for life; the rate limits are asked
        each time)."""

    def decide(
        self, peer_id: SpiffeId, method: str | None = None, path: str | None = None
    ) -> Decision:
        """A request (``method`` and ``path``), or the caller alone (as at the handshake)."""
        if method is None or path is None:
            return self._caller(str(peer_id))
        caller = str(peer_id)
        if self.jwt_rules:
            source = self.jwt_rules[0].source
            return Decision(
                False, str(source), f"{source} applies to this sidecar, and the built-in "
                "proxy does not validate JWTs: run tessera sidecar run --proxy envoy",
                status=401,
            )  # fmt: skip
        key = (caller, method, path)
        known = self._decided.get(key)
        if known is None:
            known = self._decide(key)
        decided, decision = known
        if decided.audited or not decision.allowed:
            request = f" for {method} {path}"
            for audited in decided.audited:
                _log.info("AUDIT: %s%s matches %s", caller, request, audited)
            if not decision.allowed:
                _log.info("refused %s%s by %s (mesh revision %d): %s", caller, request,
                          decision.rule, self.revision, decided.reason)  # fmt: skip
                return decision
        limited = self.rate_limits.check(caller) if self.rate_limits is not None else None
        if limited is not None:
            return Decision(
                False, str(limited.rule.source), limited.reason,
                status=RATE_LIMITED_STATUS, headers=RATE_LIMITED_HEADERS,
            )  # fmt: skip
        return decision

    def _decide(self, key: tuple[str, str, str]) -> tuple[Decided, Decision]:
        caller, method, path = key
        decided = self.authorization.decide(caller, HttpRequest.of(method, path))
        decision = Decision(decided.allowed, str(decided.rule),
                            f"{decided.reason} for {method} {path}")  # fmt: skip
        if len(self._decided) >= MAX_REMEMBERED_DECISIONS:
            self._decided.clear()
        self._decided[key] = decided, decision
        return decided, decision

    def at_handshake(self) -> MeshJudge:
        return self  # decide() without a request judges the caller alone

    def _caller(self, caller: str) -> Decision:
        authorization = self.authorization
        for rule in authorization.rules:
            if rule.action == "DENY" and not rule.operations and not rule.conditions and (
                _names(rule, caller)
            ):
                return Decision(False, str(rule.source), f"{caller} is refused by a DENY rule")
        default = authorization.default
        if default.action == "ALLOW":
            return Decision(
                True, str(default.source),
                "no ALLOW policy selects this workload: each request is judged by the DENY "
                "rules",
            )  # fmt: skip
        for rule in authorization.rules:
            if rule.action == "ALLOW" and _names(rule, caller):
                return Decision(
                    True, str(rule.source),
                    f"{caller} is named by an ALLOW rule: each request is judged",
                )  # fmt: skip
        return Decision(
            False, str(default.source),
            f"no ALLOW rule names {caller}, and {default.source} (ALLOW) selects this "
            "workload: refused by default",
        )  # fmt: skip


def _names(rule: AuthorizationRule, caller: str) -> bool:
    """Whether ``rule``'s ``from`` takes ``caller`` (a rule without ``from`` takes all)."""
    return not rule.peers or any(peer.matches(caller) for peer in rule.peers)
