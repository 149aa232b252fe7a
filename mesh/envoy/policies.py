"""Who may call, how often, with which token: the view's policies as Envoy HTTP filters.

- **Authorization** (:func:`rbac_filters`): Istio's order, one RBAC filter each —
  AUDIT rules as shadow rules (they log, never decide; the matching rule is in the
  access log), then DENY rules, then, when an ALLOW policy selects the workload, the
  ALLOW rules (a request none of them matches is refused, ``spec: {}`` refuses all).
  Callers are their certificate's URI SAN (``authenticated.principal_name``); paths
  are the path without its query, after Envoy's normalisation, as the view judges them.
- **The caller's SPIFFE ID** (:func:`identity_header_filter`): every spelling of
  ``X-Forwarded-Client-Spiffe-Id`` a caller sent, and ``X_Forwarded_Client_Cert``
  spellings, are removed, then the header is set from the TLS handshake
  (``%DOWNSTREAM_PEER_URI_SAN%``) — what the built-in sidecar hands the app, and the key
  rate limits read. ``X-Forwarded-Client-Cert`` itself is set by the connection
  manager (``SANITIZE_SET``).
- **Rate limits** (:func:`rate_limit_filter`): one token bucket per RateLimit (callers
  sharing it matched on that header, which only Envoy writes), or one per caller
  (a wildcard descriptor: a bucket for each SPIFFE ID seen, the most recent
  ``max_callers`` kept). A request takes a token from every bucket that applies.
- **JWTs** (:func:`jwt_filter`): a provider per ``jwtRules`` entry; a request without a
  token passes, one with a token no provider accepts gets 401 (Istio's rule); the
  validated payload goes to the metadata the ``when`` conditions read.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from typing import Any, Final
from urllib.parse import urlsplit

from mesh.envoy.values import any_of, metadata, runtime_fraction, socket_address, typed
from mesh.principals import parse_principal
from mesh.view import (
    Authorization,
    AuthorizationRule,
    ClaimCondition,
    JwtRule,
    OperationMatch,
    PeerMatch,
    RateLimitRule,
)

__all__ = [
    "IDENTITY_HEADER",
    "JWT_FILTER",
    "JWT_PAYLOAD",
    "RATE_LIMIT_KEY",
    "RBAC_AUDIT_PREFIX",
    "http_filter",
    "identity_header_filter",
    "jwt_filter",
    "rate_limit_filter",
    "rbac_filters",
]

IDENTITY_HEADER: Final = "x-forwarded-client-spiffe-id"
"""The caller's SPIFFE ID as the app (and the rate limits) see it; Envoy sets it."""

_FORGED_IDENTITY: Final = (
    # Any spelling of the identity header, and X-Forwarded-Client-Cert spelt with an
    # underscore (the connection manager replaces the dashed one; WSGI servers would
    # read both as one).
    "x[-_]forwarded[-_]client[-_]spiffe[-_]id"
    "|x_forwarded[-_]client[-_]cert|x-forwarded_client[-_]cert|x-forwarded-client_cert"
)

RBAC_FILTER_CONFIG: Final = "envoy.extensions.filters.http.rbac.v3.RBAC"
RBAC_AUDIT_PREFIX: Final = "tessera_audit_"
"""The AUDIT filter's shadow rules write ``tessera_audit_shadow_effective_policy_id``
(the AUDIT rule that matched) in the ``envoy.filters.http.rbac`` metadata."""

RATE_LIMIT_KEY: Final = "tessera_ratelimit"
_CALLER_KEY: Final = "caller"

JWT_FILTER: Final = "envoy.filters.http.jwt_authn"
JWT_PAYLOAD: Final = "payload"
"""Where a validated token's claims are: ``envoy.filters.http.jwt_authn`` metadata."""
_JWKS_FETCH_TIMEOUT: Final = "5s"
_JWKS_CACHE: Final = "300s"


def http_filter(name: str, config: dict[str, Any]) -> dict[str, Any]:
    """An HTTP filter of a connection manager: its name and typed config."""
    return {"name": name, "typed_config": config}


# -- authorization --------------------------------------------------------------------------


def rbac_filters(authorization: Authorization) -> list[dict[str, Any]]:
    """The RBAC filters of a view's authorization: audit, deny, allow (each only when
    it has something to do)."""
    by_action: dict[str, list[AuthorizationRule]] = {"AUDIT": [], "DENY": [], "ALLOW": []}
    for rule in authorization.rules:
        by_action[rule.action].append(rule)
    filters = []
    if by_action["AUDIT"]:
        filters.append(
            http_filter(
                "tessera.rbac.audit",
                typed(
                    RBAC_FILTER_CONFIG,
                    shadow_rules={"action": "ALLOW", "policies": _policies(by_action["AUDIT"])},
                    shadow_rules_stat_prefix=RBAC_AUDIT_PREFIX,
                ),
            )
        )
    if by_action["DENY"]:
        filters.append(
            http_filter(
                "tessera.rbac.deny",
                typed(
                    RBAC_FILTER_CONFIG,
                    rules={"action": "DENY", "policies": _policies(by_action["DENY"])},
                    rules_stat_prefix="tessera_deny_",
                ),
            )
        )
    if authorization.default.action == "DENY":
        filters.append(
            http_filter(
                "tessera.rbac.allow",
                typed(
                    RBAC_FILTER_CONFIG,
                    rules={"action": "ALLOW", "policies": _policies(by_action["ALLOW"])},
                    rules_stat_prefix="tessera_allow_",
                ),
            )
        )
    return filters


def _policies(rules: Sequence[AuthorizationRule]) -> dict[str, Any]:
    """One Envoy policy per rule, named by its source
    (``AuthorizationPolicy users-readers spec.rules[0]``)."""
    return {
        str(rule.source): {
            "permissions": [_operation(item) for item in rule.operations] or [{"any": True}],
            "principals": _principals(rule),
        }
        for rule in rules
    }


def _principals(rule: AuthorizationRule) -> list[dict[str, Any]]:
    peers = [_peer(peer) for peer in rule.peers] or [{"any": True}]
    if not rule.conditions:
        return peers  # Envoy's list is "any of"
    conditions = [_condition(condition) for condition in rule.conditions]
    return [{"and_ids": {"ids": [_or_ids(peers), *conditions]}}]


def _peer(peer: PeerMatch) -> dict[str, Any]:
    parts = []
    if peer.principals is not None:
        parts.append(_or_ids([_principal(text) for text in peer.principals]))
    if peer.not_principals is not None:
        parts.append({"not_id": _or_ids([_principal(text) for text in peer.not_principals])})
    return _and_ids(parts)


def _principal(text: str) -> dict[str, Any]:
    """A caller by its certificate's URI SAN: exactly, under a ``/`` prefix, or any."""
    pattern = parse_principal(text)
    if pattern.exact is not None:
        matcher: dict[str, Any] = {"exact": pattern.exact}
    elif pattern.prefix:
        matcher = {"prefix": pattern.prefix}
    else:
        matcher = {"safe_regex": {"regex": ".+"}}
    return {"authenticated": {"principal_name": matcher}}


def _operation(operation: OperationMatch) -> dict[str, Any]:
    parts = []
    if operation.methods is not None:
        parts.append(_or_rules([_method(method) for method in operation.methods]))
    if operation.not_methods is not None:
        parts.append({"not_rule": _or_rules([_method(item) for item in operation.not_methods])})
    if operation.paths is not None:
        parts.append(_or_rules([_path(pattern) for pattern in operation.paths]))
    if operation.not_paths is not None:
        parts.append({"not_rule": _or_rules([_path(item) for item in operation.not_paths])})
    if not parts:
        return {"any": True}
    return parts[0] if len(parts) == 1 else {"and_rules": {"rules": parts}}


def _method(method: str) -> dict[str, Any]:
    return {"header": {"name": ":method", "string_match": {"exact": method}}}


def _path(pattern: str) -> dict[str, Any]:
    """Istio's path patterns, on the path without its query: exact, ``/prefix/*``,
    ``*.suffix``, ``*``."""
    if pattern == "*":
        return {"any": True}
    return {"url_path": {"path": _glob(pattern)}}


def _glob(pattern: str) -> dict[str, Any]:
    if pattern == "*":
        return {"safe_regex": {"regex": ".+"}}
    if pattern.endswith("*"):
        return {"prefix": pattern[:-1]}
    if pattern.startswith("*"):
        return {"suffix": pattern[1:]}
    return {"exact": pattern}


def _condition(condition: ClaimCondition) -> dict[str, Any]:
    """A ``when`` on a claim of the validated JWT; a list claim matches when one of its
    items does; a missing claim fails ``values`` and passes ``notValues``, as in the view."""
    parts = []
    if condition.values is not None:
        parts.append(_or_ids([_claim(condition.claim, value) for value in condition.values]))
    if condition.not_values is not None:
        parts.append(
            {"not_id": _or_ids([_claim(condition.claim, value) for value in condition.not_values])}
        )
    return _and_ids(parts)


def _claim(claim: tuple[str, ...], pattern: str) -> dict[str, Any]:
    def at(value: dict[str, Any]) -> dict[str, Any]:
        return {
            "metadata": {
                "filter": JWT_FILTER,
                "path": [{"key": step} for step in (JWT_PAYLOAD, *claim)],
                "value": value,
            }
        }

    text = _glob(pattern)
    matchers = [at({"string_match": text}), at({"list_match": {"one_of": {"string_match": text}}})]
    if pattern in ("true", "false"):
        matchers.append(at({"bool_match": pattern == "true"}))
    return _or_ids(matchers)


def _or_ids(ids: list[dict[str, Any]]) -> dict[str, Any]:
    return ids[0] if len(ids) == 1 else {"or_ids": {"ids": ids}}


def _and_ids(ids: list[dict[str, Any]]) -> dict[str, Any]:
    if not ids:
        return {"any": True}
    return ids[0] if len(ids) == 1 else {"and_ids": {"ids": ids}}


def _or_rules(rules: list[dict[str, Any]]) -> dict[str, Any]:
    return rules[0] if len(rules) == 1 else {"or_rules": {"rules": rules}}


# -- the caller's identity and rate limits --------------------------------------------------


def identity_header_filter() -> dict[str, Any]:
    """Removes what a caller sent as its identity, then writes the handshake's."""
    return http_filter(
        "tessera.identity",
        typed(
            "envoy.extensions.filters.http.header_mutation.v3.HeaderMutation",
            mutations={
                "request_mutations": [
                    {
                        "remove_on_match": {
                            "key_matcher": {"safe_regex": {"regex": _FORGED_IDENTITY}}
                        }
                    },
                    {
                        "append": {
                            "header": {
                                "key": IDENTITY_HEADER,
                                "value": "%DOWNSTREAM_PEER_URI_SAN%",
                            },
                            "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
                        }
                    },
                ]
            },
        ),
    )


def rate_limit_filter(rules: Sequence[RateLimitRule], *, max_callers: int) -> dict[str, Any]:
    """The local rate limit filter keeping every RateLimit of the Service.

    The descriptors come from the identity header only (:func:`identity_header_filter`
    runs first); a shared limit is ``(tessera_ratelimit, NAME)`` when the caller fits
    its principals, a per-caller one ``(tessera_ratelimit, NAME), (caller, SPIFFE ID)``.
    There is no default bucket: a request no limit applies to is not limited.
    """
    actions: list[dict[str, Any]] = []
    descriptors: list[dict[str, Any]] = []
    for rule in rules:
        bucket = {
            "max_tokens": rule.burst,
            "tokens_per_fill": rule.requests_per_second,
            "fill_interval": "1s",
        }
        named = {"key": RATE_LIMIT_KEY, "value": rule.name}
        if rule.callers is None:
            actions.append({"actions": [_rate_limit_name(rule), _caller()]})
            descriptors.append({"entries": [named, {"key": _CALLER_KEY}], "token_bucket": bucket})
        else:
            actions.append({"actions": [_callers_match(rule, rule.callers)]})
            descriptors.append({"entries": [named], "token_bucket": bucket})
    return http_filter(
        "tessera.ratelimit",
        typed(
            "envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit",
            stat_prefix="tessera_ratelimit",
            filter_enabled=runtime_fraction(100),
            filter_enforced=runtime_fraction(100),
            rate_limits=actions,
            descriptors=descriptors,
            max_dynamic_descriptors=max_callers,
        ),
    )


def _rate_limit_name(rule: RateLimitRule) -> dict[str, Any]:
    return {"generic_key": {"descriptor_key": RATE_LIMIT_KEY, "descriptor_value": rule.name}}


def _caller() -> dict[str, Any]:
    return {"request_headers": {"header_name": IDENTITY_HEADER, "descriptor_key": _CALLER_KEY}}


def _callers_match(rule: RateLimitRule, callers: Sequence[str]) -> dict[str, Any]:
    """``(tessera_ratelimit, NAME)`` when the caller is one of ``callers``."""
    return {
        "header_value_match": {
            "descriptor_key": RATE_LIMIT_KEY,
            "descriptor_value": rule.name,
            "headers": [
                {
                    "name": IDENTITY_HEADER,
                    "string_match": {"safe_regex": {"regex": _callers_regex(callers)}},
                }
            ],
        }
    }


def _callers_regex(callers: Sequence[str]) -> str:
    """One RE2 expression for principal patterns: a caller fits any of them."""
    parts = []
    for text in callers:
        pattern = parse_principal(text)
        if pattern.exact is not None:
            parts.append(any_of([pattern.exact]))
        elif pattern.prefix:
            parts.append(any_of([pattern.prefix]) + ".+")
        else:
            parts.append(".+")
    return "|".join(f"(?:{part})" for part in parts)


# -- JWTs -----------------------------------------------------------------------------------


def jwt_filter(
    rules: Sequence[JwtRule],
    *,
    jwt_bundles: Mapping[str, str],
    trusted_ca: str,
    problems: list[str],
) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """The ``jwt_authn`` filter of the view's ``jwtRules`` and the clusters its remote
    JWKS are fetched through; (None, []) when no rule can be given to Envoy.

    A trust domain's JWT-SVIDs are checked against ``jwt_bundles[trust domain]`` (a JWK
    Set in JSON, which the agent holds); a rule whose bundle is not given is left out,
    and said so in ``problems`` (a token for it is then refused, as no provider takes it).
    """
    providers: dict[str, Any] = {}
    clusters: dict[str, dict[str, Any]] = {}
    for rule in rules:
        provider: dict[str, Any] = {
            "from_headers": [
                {"name": name, "value_prefix": prefix} for name, prefix in rule.locations.headers
            ],
            "from_params": list(rule.locations.params),
            "forward": rule.forward_original_token,
            "payload_in_metadata": JWT_PAYLOAD,
        }
        if rule.audiences:
            provider["audiences"] = list(rule.audiences)
        if rule.trust_domain is not None:
            bundle = jwt_bundles.get(rule.trust_domain)
            if bundle is None:
                problems.append(
                    f"{rule.source}: no JWT bundle of trust domain {rule.trust_domain} was "
                    "given, so its JWT-SVIDs are refused"
                )
                continue
            # JWT-SVIDs carry no iss; their sub is a SPIFFE ID of the trust domain.
            provider["subjects"] = {"prefix": f"spiffe://{rule.trust_domain}/"}
            provider["require_expiration"] = True
            provider["local_jwks"] = {"inline_string": bundle}
        else:
            provider["issuer"] = rule.issuer
            if rule.jwks is not None:
                provider["local_jwks"] = {"inline_string": rule.jwks}
            else:
                assert rule.jwks_uri is not None  # the model's check: one of the two
                cluster = _jwks_cluster(rule, rule.jwks_uri, trusted_ca)
                clusters[cluster["name"]] = cluster
                provider["remote_jwks"] = {
                    "http_uri": {
                        "uri": rule.jwks_uri,
                        "cluster": cluster["name"],
                        "timeout": _JWKS_FETCH_TIMEOUT,
                    },
                    "cache_duration": _JWKS_CACHE,
                    "async_fetch": {},
                }
        providers[str(rule.source)] = provider
    if not providers:
        return None, []
    requirements: list[dict[str, Any]] = [{"provider_name": name} for name in providers]
    requirements.append({"allow_missing": {}})
    config = typed(
        "envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication",
        providers=providers,
        rules=[
            {"match": {"prefix": "/"}, "requires": {"requires_any": {"requirements": requirements}}}
        ],
    )
    return http_filter(JWT_FILTER, config), list(clusters.values())


def _jwks_cluster(rule: JwtRule, uri: str, trusted_ca: str) -> dict[str, Any]:
    """The cluster a remote JWKS is fetched through: the URI's host, over TLS for an
    https URI (the host's certificate checked against ``trusted_ca``)."""
    parts = urlsplit(uri)
    host = parts.hostname or ""
    secure = parts.scheme == "https"
    port = parts.port or (443 if secure else 80)
    name = f"jwks|{host}:{port}"
    is_ip = _is_ip(host)
    cluster: dict[str, Any] = {
        "@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster",
        "name": name,
        "type": "STATIC" if is_ip else "LOGICAL_DNS",
        "connect_timeout": _JWKS_FETCH_TIMEOUT,
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [
                {"lb_endpoints": [{"endpoint": {"address": socket_address(host, port)}}]}
            ],
        },
        "metadata": metadata(rule.source, jwks_uri=uri),
    }
    if not is_ip:
        cluster["dns_lookup_family"] = "V4_PREFERRED"
    if secure:
        context: dict[str, Any] = {
            "common_tls_context": {
                "validation_context": {
                    "trusted_ca": {"filename": trusted_ca},
                    "match_typed_subject_alt_names": [
                        {"san_type": "IP_ADDRESS" if is_ip else "DNS", "matcher": {"exact": host}}
                    ],
                }
            }
        }
        if not is_ip:
            context["sni"] = host
        cluster["transport_socket"] = {
            "name": "envoy.transport_sockets.tls",
            "typed_config": typed(
                "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext", **context
            ),
        }
    return cluster


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
