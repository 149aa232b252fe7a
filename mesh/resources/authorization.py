"""``AuthorizationPolicy`` (security.istio.io): who may call the workloads it selects.

Tessera's subset of Istio's fields (everything else is refused by name):

- spec: ``selector.matchLabels``, ``action`` (ALLOW, the default; DENY; AUDIT),
  ``rules``
- rules[]: ``from[].source`` (``principals``, ``notPrincipals``),
  ``to[].operation`` (``methods``, ``notMethods``, ``paths``, ``notPaths``),
  ``when[]`` (``key`` ``request.auth.claims[<claim>]``, ``values``, ``notValues``)

Example::

    apiVersion: security.istio.io/v1
    kind: AuthorizationPolicy
    metadata: {name: users-readers}
    spec:
      selector: {matchLabels: {app: users}}
      action: ALLOW
      rules:
      - from:
        - source: {principals: ["spiffe://example.org/orders", "spiffe://example.org/team/*"]}
        to:
        - operation: {methods: [GET], paths: ["/api/v1/users/*"]}

Principals are SPIFFE IDs: exact, a prefix ending in ``/*``, or ``*``
(:mod:`mesh.principals`); Istio's scheme-less form is refused with the spelling to use.
As in Istio, a workload that any ALLOW policy selects refuses every request no ALLOW
rule matches; DENY is judged before ALLOW. A policy without a selector selects every
workload of the trust domain. ``when`` reads the claims of the JWT a
``RequestAuthentication`` validated.
"""

from __future__ import annotations

import re
from typing import Annotated, ClassVar, Literal, Self

from pydantic import AfterValidator, Field, Strict, model_validator

from mesh.fields import Method, Model, PathPattern, Principal, Text, nonempty, unique
from mesh.resources.base import Resource, WorkloadSelector

__all__ = [
    "AuthorizationPolicy",
    "AuthorizationPolicySpec",
    "Condition",
    "Operation",
    "Rule",
    "RuleFrom",
    "RuleTo",
    "Source",
]

_CLAIM_KEY = re.compile(r"request\.auth\.claims(\[[^\[\]\s]+\])+")

Principals = Annotated[tuple[Principal, ...], nonempty, unique]
Methods = Annotated[tuple[Method, ...], nonempty, unique]
PathPatterns = Annotated[tuple[PathPattern, ...], nonempty, unique]
Values = Annotated[tuple[Text, ...], nonempty, unique]


def _check_claim_key(key: str) -> str:
    if len(key) > 256 or _CLAIM_KEY.fullmatch(key) is None:
        raise ValueError(
            "must be request.auth.claims[<claim>] (e.g. request.auth.claims[groups], or "
            "request.auth.claims[a][b] for a nested claim): Tessera's conditions read "
            "the claims of the caller's validated JWT"
        )
    return key


ClaimKey = Annotated[str, Strict(), AfterValidator(_check_claim_key)]


class Source(Model):
    principals: Principals | None = None
    not_principals: Principals | None = None

    @model_validator(mode="after")
    def _check_not_empty(self) -> Self:
        if self.principals is None and self.not_principals is None:
            raise ValueError("must set principals, notPrincipals or both")
        return self


class Operation(Model):
    methods: Methods | None = None
    not_methods: Methods | None = None
    paths: PathPatterns | None = None
    not_paths: PathPatterns | None = None

    @model_validator(mode="after")
    def _check_not_empty(self) -> Self:
        if all(
            value is None for value in (self.methods, self.not_methods, self.paths, self.not_paths)
        ):
            raise ValueError("must set at least one of methods, notMethods, paths or notPaths")
        return self


class RuleFrom(Model):
    source: Source


class RuleTo(Model):
    operation: Operation


class Condition(Model):
    key: ClaimKey
    values: Values | None = None
    not_values: Values | None = None

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.values is None and self.not_values is None:
            raise ValueError("must set values, notValues or both")
        return self


class Rule(Model):
    """Matches a request when each of ``from``, ``to`` and ``when`` given matches."""

    from_: Annotated[tuple[RuleFrom, ...], nonempty] | None = Field(default=None, alias="from")
    to: Annotated[tuple[RuleTo, ...], nonempty] | None = None
    when: Annotated[tuple[Condition, ...], nonempty] | None = None


class AuthorizationPolicySpec(Model):
    selector: WorkloadSelector | None = None
    action: Literal["ALLOW", "DENY", "AUDIT"] | None = None
    rules: tuple[Rule, ...] | None = None

    @property
    def effective_action(self) -> Literal["ALLOW", "DENY", "AUDIT"]:
        """``action``, or ALLOW (Istio's default) when it is left out."""
        return self.action or "ALLOW"


class AuthorizationPolicy(Resource):
    """Allow, deny or audit requests to the selected workloads by caller and operation."""

    GROUP: ClassVar[str] = "security.istio.io"
    VERSIONS: ClassVar[tuple[str, ...]] = ("v1", "v1beta1")
    KIND: ClassVar[str] = "AuthorizationPolicy"

    kind: Literal["AuthorizationPolicy"]
    spec: AuthorizationPolicySpec
