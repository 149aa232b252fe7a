"""The callers a policy names: SPIFFE IDs, exact or by prefix.

Istio's ``principals`` are the peer's SPIFFE ID without its scheme
(``cluster.local/ns/default/sa/web``); Tessera's are whole SPIFFE IDs, parsed as the SDK
parses them, in one of three forms:

- ``spiffe://example.org/web`` — exactly that ID;
- ``spiffe://example.org/team/*`` — every ID under ``spiffe://example.org/team/``
  (``/team/a``, ``/team/a/b``), never ``/team`` itself nor ``/team-evil``: a prefix
  ends at a ``/``, so a name that merely begins the same way is not matched;
  ``spiffe://example.org/*`` is every ID of the trust domain;
- ``*`` — any authenticated caller.

Usage::

    pattern = parse_principal("spiffe://example.org/team/*")
    pattern.matches("spiffe://example.org/team/api")    # True
"""

from __future__ import annotations

from dataclasses import dataclass

from sdk.errors import InvalidArgument
from sdk.spiffeid import parse_spiffe_id, parse_trust_domain

__all__ = [
    "PrincipalPattern",
    "check_principal",
    "check_spiffe_id",
    "parse_principal",
]

_ANY = "*"
_SCHEME = "spiffe://"


@dataclass(frozen=True)
class PrincipalPattern:
    """``prefix`` is None for an exact ID, ``""`` for ``*``, else ends with ``/``."""

    text: str
    exact: str | None
    prefix: str | None

    def matches(self, spiffe_id: str) -> bool:
        if self.exact is not None:
            return spiffe_id == self.exact
        assert self.prefix is not None
        return spiffe_id.startswith(self.prefix) and len(spiffe_id) > len(self.prefix)


def parse_principal(text: str) -> PrincipalPattern:
    """Parse one of the three forms; raise ``ValueError`` saying which form to use."""
    if text == _ANY:
        return PrincipalPattern(text, exact=None, prefix="")
    if not text.startswith(_SCHEME):
        raise ValueError(_not_spiffe_message(text))
    if text.endswith("/*"):
        base = text[: -len("/*")]
        if "*" in base:
            raise ValueError(_wildcard_message())
        _parse_prefix_base(base)
        return PrincipalPattern(text, exact=None, prefix=base + "/")
    if "*" in text:
        raise ValueError(_wildcard_message())
    check_spiffe_id(text)
    return PrincipalPattern(text, exact=text, prefix=None)


def check_principal(text: str) -> None:
    parse_principal(text)


def check_spiffe_id(text: str) -> None:
    """An exact SPIFFE ID; raise ``ValueError`` with the SDK's reason."""
    if not text.startswith(_SCHEME):
        raise ValueError(_not_spiffe_message(text))
    try:
        spiffe_id = parse_spiffe_id(text)
    except InvalidArgument as err:
        raise ValueError(err.message) from None
    if not spiffe_id.path:
        raise ValueError(
            f"names trust domain {spiffe_id.trust_domain.name}, not a workload: write a "
            f"workload's ID, or spiffe://{spiffe_id.trust_domain.name}/* for every ID in it"
        )


def _parse_prefix_base(base: str) -> None:
    authority_and_path = base[len(_SCHEME) :]
    if "/" not in authority_and_path:
        try:
            parse_trust_domain(authority_and_path)
        except InvalidArgument as err:
            raise ValueError(err.message) from None
        return
    try:
        parse_spiffe_id(base)
    except InvalidArgument as err:
        raise ValueError(f"has a prefix that is not a SPIFFE ID: {err.message}") from None


def _not_spiffe_message(text: str) -> str:
    hint = ""
    if text and "/" in text and "://" not in text:
        # Istio's form: the trust domain and path without the scheme.
        hint = f"; Istio's {text!r} is written spiffe://{text}"
    return (
        "must be a SPIFFE ID (spiffe://example.org/web), a prefix ending in '/*' "
        f"(spiffe://example.org/team/*) or '*'{hint}"
    )


def _wildcard_message() -> str:
    return (
        "may have '*' only as a whole last path segment (spiffe://example.org/team/*): "
        "a prefix ends at a '/'"
    )
