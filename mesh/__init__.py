"""The service mesh's configuration model: Istio's resources, typed and validated.

The first room of the mesh's control plane (parse → validate → compile → render →
serve): YAML in, typed resources out, every error at once with the path of its field.
Pure: no file, socket or process::

    from mesh import Config, ConfigError, parse_documents

    try:
        resources = parse_documents(text, source="mesh.yaml")
        config, changes = Config().apply(resources)
    except ConfigError as err:
        for error in err.errors:
            print(error)    # VirtualService reviews: spec.http[0].corsPolicy is not supported

The modules, one idea each:

- :mod:`mesh.yamlload` — bounded multi-document YAML (size, count, depth, no aliases);
- :mod:`mesh.validation` — one document to a typed resource, pydantic's errors translated;
- :mod:`mesh.parse` — text to resources (:func:`parse_documents`);
- :mod:`mesh.resources` — the seven kinds, one module each;
- :mod:`mesh.references` — what must exist for a configuration to hold together;
- :mod:`mesh.config` — the immutable configuration and what an apply changes;
- :mod:`mesh.keyorder` — the order a document's keys were written in, kept for ``get``;
- :mod:`mesh.hosts`, :mod:`mesh.principals`, :mod:`mesh.durations`, :mod:`mesh.regex`,
  :mod:`mesh.httpsyntax`, :mod:`mesh.names` — the values fields hold, and their checks;
- :mod:`mesh.errors` — :class:`ConfigError` and its :class:`FieldError`s.

The compiler (pure too: configuration, catalog and a proxy's identity in, its view out)::

    view = compile_view(config, catalog, SidecarProxy("orders", "spiffe://example.org/orders"))
    explain(config, catalog, caller="spiffe://example.org/orders", service="users-service",
            path="/api/v1/users").allowed
    describe(config, catalog, "users-service").lines()

- :mod:`mesh.catalog` — the instances of each Service (:class:`Catalog`, :class:`Instance`);
- :mod:`mesh.proxy` — who a view is for (:class:`SidecarProxy`, :class:`GatewayProxy`);
- :mod:`mesh.request` — a request as routes and policies see it (:class:`HttpRequest`);
- :mod:`mesh.view` — the view and its parts, each naming its :class:`Source`;
- :mod:`mesh.defaults` — every default the compiler applies, in one place;
- :mod:`mesh.compile` — :func:`compile_view`;
- :mod:`mesh.explain` — why a request goes where it goes (:func:`explain`,
  :func:`explain_gateway`);
- :mod:`mesh.describe` — what each proxy of a Service does, line by line (:func:`describe`).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mesh.catalog import Catalog, Instance
    from mesh.compile import compile_view
    from mesh.config import Change, Config
    from mesh.describe import Description, describe, describe_view
    from mesh.errors import ConfigError, FieldError, MeshError, UnknownServiceError
    from mesh.explain import Explanation, explain, explain_gateway
    from mesh.parse import parse_documents
    from mesh.proxy import GatewayProxy, SidecarProxy
    from mesh.references import check_references
    from mesh.request import HttpRequest
    from mesh.resources import (
        KINDS,
        AnyResource,
        AuthorizationPolicy,
        DestinationRule,
        Gateway,
        RateLimit,
        RequestAuthentication,
        Resource,
        ResourceKey,
        Service,
        VirtualService,
        kind_named,
    )
    from mesh.validation import parse_resource
    from mesh.view import Source, View
    from mesh.yamlload import MAX_DOCUMENTS, MAX_INPUT_BYTES

# Names load on first use (PEP 562): ``from mesh import Change`` loads the configuration
# model, not the compiler, the YAML loader or ``explain``; a server that stores resources
# starts without them.
_MODULE_OF = {
    "Catalog": "mesh.catalog",
    "Instance": "mesh.catalog",
    "compile_view": "mesh.compile",
    "Change": "mesh.config",
    "Config": "mesh.config",
    "Description": "mesh.describe",
    "describe": "mesh.describe",
    "describe_view": "mesh.describe",
    "ConfigError": "mesh.errors",
    "FieldError": "mesh.errors",
    "MeshError": "mesh.errors",
    "UnknownServiceError": "mesh.errors",
    "Explanation": "mesh.explain",
    "explain": "mesh.explain",
    "explain_gateway": "mesh.explain",
    "parse_documents": "mesh.parse",
    "GatewayProxy": "mesh.proxy",
    "SidecarProxy": "mesh.proxy",
    "check_references": "mesh.references",
    "HttpRequest": "mesh.request",
    "KINDS": "mesh.resources",
    "AnyResource": "mesh.resources",
    "AuthorizationPolicy": "mesh.resources",
    "DestinationRule": "mesh.resources",
    "Gateway": "mesh.resources",
    "RateLimit": "mesh.resources",
    "RequestAuthentication": "mesh.resources",
    "Resource": "mesh.resources",
    "ResourceKey": "mesh.resources",
    "Service": "mesh.resources",
    "VirtualService": "mesh.resources",
    "kind_named": "mesh.resources",
    "parse_resource": "mesh.validation",
    "Source": "mesh.view",
    "View": "mesh.view",
    "MAX_DOCUMENTS": "mesh.yamlload",
    "MAX_INPUT_BYTES": "mesh.yamlload",
}

__all__ = [
    "KINDS",
    "MAX_DOCUMENTS",
    "MAX_INPUT_BYTES",
    "AnyResource",
    "AuthorizationPolicy",
    "Catalog",
    "Change",
    "Config",
    "ConfigError",
    "Description",
    "DestinationRule",
    "Explanation",
    "FieldError",
    "Gateway",
    "GatewayProxy",
    "HttpRequest",
    "Instance",
    "MeshError",
    "RateLimit",
    "RequestAuthentication",
    "Resource",
    "ResourceKey",
    "Service",
    "SidecarProxy",
    "Source",
    "UnknownServiceError",
    "View",
    "VirtualService",
    "check_references",
    "compile_view",
    "describe",
    "describe_view",
    "explain",
    "explain_gateway",
    "kind_named",
    "load_all",
    "parse_documents",
    "parse_resource",
]


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def load_all() -> None:
    """Import every module the names above come from, as ``import mesh`` did before they
    loaded on first use: a command that will need the whole model finds a missing
    third-party package (pydantic, PyYAML, RE2) at once, and can name the extra."""
    for module in sorted(set(_MODULE_OF.values())):
        importlib.import_module(module)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
