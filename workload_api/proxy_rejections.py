"""What the agent tells the server of its Envoys: the NACKs still standing.

With every report of its instances (:mod:`workload_api.instances`) the agent sends the
NACKs of :meth:`workload_api.xds.DiscoveryStatus.current_rejections`: the last one of
each connected proxy and type that no later ACK superseded, each with what the proxy's
bootstrap says it is (``tessera.proxy``, ``tessera.service``, ``tessera.labels``,
``tessera.spiffe_id``), so that ``tessera mesh describe`` on the server can name the
Envoys of a Service that refused their configuration, and why (:mod:`ca.proxy_rejections`)::

    status = DiscoveryStatus(on_change=instances.proxies_changed)   # report at once
    reported = rejections_report(status)    # [{"node_id": ..., "reason": ...}, ...]

At most :data:`MAX_REPORTED_REJECTIONS` (the newest), each field cut to what the server
takes, Envoy's reason to :data:`MAX_REASON_CHARS` on one line.
"""

from __future__ import annotations

import json
from typing import Any, Final

from mesh.catalog import one_line
from mesh.registration import MAX_LABELS, label_problem
from workload_api.xds import DiscoveryStatus, Rejection

__all__ = ["MAX_REASON_CHARS", "MAX_REPORTED_REJECTIONS", "rejections_report"]

MAX_REPORTED_REJECTIONS: Final = 64
"""As many as the server takes in one report (the newest are sent)."""
MAX_REASON_CHARS: Final = 1024
"""As much of Envoy's reason as the server takes."""
MAX_NODE_ID_CHARS: Final = 256
MAX_VERSION_CHARS: Final = 128


def rejections_report(status: DiscoveryStatus) -> list[dict[str, Any]]:
    """The standing NACKs, newest last, as ``PUT /v1/agent/instances`` carries them."""
    standing = status.current_rejections()[-MAX_REPORTED_REJECTIONS:]
    return [_item(rejection) for rejection in standing]


def _item(rejection: Rejection) -> dict[str, Any]:
    metadata = rejection.metadata
    proxy = _text(metadata.get("tessera.proxy"))
    return {
        "node_id": one_line(rejection.node_id, MAX_NODE_ID_CHARS),
        "proxy": proxy if proxy in ("sidecar", "gateway") else "",
        "service": _text(metadata.get("tessera.service"))[:63],
        "labels": _labels(metadata.get("tessera.labels")),
        "spiffe_id": _text(metadata.get("tessera.spiffe_id"))[:2048],
        "type_url": rejection.type_url[:200],
        "version": one_line(rejection.version, MAX_VERSION_CHARS),
        "reason": one_line(rejection.reason, MAX_REASON_CHARS),
        "at": rejection.at.isoformat(),
    }


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _labels(value: Any) -> dict[str, str]:
    """``tessera.labels`` when it is labels the server takes; none otherwise (then the
    agent gave that proxy no view either)."""
    try:
        labels = json.loads(_text(value) or "{}")
    except ValueError:
        return {}
    if (
        not isinstance(labels, dict)
        or len(labels) > MAX_LABELS
        or not all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items())
        or label_problem(labels) is not None
    ):
        return {}
    return labels
