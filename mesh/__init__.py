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
- :mod:`mesh.hosts`, :mod:`mesh.principals`, :mod:`mesh.durations`, :mod:`mesh.regex`,
  :mod:`mesh.httpsyntax`, :mod:`mesh.names` — the values fields hold, and their checks;
- :mod:`mesh.errors` — :class:`ConfigError` and its :class:`FieldError`s.
"""

from __future__ import annotations

from mesh.config import Change, Config
from mesh.errors import ConfigError, FieldError, MeshError
from mesh.parse import parse_documents
from mesh.references import check_references
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
from mesh.yamlload import MAX_DOCUMENTS, MAX_INPUT_BYTES

__all__ = [
    "KINDS",
    "MAX_DOCUMENTS",
    "MAX_INPUT_BYTES",
    "AnyResource",
    "AuthorizationPolicy",
    "Change",
    "Config",
    "ConfigError",
    "DestinationRule",
    "FieldError",
    "Gateway",
    "MeshError",
    "RateLimit",
    "RequestAuthentication",
    "Resource",
    "ResourceKey",
    "Service",
    "VirtualService",
    "check_references",
    "kind_named",
    "parse_documents",
    "parse_resource",
]
