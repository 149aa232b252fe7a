"""The Envoy renderer: configurations through ``mesh`` parsing and ``compile_view``, rendered,
their important fields checked — and Envoy itself (``envoy --mode validate``, then a real
run) accepting and doing what was rendered.

The tables read a render by path (:func:`dig`):
``listener inbound/hcm/http_filters/[tessera.ratelimit]/typed_config/descriptors``."""

from __future__ import annotations

import functools
import http.client
import json
import socket
import ssl
import string
from pathlib import Path
from typing import Any, cast

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from google.protobuf import any_pb2, json_format

from mesh import Catalog, GatewayProxy, SidecarProxy, compile_view
from mesh.envoy import (
    ALL_SECRET,
    CLUSTER,
    CLUSTER_LOAD_ASSIGNMENT,
    IDENTITY_HEADER,
    LISTENER,
    RESOURCE_TYPES,
    ROUTE_CONFIGURATION,
    RenderOptions,
    Resources,
    SidecarAddresses,
    build_bootstrap,
    render_gateway,
    render_sidecar,
)
from mesh.regex import MAX_PROGRAM_SIZE
from sdk.address import HostPort
from tests.support.envoy_static import (
    require_envoy,
    spiffe_trust,
    static_bootstrap,
    svid_secret,
    validate,
    write_json,
)
from tests.support.pki import PrivateKey, TestCA, pem, write_key_pem, write_pem
from tests.support.processes import Process
from tests.unit.mesh.documents import MISSION, USERS_SERVICE
from tests.unit.mesh.meshes import (
    EVERYTHING,
    GATEWAY,
    INGRESS,
    ORDERS,
    ORDERS_INSTANCES,
    REVIEWS_INSTANCES,
    USERS,
    USERS_INSTANCES,
    configured,
    everything,
    instance,
)

# -- configurations -------------------------------------------------------------------------

ORDERS_ROUTES = """\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: orders}
spec:
  hosts: [orders]
  http:
  - name: moved
    match: [{uri: {prefix: /old/}}]
    redirect: {uri: /new/, authority: shop.example.com, redirectCode: 308}
  - name: testers
    match:
    - headers: {x-tester: {exact: "yes"}, x-debug: {}}
      method: {regex: "GET|HEAD"}
    - queryParams: {canary: {prefix: "1"}}
    rewrite: {uri: /v2/, authority: orders.internal}
    route:
    - destination: {host: orders, subset: hashed}
      headers: {request: {set: {x-canary: "100%"}}}
    timeout: 1.5s
    retries: {attempts: 3, perTryTimeout: 500ms, retryOn: "5xx,reset,503"}
    headers:
      request: {add: {x-route: testers}, remove: [x-internal]}
      response: {remove: [x-trace]}
  - match: [{uri: {prefix: /api/}}]
    rewrite: {uri: /}
    route: [{destination: {host: orders}}]
  - route: [{destination: {host: orders}}]
    fault:
      delay: {fixedDelay: 100ms, percentage: {value: 1}}
      abort: {httpStatus: 503, percentage: {value: 0.5}}
    mirror: {host: reviews, subset: v2}
    mirrorPercentage: {value: 5}
    retries: {attempts: 0}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: orders}
spec:
  host: orders
  trafficPolicy:
    loadBalancer: {consistentHash: {useSourceIp: true}}
  subsets:
  - name: hashed
    labels: {version: v2}
    trafficPolicy:
      loadBalancer: {consistentHash: {httpHeaderName: x-user}}
"""

CERT = "/etc/tessera/gateway/api.example.com.pem"
KEY = "/etc/tessera/gateway/api.example.com.key"
JWKS = json.dumps(
    {
        "keys": [
            {
                **json.loads(
                    jwt.algorithms.ECAlgorithm.to_jwk(
                        ec.generate_private_key(ec.SECP256R1()).public_key()
                    )
                ),
                "kid": "k1",
                "use": "sig",
                "alg": "ES256",
            }
        ]
    }
)


def public_gateway(cert: str = CERT, key: str = KEY) -> str:
    """An HTTPS gateway (two servers by SNI, an HTTP one redirecting), JWTs, a claim."""
    return string.Template(
        """\
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: public}
spec:
  selector: {istio: public}
  servers:
  - port: {number: 443, name: https, protocol: HTTPS}
    hosts: [api.example.com]
    tls: {mode: SIMPLE, serverCertificate: $cert, privateKey: $key}
  - port: {number: 443, name: https-any, protocol: HTTPS}
    hosts: ["*.example.com"]
    tls: {mode: SIMPLE, serverCertificate: $cert, privateKey: $key}
  - port: {number: 80, name: http, protocol: HTTP}
    hosts: [api.example.com]
    tls: {httpsRedirect: true}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: api}
spec:
  hosts: [api.example.com]
  gateways: [public]
  http:
  - match: [{uri: {prefix: /users}}]
    route: [{destination: {host: users-service}}]
---
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {name: edge-jwt}
spec:
  selector: {matchLabels: {istio: public}}
  jwtRules:
  - issuer: spiffe://example.org
    audiences: [edge]
  - issuer: https://accounts.example.com
    jwksUri: https://accounts.example.com/.well-known/jwks.json
    fromHeaders: [{name: x-token, prefix: "Token "}]
  - issuer: https://partner.example.net
    jwks: '$jwks'
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: admins}
spec:
  selector: {matchLabels: {istio: public}}
  rules:
  - when:
    - key: request.auth.claims[groups]
      values: [admins, "ops-*"]
    - key: request.auth.claims[realm][name]
      notValues: [guests]
"""
    ).substitute(cert=cert, key=key, jwks=JWKS)


PUBLIC = {"istio": "public"}
ADDRESSES = SidecarAddresses(
    inbound=HostPort("10.0.0.5", 8443),
    app=HostPort("127.0.0.1", 8080),
    outbound=HostPort("127.0.0.1", 15001),
)


def _catalog() -> Catalog:
    return Catalog([*USERS_INSTANCES, *REVIEWS_INSTANCES, *ORDERS_INSTANCES])


@functools.cache
def rendered(name: str) -> Resources:
    """The renders the tables read, each made once."""
    if name == "mission":  # the mission's gateway, with everything else applied
        config, catalog = everything()
        view = compile_view(config, catalog, GatewayProxy(GATEWAY, INGRESS))
        return render_gateway(view, host="0.0.0.0", port_offset=10000)
    if name == "users":  # a sidecar of users-service: the split, policies, rate limits
        config, catalog = everything()
        view = compile_view(config, catalog, SidecarProxy("users-service", USERS, {"app": "users"}))
        return render_sidecar(view, ADDRESSES, RenderOptions(access_log="/var/log/tessera.log"))
    if name == "orders":  # a sidecar of orders: every route feature, consistent hashing
        config = configured(*EVERYTHING, ORDERS_ROUTES)
        view = compile_view(config, _catalog(), SidecarProxy("orders", ORDERS, {"app": "orders"}))
        return render_sidecar(view, ADDRESSES)
    if name == "public":  # an HTTPS gateway with JWTs
        config = configured(MISSION, USERS_SERVICE, public_gateway())
        view = compile_view(config, _catalog(), GatewayProxy(GATEWAY, PUBLIC))
        options = RenderOptions(jwt_bundles={"example.org": JWKS})
        return render_gateway(view, host="0.0.0.0", options=options)
    raise AssertionError(name)


_KINDS = {
    "listener": LISTENER,
    "routes": ROUTE_CONFIGURATION,
    "cluster": CLUSTER,
    "endpoints": CLUSTER_LOAD_ASSIGNMENT,
}


def dig(resources: Resources, path: str) -> Any:
    """A value in a render: the first step names a resource (``listener``, ``routes``,
    ``cluster`` or ``endpoints``, then its name); each next step is a key, a list index,
    ``[NAME]`` (the item of a list whose ``name`` is NAME), ``*KEY`` (that key of every
    item), ``{A,B}`` (those keys only), ``hcm`` (the first filter chain's connection
    manager) or ``tls`` (a transport socket's context)."""
    head, *steps = path.split("/")
    kind, _, name = head.partition(" ")
    node: Any = resources.named(_KINDS[kind], name)
    assert node is not None, f"no {kind} {name}"
    for step in steps:
        if step == "hcm":
            node = node["filter_chains"][0]["filters"][0]["typed_config"]
        elif step == "tls":
            node = node["transport_socket"]["typed_config"]
        elif step.lstrip("-").isdigit():
            node = node[int(step)]
        elif step.startswith("[") and step.endswith("]"):
            named = {item["name"]: item for item in node}
            assert step[1:-1] in named, f"{step} is not among {list(named)}"
            node = named[step[1:-1]]
        elif step.startswith("*"):
            node = [item.get(step[1:]) for item in node]
        elif step.startswith("{") and step.endswith("}"):
            node = {key: node.get(key) for key in step[1:-1].split(",")}
        else:
            node = node[step]
    return node


# -- the tables -----------------------------------------------------------------------------

ADS = {"ads": {}, "resource_api_version": "V3"}
UNLIMITED = 2**32 - 1
MISSION_VHOST = "routes gateway_80/virtual_hosts/[microservice-virtual-service *]"
REVIEWS_V1, REVIEWS_V2 = "outbound|9080|v1|reviews", "outbound|9080|v2|reviews"
DEFAULT_RETRY_ON = "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes"
PREVIOUS_HOSTS = {
    "name": "envoy.retry_host_predicates.previous_hosts",
    "typed_config": {
        "@type": "type.googleapis.com/"
        "envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"
    },
}
RATE_LIMIT = "listener inbound/hcm/http_filters/[tessera.ratelimit]/typed_config"
ALLOW = "listener inbound/hcm/http_filters/[tessera.rbac.allow]/typed_config/rules"
JWT = "listener gateway_443/hcm/http_filters/[envoy.filters.http.jwt_authn]/typed_config"
ORDERS_ROUTES_PATH = "routes outbound/virtual_hosts/[orders]/routes"


def _claim(path: list[str], value: dict[str, Any]) -> dict[str, Any]:
    steps = [{"key": "payload"}] + [{"key": step} for step in path]

    def at(matcher: dict[str, Any]) -> dict[str, Any]:
        return {
            "metadata": {"filter": "envoy.filters.http.jwt_authn", "path": steps, "value": matcher}
        }

    string = {"string_match": value}
    return {"or_ids": {"ids": [at(string), at({"list_match": {"one_of": string}})]}}


# The mission's gateway: port 80 (+ the offset), /api/v1/users to users-service, 404 else.
MISSION_CASES: list[tuple[str, Any]] = [
    (
        "listener gateway_80/address",
        {"socket_address": {"address": "0.0.0.0", "port_value": 10080}},
    ),
    ("listener gateway_80/hcm/rds", {"config_source": ADS, "route_config_name": "gateway_80"}),
    (
        "listener gateway_80/hcm/{use_remote_address,forward_client_cert_details,"
        "strip_any_host_port,normalize_path}",
        {
            "use_remote_address": True,
            "forward_client_cert_details": "SANITIZE",
            "strip_any_host_port": True,
            "normalize_path": True,
        },
    ),
    (
        # AuthorizationPolicies without a selector hold at the gateway too; none ALLOWs.
        "listener gateway_80/hcm/http_filters/*name",
        ["tessera.rbac.audit", "tessera.rbac.deny", "envoy.filters.http.router"],
    ),
    (f"{MISSION_VHOST}/domains", ["*"]),
    (
        f"{MISSION_VHOST}/routes/*name",
        ["VirtualService microservice-virtual-service spec.http[0].match[0]", "default not-found"],
    ),
    (f"{MISSION_VHOST}/routes/*match", [{"path": "/api/v1/users"}, {"prefix": "/"}]),
    (
        f"{MISSION_VHOST}/routes/0/route/{{cluster,timeout}}",
        {"cluster": "outbound|80||users-service", "timeout": "0s"},
    ),
    (
        f"{MISSION_VHOST}/routes/0/route/retry_policy",
        {
            "retry_on": DEFAULT_RETRY_ON,
            "num_retries": 2,
            "retriable_status_codes": [503],
            "retry_host_predicate": [PREVIOUS_HOSTS],
            "host_selection_retry_max_attempts": 5,
        },
    ),
    (
        f"{MISSION_VHOST}/routes/0/metadata/filter_metadata/tessera",
        {
            "source": "VirtualService microservice-virtual-service spec.http[0]",
            "match": "VirtualService microservice-virtual-service spec.http[0].match[0]",
            "action": "VirtualService microservice-virtual-service spec.http[0].route",
            "timeout": "default timeout",
            "retries": "default retries",
        },
    ),
    (f"{MISSION_VHOST}/routes/1/direct_response", {"status": 404}),
    (
        "cluster outbound|80||users-service/tls/common_tls_context/"
        "tls_certificate_sds_secret_configs",
        [{"name": GATEWAY, "sds_config": ADS}],
    ),
    (
        "cluster outbound|80||users-service/tls/common_tls_context/combined_validation_context",
        {
            "default_validation_context": {
                "match_typed_subject_alt_names": [{"san_type": "URI", "matcher": {"exact": USERS}}]
            },
            "validation_context_sds_secret_config": {"name": ALL_SECRET, "sds_config": ADS},
        },
    ),
    ("cluster outbound|80||users-service/lb_policy", "LEAST_REQUEST"),
    (
        "cluster outbound|80||users-service/circuit_breakers/thresholds",
        [
            {
                "priority": "DEFAULT",
                "max_connections": UNLIMITED,
                "max_pending_requests": UNLIMITED,
                "max_requests": UNLIMITED,
                "retry_budget": {"budget_percent": {"value": 20.0}, "min_retry_concurrency": 3},
            }
        ],
    ),
]

# A sidecar of users-service: the 90/10 split of reviews, outlier detection, the inbound
# side (mTLS, the caller's identity, RBAC of an ALLOW policy, rate limits), the app.
USERS_CASES: list[tuple[str, Any]] = [
    ("routes outbound/virtual_hosts/[reviews]/domains", ["reviews", "reviews:9080", "reviews.*"]),
    ("routes outbound/virtual_hosts/[reviews]/routes/0/match", {"prefix": "/reviews"}),
    (
        "routes outbound/virtual_hosts/[reviews]/routes/0/route/weighted_clusters",
        {"clusters": [{"name": REVIEWS_V1, "weight": 90}, {"name": REVIEWS_V2, "weight": 10}]},
    ),
    (
        "routes outbound/virtual_hosts/[reviews]/routes/*direct_response",
        [None, {"status": 404}],
    ),
    ("routes outbound/virtual_hosts/[orders]/routes/*name", ["default route"]),
    (
        "routes outbound/virtual_hosts/[orders]/routes/0/route/cluster",
        "outbound|8080||orders",
    ),
    (
        f"cluster {REVIEWS_V1}/{{type,eds_cluster_config,lb_policy}}",
        {
            "type": "EDS",
            "eds_cluster_config": {"eds_config": ADS, "service_name": REVIEWS_V1},
            "lb_policy": "ROUND_ROBIN",
        },
    ),
    (
        f"cluster {REVIEWS_V1}/circuit_breakers/thresholds/0",
        {
            "priority": "DEFAULT",
            "max_connections": 100,
            "max_pending_requests": 10,
            "max_requests": UNLIMITED,
            "retry_budget": {"budget_percent": {"value": 20.0}, "min_retry_concurrency": 3},
        },
    ),
    (
        f"cluster {REVIEWS_V1}/outlier_detection",
        {
            "interval": "5s",
            "base_ejection_time": "30s",
            "max_ejection_percent": 10,
            "enforcing_success_rate": 0,
            "consecutive_5xx": 3,
            "enforcing_consecutive_5xx": 100,
            "enforcing_consecutive_gateway_failure": 0,
        },
    ),
    (
        f"cluster {REVIEWS_V2}/outlier_detection",
        {
            "interval": "10s",
            "base_ejection_time": "60s",
            "max_ejection_percent": 50,
            "enforcing_success_rate": 0,
            "consecutive_5xx": 5,
            "enforcing_consecutive_5xx": 100,
            "consecutive_gateway_failure": 2,
            "enforcing_consecutive_gateway_failure": 100,
        },
    ),
    (
        f"cluster {REVIEWS_V2}/metadata/filter_metadata/tessera/outlier_detection",
        "DestinationRule reviews spec.subsets[1].trafficPolicy.outlierDetection",
    ),
    (
        f"cluster {REVIEWS_V1}/typed_extension_protocol_options/"
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions/"
        "{common_http_protocol_options,auto_config}",
        {
            "common_http_protocol_options": {"idle_timeout": "3600s"},
            "auto_config": {"http_protocol_options": {}, "http2_protocol_options": {}},
        },
    ),
    ("listener inbound/address", {"socket_address": {"address": "10.0.0.5", "port_value": 8443}}),
    (
        "listener inbound/filter_chains/0/tls/{require_client_certificate,common_tls_context}",
        {
            "require_client_certificate": True,
            "common_tls_context": {
                "tls_params": {"tls_minimum_protocol_version": "TLSv1_2"},
                "tls_certificate_sds_secret_configs": [{"name": USERS, "sds_config": ADS}],
                "validation_context_sds_secret_config": {"name": ALL_SECRET, "sds_config": ADS},
                "alpn_protocols": ["h2", "http/1.1"],
            },
        },
    ),
    (
        "listener inbound/hcm/{forward_client_cert_details,set_current_client_cert_details}",
        {
            "forward_client_cert_details": "SANITIZE_SET",
            "set_current_client_cert_details": {"uri": True},
        },
    ),
    (
        "listener inbound/hcm/http_filters/*name",
        [
            "tessera.identity",
            "tessera.rbac.audit",
            "tessera.rbac.deny",
            "tessera.rbac.allow",
            "tessera.ratelimit",
            "envoy.filters.http.router",
        ],
    ),
    (
        "listener inbound/hcm/http_filters/[tessera.identity]/typed_config/mutations/"
        "request_mutations/1",
        {
            "append": {
                "header": {"key": IDENTITY_HEADER, "value": "%DOWNSTREAM_PEER_URI_SAN%"},
                "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
            }
        },
    ),
    (
        "routes inbound/virtual_hosts/0/routes/0/route",
        {"cluster": "inbound|80||users-service", "timeout": "0s"},
    ),
    (
        "cluster inbound|80||users-service/load_assignment/endpoints/0/lb_endpoints/0/endpoint",
        {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 8080}}},
    ),
    (
        f"{ALLOW}/policies/AuthorizationPolicy users-readers spec.rules[0]",
        {
            "principals": [{"authenticated": {"principal_name": {"exact": ORDERS}}}],
            "permissions": [
                {
                    "and_rules": {
                        "rules": [
                            {"header": {"name": ":method", "string_match": {"exact": "GET"}}},
                            {
                                "or_rules": {
                                    "rules": [
                                        {"url_path": {"path": {"exact": "/api/v1/users"}}},
                                        {"url_path": {"path": {"prefix": "/api/v1/users/"}}},
                                    ]
                                }
                            },
                        ]
                    }
                }
            ],
        },
    ),
    (
        f"{ALLOW}/policies/AuthorizationPolicy users-readers spec.rules[1]/principals",
        [{"authenticated": {"principal_name": {"exact": GATEWAY}}}],
    ),
    (
        "listener inbound/hcm/http_filters/[tessera.rbac.deny]/typed_config/rules",
        {
            "action": "DENY",
            "policies": {
                "AuthorizationPolicy no-legacy spec.rules[0]": {
                    "permissions": [{"any": True}],
                    "principals": [
                        {
                            "authenticated": {
                                "principal_name": {"prefix": "spiffe://example.org/legacy/"}
                            }
                        }
                    ],
                }
            },
        },
    ),
    (
        # AUDIT: shadow rules, never enforced (no "rules").
        "listener inbound/hcm/http_filters/[tessera.rbac.audit]/typed_config/"
        "{rules,shadow_rules_stat_prefix}",
        {"rules": None, "shadow_rules_stat_prefix": "tessera_audit_"},
    ),
    (
        "listener inbound/hcm/http_filters/[tessera.rbac.audit]/typed_config/shadow_rules/"
        "policies/AuthorizationPolicy audit-writes spec.rules[0]/permissions",
        [
            {
                "not_rule": {
                    "or_rules": {
                        "rules": [
                            {"header": {"name": ":method", "string_match": {"exact": "GET"}}},
                            {"header": {"name": ":method", "string_match": {"exact": "HEAD"}}},
                        ]
                    }
                }
            }
        ],
    ),
    (
        f"{RATE_LIMIT}/descriptors",
        [
            {
                "entries": [
                    {"key": "tessera_ratelimit", "value": "everyone-to-users"},
                    {"key": "caller"},
                ],
                "token_bucket": {"max_tokens": 5, "tokens_per_fill": 5, "fill_interval": "1s"},
            },
            {
                "entries": [{"key": "tessera_ratelimit", "value": "orders-to-users"}],
                "token_bucket": {"max_tokens": 100, "tokens_per_fill": 50, "fill_interval": "1s"},
            },
        ],
    ),
    (
        f"{RATE_LIMIT}/rate_limits",
        [
            {
                "actions": [
                    {
                        "generic_key": {
                            "descriptor_key": "tessera_ratelimit",
                            "descriptor_value": "everyone-to-users",
                        }
                    },
                    {
                        "request_headers": {
                            "header_name": IDENTITY_HEADER,
                            "descriptor_key": "caller",
                        }
                    },
                ]
            },
            {
                "actions": [
                    {
                        "header_value_match": {
                            "descriptor_key": "tessera_ratelimit",
                            "descriptor_value": "orders-to-users",
                            "headers": [
                                {
                                    "name": IDENTITY_HEADER,
                                    "string_match": {
                                        "safe_regex": {
                                            "regex": r"(?:spiffe\:\/\/example\.org\/orders)"
                                        }
                                    },
                                }
                            ],
                        }
                    }
                ]
            },
        ],
    ),
    (
        f"{RATE_LIMIT}/{{filter_enabled,filter_enforced,max_dynamic_descriptors}}",
        {
            "filter_enabled": {"default_value": {"numerator": 1000000, "denominator": "MILLION"}},
            "filter_enforced": {"default_value": {"numerator": 1000000, "denominator": "MILLION"}},
            "max_dynamic_descriptors": 1024,
        },
    ),
    (
        "listener inbound/hcm/access_log/0/typed_config/path",
        "/var/log/tessera.log",
    ),
    (
        "listener inbound/hcm/access_log/0/typed_config/log_format/json_format/"
        "{listener,source,route,upstream_host,response_code,duration_ms}",
        {
            "listener": "inbound",
            "source": "%DOWNSTREAM_PEER_URI_SAN%",
            "route": "%ROUTE_NAME%",
            "upstream_host": "%UPSTREAM_HOST%",
            "response_code": "%RESPONSE_CODE%",
            "duration_ms": "%DURATION%",
        },
    ),
    (
        "listener outbound/{address,traffic_direction}",
        {
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": 15001}},
            "traffic_direction": "OUTBOUND",
        },
    ),
    ("listener outbound/filter_chains/0/transport_socket", KeyError),
]

# A sidecar of orders: every route feature, consistent hashing.
ORDERS_CASES: list[tuple[str, Any]] = [
    (
        f"{ORDERS_ROUTES_PATH}/*name",
        [
            "VirtualService orders spec.http[0].match[0]",
            "VirtualService orders spec.http[1].match[0]",
            "VirtualService orders spec.http[1].match[1]",
            "VirtualService orders spec.http[2].match[0]",
            "VirtualService orders spec.http[3]",
        ],
    ),
    (
        f"{ORDERS_ROUTES_PATH}/0/redirect",
        {
            "response_code": "PERMANENT_REDIRECT",
            "path_redirect": "/new/",
            "host_redirect": "shop.example.com",
        },
    ),
    (
        f"{ORDERS_ROUTES_PATH}/1/match",
        {
            "prefix": "/",
            "headers": [
                {"name": ":method", "string_match": {"safe_regex": {"regex": "GET|HEAD"}}},
                {"name": "x-debug", "present_match": True},
                {"name": "x-tester", "string_match": {"exact": "yes"}},
            ],
        },
    ),
    (
        f"{ORDERS_ROUTES_PATH}/2/match",
        {"prefix": "/", "query_parameters": [{"name": "canary", "string_match": {"prefix": "1"}}]},
    ),
    (
        f"{ORDERS_ROUTES_PATH}/1/route/"
        "{path_rewrite,host_rewrite_literal,timeout,retry_policy,hash_policy}",
        {
            "path_rewrite": "/v2/",
            "host_rewrite_literal": "orders.internal",
            "timeout": "1.5s",
            "retry_policy": {
                "retry_on": "5xx,reset,retriable-status-codes",
                "num_retries": 3,
                "per_try_timeout": "0.5s",
                "retriable_status_codes": [503],
                "retry_host_predicate": [PREVIOUS_HOSTS],
                "host_selection_retry_max_attempts": 5,
            },
            "hash_policy": [{"header": {"header_name": "x-user"}}],
        },
    ),
    (
        # A destination's headers; a literal % doubled (Envoy would read a formatter).
        f"{ORDERS_ROUTES_PATH}/1/route/weighted_clusters",
        {
            "clusters": [
                {
                    "name": "outbound|8080|hashed|orders",
                    "weight": 100,
                    "request_headers_to_add": [
                        {
                            "header": {"key": "x-canary", "value": "100%%"},
                            "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
                        }
                    ],
                }
            ]
        },
    ),
    (
        f"{ORDERS_ROUTES_PATH}/1/"
        "{request_headers_to_add,request_headers_to_remove,response_headers_to_remove}",
        {
            "request_headers_to_add": [
                {
                    "header": {"key": "x-route", "value": "testers"},
                    "append_action": "APPEND_IF_EXISTS_OR_ADD",
                }
            ],
            "request_headers_to_remove": ["x-internal"],
            "response_headers_to_remove": ["x-trace"],
        },
    ),
    (f"{ORDERS_ROUTES_PATH}/3/route/prefix_rewrite", "/"),
    (
        f"{ORDERS_ROUTES_PATH}/4/typed_per_filter_config/envoy.filters.http.fault",
        {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault",
            "delay": {
                "fixed_delay": "0.1s",
                "percentage": {"numerator": 10000, "denominator": "MILLION"},
            },
            "abort": {
                "http_status": 503,
                "percentage": {"numerator": 5000, "denominator": "MILLION"},
            },
        },
    ),
    (
        f"{ORDERS_ROUTES_PATH}/4/route",
        {
            "cluster": "outbound|8080||orders",
            "timeout": "0s",
            "request_mirror_policies": [
                {
                    "cluster": REVIEWS_V2,
                    "runtime_fraction": {
                        "default_value": {"numerator": 50000, "denominator": "MILLION"}
                    },
                }
            ],
            "hash_policy": [{"connection_properties": {"source_ip": True}}],
        },
    ),
    (
        "listener outbound/hcm/http_filters/*name",
        ["envoy.filters.http.fault", "envoy.filters.http.router"],
    ),
    ("cluster outbound|8080||orders/lb_policy", "RING_HASH"),
    ("cluster outbound|8080|hashed|orders/lb_policy", "RING_HASH"),
]

# An HTTPS gateway: a chain per server by SNI, certificate files, the redirect, JWTs,
# claims.
PUBLIC_CASES: list[tuple[str, Any]] = [
    (
        "listener gateway_443/filter_chains/*filter_chain_match",
        [{"server_names": ["api.example.com"]}, {"server_names": ["*.example.com"]}],
    ),
    (
        "listener gateway_443/filter_chains/*name",
        ["Gateway public spec.servers[0]", "Gateway public spec.servers[1]"],
    ),
    (
        "listener gateway_443/filter_chains/0/tls/common_tls_context/tls_certificates",
        [{"certificate_chain": {"filename": CERT}, "private_key": {"filename": KEY}}],
    ),
    ("listener gateway_443/listener_filters/*name", ["envoy.filters.listener.tls_inspector"]),
    (
        "listener gateway_443/hcm/http_filters/*name",
        ["envoy.filters.http.jwt_authn", "tessera.rbac.allow", "envoy.filters.http.router"],
    ),
    (
        # Most specific first; then the server's and the port's 404s.
        "routes gateway_443/virtual_hosts/*domains",
        [["api.example.com"], ["*.example.com"], ["*"]],
    ),
    (
        "routes gateway_443/virtual_hosts/*name",
        ["api api.example.com", "Gateway public spec.servers[1] not found", "port 443 not found"],
    ),
    ("routes gateway_80/virtual_hosts/[api api.example.com]/require_tls", "ALL"),
    (
        f"{JWT}/providers/RequestAuthentication edge-jwt spec.jwtRules[0]",
        {
            "from_headers": [{"name": "authorization", "value_prefix": "Bearer "}],
            "from_params": ["access_token"],
            "forward": False,
            "payload_in_metadata": "payload",
            "audiences": ["edge"],
            "subjects": {"prefix": "spiffe://example.org/"},
            "require_expiration": True,
            "local_jwks": {"inline_string": JWKS},
        },
    ),
    (
        f"{JWT}/providers/RequestAuthentication edge-jwt spec.jwtRules[1]/"
        "{issuer,from_headers,remote_jwks}",
        {
            "issuer": "https://accounts.example.com",
            "from_headers": [{"name": "x-token", "value_prefix": "Token "}],
            "remote_jwks": {
                "http_uri": {
                    "uri": "https://accounts.example.com/.well-known/jwks.json",
                    "cluster": "jwks|accounts.example.com:443",
                    "timeout": "5s",
                },
                "cache_duration": "300s",
                "async_fetch": {},
            },
        },
    ),
    (
        f"{JWT}/providers/RequestAuthentication edge-jwt spec.jwtRules[2]/local_jwks",
        {"inline_string": JWKS},
    ),
    (
        "cluster jwks|accounts.example.com:443/tls/{sni,common_tls_context}",
        {
            "sni": "accounts.example.com",
            "common_tls_context": {
                "validation_context": {
                    "trusted_ca": {"filename": "/etc/ssl/certs/ca-certificates.crt"},
                    "match_typed_subject_alt_names": [
                        {"san_type": "DNS", "matcher": {"exact": "accounts.example.com"}}
                    ],
                }
            },
        },
    ),
    (
        # A request without a token passes; one with a token no provider accepts does not.
        f"{JWT}/rules/0/requires/requires_any/requirements/-1",
        {"allow_missing": {}},
    ),
    (
        "listener gateway_443/hcm/http_filters/[tessera.rbac.allow]/typed_config/rules/"
        "policies/AuthorizationPolicy admins spec.rules[0]/principals",
        [
            {
                "and_ids": {
                    "ids": [
                        {"any": True},
                        {
                            "or_ids": {
                                "ids": [
                                    _claim(["groups"], {"exact": "admins"}),
                                    _claim(["groups"], {"prefix": "ops-"}),
                                ]
                            }
                        },
                        {"not_id": _claim(["realm", "name"], {"exact": "guests"})},
                    ]
                }
            }
        ],
    ),
]

TABLES = {
    "mission": MISSION_CASES,
    "users": USERS_CASES,
    "orders": ORDERS_CASES,
    "public": PUBLIC_CASES,
}


@pytest.mark.parametrize(
    ("render", "path", "expected"),
    [
        pytest.param(render, path, expected, id=f"{render}: {path}")
        for render, cases in TABLES.items()
        for path, expected in cases
    ],
)
def test_rendered(render: str, path: str, expected: Any) -> None:
    if expected is KeyError:
        with pytest.raises(KeyError):
            dig(rendered(render), path)
    else:
        assert dig(rendered(render), path) == expected


@pytest.mark.parametrize(
    ("render", "cluster", "expected"),
    [
        ("mission", "outbound|80||users-service", ["10.0.0.5:8443", "10.0.0.6:8443"]),
        # Healthy instances only: 10.0.1.3 is unhealthy, 10.0.2.2 not checked yet.
        ("users", REVIEWS_V1, ["10.0.1.1:8443", "10.0.1.2:8443"]),
        ("users", REVIEWS_V2, ["10.0.2.1:8443"]),
        ("users", "outbound|9080||reviews", ["10.0.1.1:8443", "10.0.1.2:8443", "10.0.2.1:8443"]),
    ],
)
def test_endpoints(render: str, cluster: str, expected: list[str]) -> None:
    assignment = dig(rendered(render), f"endpoints {cluster}")
    found = [
        (item["endpoint"]["address"]["socket_address"], item["health_status"])
        for group in assignment["endpoints"]
        for item in group["lb_endpoints"]
    ]
    assert [f"{address['address']}:{address['port_value']}" for address, _ in found] == expected
    assert {health for _, health in found} == {"HEALTHY"}
    assert (
        dig(rendered(render), f"endpoints {cluster}/endpoints/0/lb_endpoints/0/metadata")[
            "filter_metadata"
        ]["tessera"]["source"]
        == f"catalog {cluster.rsplit('|', 1)[1]} {expected[0]}"
    )


def test_every_element_names_its_source() -> None:
    """Listeners, route configurations, virtual hosts, routes, clusters and endpoints."""
    for name in TABLES:
        resources = rendered(name)
        elements = [*resources.listeners, *resources.route_configurations, *resources.clusters]
        elements += [
            host for item in resources.route_configurations for host in item["virtual_hosts"]
        ]
        elements += [
            route
            for item in resources.route_configurations
            for host in item["virtual_hosts"]
            for route in host["routes"]
        ]
        elements += [
            endpoint
            for item in resources.cluster_load_assignments
            for group in item["endpoints"]
            for endpoint in group["lb_endpoints"]
        ]
        for element in elements:
            assert element["metadata"]["filter_metadata"]["tessera"]["source"], element


def _register_messages() -> None:
    """Every message a render names in an ``@type``, known to the protobuf pool."""
    import envoy.config.bootstrap.v3.bootstrap_pb2
    import envoy.config.cluster.v3.cluster_pb2
    import envoy.config.endpoint.v3.endpoint_pb2
    import envoy.config.listener.v3.listener_pb2
    import envoy.config.route.v3.route_pb2
    import envoy.extensions.access_loggers.file.v3.file_pb2
    import envoy.extensions.filters.http.fault.v3.fault_pb2
    import envoy.extensions.filters.http.header_mutation.v3.header_mutation_pb2
    import envoy.extensions.filters.http.jwt_authn.v3.config_pb2
    import envoy.extensions.filters.http.local_ratelimit.v3.local_rate_limit_pb2
    import envoy.extensions.filters.http.rbac.v3.rbac_pb2
    import envoy.extensions.filters.http.router.v3.router_pb2
    import envoy.extensions.filters.listener.tls_inspector.v3.tls_inspector_pb2
    import envoy.extensions.filters.network.http_connection_manager.v3.http_connection_manager_pb2
    import envoy.extensions.formatter.req_without_query.v3.req_without_query_pb2
    import envoy.extensions.resource_monitors.downstream_connections.v3.downstream_connections_pb2
    import envoy.extensions.retry.host.previous_hosts.v3.previous_hosts_pb2
    import envoy.extensions.transport_sockets.tls.v3.tls_pb2
    import envoy.extensions.upstreams.http.v3.http_protocol_options_pb2  # noqa: F401


@pytest.mark.parametrize("render", ["mission", "users", "orders", "public"])
def test_every_resource_is_its_message_in_json(render: str) -> None:
    """What the xDS server does with each resource: JSON through ParseDict into an Any."""
    _register_messages()
    resources = rendered(render)
    for type_url in RESOURCE_TYPES:
        for resource in resources.of_type(type_url):
            assert resource["@type"] == type_url
            message = any_pb2.Any()
            json_format.ParseDict(json.loads(json.dumps(resource)), message)
            assert message.type_url == type_url


def test_the_bootstrap_is_a_bootstrap_message() -> None:
    from envoy.config.bootstrap.v3 import bootstrap_pb2

    _register_messages()
    bootstrap = build_bootstrap(
        node_id="n", node_cluster="orders", agent_socket="/run/agent.sock", admin_port=15000
    )
    json_format.ParseDict(bootstrap, bootstrap_pb2.Bootstrap())


BOOTSTRAP = build_bootstrap(
    node_id="sidecar~orders~10.0.3.1",
    node_cluster="orders",
    agent_socket="/run/tessera/agent.sock",
    admin_port=15000,
    metadata={"tessera.proxy": "sidecar"},
)


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        (
            ("node",),
            {
                "id": "sidecar~orders~10.0.3.1",
                "cluster": "orders",
                "metadata": {"tessera.proxy": "sidecar"},
            },
        ),
        (("static_resources", "clusters", 0, "name"), "tessera_agent"),
        (
            (
                "static_resources",
                "clusters",
                0,
                "load_assignment",
                "endpoints",
                0,
                "lb_endpoints",
                0,
                "endpoint",
                "address",
            ),
            {"pipe": {"path": "/run/tessera/agent.sock"}},
        ),
        (
            (
                "static_resources",
                "clusters",
                0,
                "typed_extension_protocol_options",
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config",
            ),
            {"http2_protocol_options": {}},
        ),
        (
            ("dynamic_resources", "ads_config", "grpc_services"),
            [{"envoy_grpc": {"cluster_name": "tessera_agent"}}],
        ),
        (("dynamic_resources", "ads_config", "transport_api_version"), "V3"),
        (("dynamic_resources", "cds_config"), {"ads": {}, "resource_api_version": "V3"}),
        (("dynamic_resources", "lds_config"), {"ads": {}, "resource_api_version": "V3"}),
        (("admin", "address"), {"socket_address": {"address": "127.0.0.1", "port_value": 15000}}),
        (
            ("layered_runtime", "layers", 0, "static_layer", "re2.max_program_size.error_level"),
            MAX_PROGRAM_SIZE,
        ),
    ],
    ids=lambda value: ".".join(map(str, value)) if isinstance(value, tuple) else None,
)
def test_bootstrap(path: tuple[str | int, ...], expected: Any) -> None:
    node: Any = BOOTSTRAP
    for step in path:
        node = node[step]
    assert node == expected


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"agent_socket": "agent.sock"}, "the agent socket 'agent.sock' must be an absolute path"),
        ({"admin_port": 70000}, "the admin port must be 0-65535, not 70000"),
        ({"node_id": ""}, "a bootstrap needs a node id and a node cluster"),
    ],
)
def test_bootstrap_refuses(arguments: dict[str, Any], message: str) -> None:
    settings: dict[str, Any] = {
        "node_id": "n",
        "node_cluster": "c",
        "agent_socket": "/run/agent.sock",
        "admin_port": 0,
    }
    with pytest.raises(ValueError, match=message):
        build_bootstrap(**{**settings, **arguments})


# -- determinism, problems, refusals --------------------------------------------------------


def _users_render(catalog: Catalog) -> Resources:
    config, _ = everything()
    view = compile_view(config, catalog, SidecarProxy("users-service", USERS, {"app": "users"}))
    return render_sidecar(view, ADDRESSES)


def test_a_render_is_deterministic_and_versioned_by_type() -> None:
    first, second = _users_render(_catalog()), _users_render(_catalog())
    assert first == second
    moved = _users_render(Catalog([*USERS_INSTANCES[:1], *REVIEWS_INSTANCES, *ORDERS_INSTANCES]))
    changed = [
        type_url
        for type_url in RESOURCE_TYPES
        if first.version(type_url) != moved.version(type_url)
    ]
    assert changed == [CLUSTER_LOAD_ASSIGNMENT]


def test_an_instance_with_a_host_name_is_left_out_and_said() -> None:
    named = instance("users-service", "users-1.internal:8443", {"app": "users"})
    resources = _users_render(Catalog([*USERS_INSTANCES, named]))
    found = dig(resources, "endpoints outbound|80||users-service/endpoints/0/lb_endpoints")
    assert [item["endpoint"]["address"]["socket_address"]["address"] for item in found] == [
        "10.0.0.5",
        "10.0.0.6",
    ]
    assert resources.problems == (
        "cluster outbound|80||users-service: instance users-1.internal:8443 (catalog "
        "users-service users-1.internal:8443) is left out: Envoy's endpoints are IP "
        "addresses, register the instance with one",
    )


def test_a_trust_domain_without_its_jwt_bundle_is_said() -> None:
    config = configured(MISSION, USERS_SERVICE, public_gateway())
    view = compile_view(config, _catalog(), GatewayProxy(GATEWAY, PUBLIC))
    resources = render_gateway(view, host="0.0.0.0")
    assert resources.problems == (
        "RequestAuthentication edge-jwt spec.jwtRules[0]: no JWT bundle of trust domain "
        "example.org was given, so its JWT-SVIDs are refused",
    )
    providers = dig(resources, f"{JWT}/providers")
    assert "RequestAuthentication edge-jwt spec.jwtRules[0]" not in providers


def test_refusals() -> None:
    config, catalog = everything()
    gateway_view = compile_view(config, catalog, GatewayProxy(GATEWAY, INGRESS))
    sidecar_view = compile_view(config, catalog, SidecarProxy("orders", ORDERS))
    with pytest.raises(ValueError, match="render_sidecar takes a sidecar's view, not a gateway's"):
        render_sidecar(gateway_view, ADDRESSES)
    with pytest.raises(ValueError, match="render_gateway takes a gateway's view, not a sidecar's"):
        render_gateway(sidecar_view, host="0.0.0.0")
    by_name = SidecarAddresses(HostPort("localhost", 8443), ADDRESSES.app, ADDRESSES.outbound)
    with pytest.raises(ValueError, match="the inbound listener's address localhost:8443 must be"):
        render_sidecar(sidecar_view, by_name)


# -- Envoy itself ---------------------------------------------------------------------------


@pytest.mark.envoy
def test_envoy_accepts_every_rendered_configuration(tmp_path: Path) -> None:
    """Every render of this file, in one static bootstrap: ``envoy --mode validate``."""
    envoy = require_envoy()
    ca = TestCA("example.org")
    served = ca.issue_certificate(dns_names=["api.example.com"])
    cert = write_pem(tmp_path / "api.pem", served.certificate)
    key = write_key_pem(tmp_path / "api.key", served.key)
    config = configured(MISSION, USERS_SERVICE, public_gateway(str(cert), str(key)))
    public = render_gateway(
        compile_view(config, _catalog(), GatewayProxy(GATEWAY, PUBLIC)),
        host="127.0.0.1",
        options=RenderOptions(jwt_bundles={"example.org": JWKS}),
    )
    renders = [rendered("mission"), rendered("users"), rendered("orders"), public]
    secrets = [
        svid_secret(spiffe_id, ca.issue_x509_svid(spiffe_id))
        for spiffe_id in (GATEWAY, USERS, ORDERS)
    ]
    bootstrap = static_bootstrap(
        BOOTSTRAP, renders, secrets=[*secrets, spiffe_trust(ALL_SECRET, [ca])]
    )
    listeners = bootstrap["static_resources"]["listeners"]
    assert len(listeners) == sum(len(item.listeners) for item in renders)
    result = validate(envoy, write_json(tmp_path / "envoy.json", bootstrap))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK" in result.stdout


RUN_CONFIGURATION = """\
apiVersion: tessera.io/v1alpha1
kind: Service
metadata: {name: users-service}
spec:
  spiffeIds: [spiffe://example.org/users]
  ports: [{number: 80, name: http, protocol: HTTP}]
---
apiVersion: tessera.io/v1alpha1
kind: RateLimit
metadata: {name: each-caller}
spec:
  service: users-service
  requestsPerSecond: 1
  burst: 2
---
apiVersion: tessera.io/v1alpha1
kind: RateLimit
metadata: {name: team}
spec:
  service: users-service
  from: {principals: ["spiffe://example.org/team/*"]}
  requestsPerSecond: 1
  burst: 2
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: users}
spec:
  hosts: [users-service]
  http:
  - match: [{uri: {exact: /old}}]
    rewrite: {uri: /new}
    route: [{destination: {host: users-service}}]
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class _Echo:
    """The app: answers each request with its path and headers, as JSON."""

    def __init__(self) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        from threading import Thread

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                headers: dict[str, list[str]] = {}
                for name, value in self.headers.items():
                    headers.setdefault(name.lower(), []).append(value)
                body = json.dumps({"path": self.path, "headers": headers}).encode()
                self.send_response(200)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = int(self.server.server_address[1])
        self.thread = Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.envoy
def test_envoy_keys_identity_and_rate_limits_on_the_handshake(tmp_path: Path) -> None:
    """A real Envoy running a rendered sidecar: the app sees the caller's SPIFFE ID from
    its certificate whatever headers it sent, each caller has its own bucket and a shared
    one is the named callers', a forged header changing neither; and a call through the
    outbound listener reaches the instance over mTLS, its path rewritten."""
    envoy = require_envoy()
    ca = TestCA("example.org")
    inbound, outbound = _free_port(), _free_port()
    app = _Echo()
    try:
        catalog = Catalog([instance("users-service", f"127.0.0.1:{inbound}")])
        view = compile_view(
            configured(RUN_CONFIGURATION), catalog, SidecarProxy("users-service", USERS)
        )
        addresses = SidecarAddresses(
            HostPort("127.0.0.1", inbound),
            HostPort("127.0.0.1", app.port),
            HostPort("127.0.0.1", outbound),
        )
        resources = render_sidecar(view, addresses, RenderOptions(access_log=None))
        base = build_bootstrap(
            node_id="test", node_cluster="users-service", agent_socket="/nonexistent", admin_port=0
        )
        bootstrap = static_bootstrap(
            base,
            [resources],
            secrets=[svid_secret(USERS, ca.issue_x509_svid(USERS)), spiffe_trust(ALL_SECRET, [ca])],
        )
        config = write_json(tmp_path / "envoy.json", bootstrap)
        args = [
            envoy,
            "-c",
            str(config),
            "--concurrency",
            "1",
            "--disable-hot-restart",
            "--log-level",
            "warn",
        ]
        with Process.start("envoy", args, log_path=tmp_path / "envoy.log") as proxy:
            proxy.wait_until(
                lambda: (_accepts(inbound) and _accepts(outbound)) or None, "Envoy listening", 20
            )

            callers = ("team/a", "team/b", "team/c", "billing")
            contexts = {
                name: _client_context(ca, f"spiffe://example.org/{name}", tmp_path)
                for name in callers
            }

            def call(caller: str, headers: dict[str, str] | None = None) -> tuple[int, Any]:
                return _https_get(contexts[caller], inbound, "/hello", headers or {})

            forged = {
                "X-Forwarded-Client-Spiffe-Id": USERS,
                "x_forwarded_client_spiffe_id": USERS,
                "X_Forwarded_Client_Cert": "By=x;URI=" + USERS,
            }
            # Each bucket refills at one token a second: the calls below take far less.
            status, seen = call("team/a", forged)
            assert status == 200
            assert seen["headers"][IDENTITY_HEADER] == ["spiffe://example.org/team/a"]
            assert not [name for name in seen["headers"] if "_" in name]
            xfcc = seen["headers"]["x-forwarded-client-cert"]
            assert len(xfcc) == 1 and xfcc[0].endswith(";URI=spiffe://example.org/team/a")
            # team/a has taken one token of its own bucket and one of the team's (burst 2).
            pretending = {IDENTITY_HEADER: "spiffe://example.org/team/a"}
            billing = [call("billing", pretending)[0] for _ in range(3)]
            assert billing == [200, 200, 429]  # its own bucket, not team/a's nor the team's
            assert call("team/b")[0] == 200  # the team's last token
            assert call("team/c")[0] == 429  # the team's bucket is empty

            status, seen = _http_get(outbound, "users-service", "/old?page=2")
            assert status == 200
            assert seen["path"] == "/new?page=2"
            assert seen["headers"][IDENTITY_HEADER] == [USERS]
    finally:
        app.close()


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def _client_context(ca: TestCA, caller: str, tmp_path: Path) -> ssl.SSLContext:
    """A client presenting an X509-SVID of ``caller``, trusting the CA."""
    svid = ca.issue_x509_svid(caller)
    chain, key, bundle = tmp_path / "client.pem", tmp_path / "client.key", tmp_path / "ca.pem"
    chain.write_bytes(pem(*svid.cert_chain))
    write_key_pem(key, cast(PrivateKey, svid.private_key))
    bundle.write_bytes(ca.bundle_pem())
    context = ssl.create_default_context(cafile=str(bundle))
    context.check_hostname = False  # an SVID names no host
    context.load_cert_chain(str(chain), str(key))
    return context


def _https_get(
    context: ssl.SSLContext, port: int, path: str, headers: dict[str, str]
) -> tuple[int, Any]:
    connection = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=10)
    try:
        connection.putrequest("GET", path, skip_host=True, skip_accept_encoding=True)
        connection.putheader("Host", "users-service")
        for name, value in headers.items():
            connection.putheader(name, value)
        connection.endheaders()
        response = connection.getresponse()
        body = response.read()
    finally:
        connection.close()
    return response.status, json.loads(body) if response.status == 200 else body


def _http_get(port: int, host: str, path: str) -> tuple[int, Any]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", path, headers={"Host": host})
        response = connection.getresponse()
        body = response.read()
    finally:
        connection.close()
    return response.status, json.loads(body) if response.status == 200 else body


def test_a_sidecar_without_an_outbound_address_only_serves_callers() -> None:
    config, catalog = everything()
    view = compile_view(config, catalog, SidecarProxy("users-service", USERS, {"app": "users"}))
    inbound_only = SidecarAddresses(inbound=ADDRESSES.inbound, app=ADDRESSES.app)
    resources = render_sidecar(view, inbound_only)
    assert [listener["name"] for listener in resources.listeners] == ["inbound"]
    assert [routes["name"] for routes in resources.route_configurations] == ["inbound"]
    assert [cluster["name"] for cluster in resources.clusters] == ["inbound|80||users-service"]
    assert resources.cluster_load_assignments == ()


def test_a_gateway_port_the_offset_puts_out_of_range_is_left_out_and_said() -> None:
    config, catalog = everything()
    view = compile_view(config, catalog, GatewayProxy(GATEWAY, INGRESS))
    resources = render_gateway(view, host="0.0.0.0", port_offset=65500)
    assert resources.listeners == ()
    assert any("port 80 plus the gateway's port offset 65500 is 65580, outside 1-65535"
               in problem for problem in resources.problems), resources.problems  # fmt: skip


@pytest.mark.parametrize("render", ["mission", "users", "orders", "public"])
def test_no_listener_shares_its_port_with_another_process(render: str) -> None:
    listeners = rendered(render).listeners
    assert listeners
    assert all(listener["enable_reuse_port"] is False for listener in listeners)
