"""Documents the mesh tests start from, and helpers to spoil them one field at a time."""

from __future__ import annotations

import copy
import re
from typing import Any

import yaml

from mesh import ConfigError, parse_documents, parse_resource

REMOVE = object()
"""A value for :func:`with_field` that deletes the field."""

_STEP = re.compile(r"([A-Za-z_][\w-]*)|\[([^\]]+)\]")


def with_field(document: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A copy of ``document`` with the field at ``path`` (``spec.http[0].timeout``) set."""
    result = copy.deepcopy(document)
    steps: list[str | int] = []
    for name, bracket in _STEP.findall(path):
        steps.append(name if name else int(bracket) if bracket.isdigit() else bracket)
    node: Any = result
    for step in steps[:-1]:
        node = node[step]
    if value is REMOVE:
        del node[steps[-1]]
    else:
        node[steps[-1]] = value
    return result


def load(text: str) -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(text)
    return document


def errors(source: str | dict[str, Any]) -> list[str]:
    """Every error parsing ``source`` (YAML text, or one document) reports, as printed."""
    try:
        if isinstance(source, str):
            parse_documents(source)
        else:
            parse_resource(source)
    except ConfigError as err:
        return [str(error) for error in err.errors]
    return []


MISSION = """\
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: microservice-gateway}
spec:
  selector: {istio: ingressgateway}
  servers:
  - port: {number: 80, name: http, protocol: HTTP}
    hosts: ["*"]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: microservice-virtual-service}
spec:
  hosts: ["*"]
  gateways: [microservice-gateway]
  http:
  - match:
    - uri: {exact: /api/v1/users}
    route:
    - destination: {host: users-service, port: {number: 80}}
"""

USERS_SERVICE = """\
apiVersion: tessera.io/v1alpha1
kind: Service
metadata: {name: users-service}
spec:
  spiffeIds: [spiffe://example.org/users]
  ports: [{number: 80, name: http, protocol: HTTP}]
  healthCheck: {http: {path: /healthz}, interval: 2s}
"""

GATEWAY, VIRTUAL_SERVICE = (load(text) for text in MISSION.split("---"))
SERVICE = load(USERS_SERVICE)
