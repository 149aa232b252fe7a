"""The seven kinds, one module each, and the registry that maps a ``kind`` to its model.

    Gateway, VirtualService, DestinationRule      networking.istio.io  v1, v1beta1, v1alpha3
    AuthorizationPolicy, RequestAuthentication    security.istio.io    v1, v1beta1
    Service, RateLimit                            tessera.io           v1alpha1

Usage::

    KINDS["VirtualService"].api_versions()    # ("networking.istio.io/v1", ...)
    kind_named("virtualservice")              # VirtualService (what ``mesh get`` takes)
"""

from __future__ import annotations

from collections.abc import Mapping

from mesh.resources.authentication import RequestAuthentication
from mesh.resources.authorization import AuthorizationPolicy
from mesh.resources.base import ObjectMeta, Resource, ResourceKey, WorkloadSelector
from mesh.resources.destinationrule import DestinationRule
from mesh.resources.gateway import Gateway
from mesh.resources.ratelimit import RateLimit
from mesh.resources.service import Service
from mesh.resources.virtualservice import VirtualService

__all__ = [
    "KINDS",
    "AnyResource",
    "AuthorizationPolicy",
    "DestinationRule",
    "Gateway",
    "ObjectMeta",
    "RateLimit",
    "RequestAuthentication",
    "Resource",
    "ResourceKey",
    "Service",
    "VirtualService",
    "WorkloadSelector",
    "kind_named",
    "sort_key",
]

AnyResource = (
    Gateway
    | VirtualService
    | DestinationRule
    | AuthorizationPolicy
    | RequestAuthentication
    | Service
    | RateLimit
)

KINDS: Mapping[str, type[Resource]] = {
    kind.KIND: kind
    for kind in (
        Gateway,
        VirtualService,
        DestinationRule,
        AuthorizationPolicy,
        RequestAuthentication,
        Service,
        RateLimit,
    )
}
"""Every kind by its name, in the order Tessera lists them."""

_ORDER = {name: position for position, name in enumerate(KINDS)}
_LOWER = {name.lower(): kind for name, kind in KINDS.items()}


def kind_named(text: str) -> type[Resource] | None:
    """The kind called ``text`` in any case (``virtualservice``), or None."""
    return _LOWER.get(text.lower())


def sort_key(resource: Resource) -> tuple[int, str]:
    """Tessera's order of resources: by kind as listed in :data:`KINDS`, then by name."""
    return (_ORDER[resource.KIND], resource.name)
