"""Whether an instance may join a Service: the rule every agent and the server apply.

A workload registers an instance of a Service through the agent of its node; the agent
checks the caller holds an SVID for the SPIFFE ID it names, the server checks the agent
hosts a workload with that ID, and both check it here against the Service::

    problem = registration_problem(config, "users-service", "spiffe://example.org/users")
    if problem is not None:
        refuse(problem.reason)         # problem.code: "not-found" or "not-allowed"

So no agent can put an endpoint into a Service whose ``spiffeIds`` do not name the
workload behind it: another team's Service stays theirs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from mesh.config import Config
from mesh.names import check_dns_label, check_label_key, check_label_value, similar_names
from mesh.resources import Service

__all__ = [
    "MAX_LABELS",
    "RegistrationProblem",
    "label_problem",
    "registration_problem",
    "similar_names",
]

MAX_LABELS = 64


@dataclass(frozen=True)
class RegistrationProblem:
    code: Literal["invalid", "not-found", "not-allowed"]
    reason: str


def registration_problem(
    config: Config, service: str, spiffe_id: str
) -> RegistrationProblem | None:
    """Why an instance of ``service`` served by ``spiffe_id`` is refused, or None."""
    try:
        check_dns_label(service)
    except ValueError as err:
        return RegistrationProblem("invalid", f"service {service!r} {err}")
    found = config.get(Service, service)
    if found is None:
        close = similar_names(service, [item.name for item in config.of_kind(Service)])
        guess = f"did you mean {' or '.join(close)}? If not, " if close else ""
        return RegistrationProblem(
            "not-found",
            f"there is no Service {service}; {guess}apply one (kind: Service, "
            "tessera.io/v1alpha1) naming the SPIFFE IDs that may serve it",
        )
    if spiffe_id not in found.spec.spiffe_ids:
        allowed = ", ".join(found.spec.spiffe_ids)
        return RegistrationProblem(
            "not-allowed",
            f"Service {service} may be served by {allowed}, not by {spiffe_id} "
            f"(its spec.spiffeIds)",
        )
    return None


def label_problem(labels: Mapping[str, str]) -> str | None:
    """Why ``labels`` are not an instance's labels (Kubernetes' syntax, at most 64), or None."""
    if len(labels) > MAX_LABELS:
        return f"an instance has at most {MAX_LABELS} labels, not {len(labels)}"
    for key, value in labels.items():
        try:
            check_label_key(key)
        except ValueError as err:
            return f"label {key!r} {err}"
        try:
            check_label_value(value)
        except ValueError as err:
            return f"label {key}={value!r}: the value {err}"
    return None
