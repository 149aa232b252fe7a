"""Why a request goes where it goes: ``tessera mesh explain``.

Compiles the views the request crosses and reads them as the proxies would — the
caller's sidecar (or the gateway) picks the route, the destination's sidecar judges
authorization and counts the request against its RateLimits::

    explanation = explain(config, catalog, caller="spiffe://example.org/orders",
                          service="users-service", method="GET", path="/api/v1/users")
    explanation.allowed                # True / False: the CLI's exit status
    explanation.route.source           # VirtualService users spec.http[0]
    explanation.destinations           # each share of the split, its endpoints and rule
    for line in explanation.lines():   # every step, naming the resource it comes from
        print(line)

    explain_gateway(config, catalog, labels={"istio": "ingressgateway"}, port=80,
                    host="api.example.com", path="/api/v1/users")

How the destination's authorization is judged: AuthorizationPolicies select workloads by
labels, and a subset's instances may differ in theirs, so the labels are those every
instance of the chosen cluster has (the routable ones, else those registered), with the
subset's. A weighted split is judged for each share that gets requests; the request is
allowed when every such share allows it and has an endpoint to serve it. A share with none
(no instance registered, or none healthy) answers 503: when authorization would allow the
request, the outcome is ``unavailable`` and the last lines say which instances are not
serving and why; a refusal is named first, as it outlasts the missing instances.

Before any instance of the cluster is registered its labels are unknown beyond the
subset's: a policy whose ``selector.matchLabels`` those do not decide may or may not
apply, and explain cannot decide as the proxies will. It judges the request with the
least labels that select each such policy, and with labels that select none of them.
These give every outcome any labels can: whatever refuses a request under some labels
(a DENY rule, or an ALLOW policy none of whose rules match) refuses it under the least
labels that select its policy, and whatever allows it (an ALLOW rule, or no ALLOW
policy at all) allows it there too, or with no such policy selected. When they agree,
that is the answer, whatever labels the sidecars run with; when they differ, the
outcome is ``undecided`` and the request is not counted as allowed.

A request with a token is judged as if the token were valid: ``claims`` are what the
``when`` conditions read (JWT validation itself is the proxy's, not explain's).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal

from mesh import defaults
from mesh.catalog import Catalog
from mesh.compile import compile_authorization, compile_rate_limits, compile_view
from mesh.config import Config
from mesh.proxy import GatewayProxy, SidecarProxy, labels_match
from mesh.request import HttpRequest, split_host
from mesh.resources import AuthorizationPolicy, Service
from mesh.view import (
    ClusterEndpoints,
    Decision,
    DirectResponse,
    RateLimitRule,
    Redirect,
    RequestMatch,
    Route,
    Source,
    View,
    WeightedDestination,
    format_duration,
    to_json,
)

if TYPE_CHECKING:
    from spiffe import SpiffeId

__all__ = [
    "DestinationOutcome",
    "Explanation",
    "LabelCase",
    "Outcome",
    "Step",
    "explain",
    "explain_gateway",
]

Outcome = Literal[
    "forwarded",
    "redirected",
    "not-found",
    "refused",
    "undecided",
    "aborted",
    "unknown-service",
    "no-listener",
    "unavailable",
]


@dataclass(frozen=True)
class Step:
    """One line of an explanation and the resource it comes from."""

    text: str
    source: Source

    def __str__(self) -> str:
        return f"{self.text}  [{self.source}]"


@dataclass(frozen=True)
class LabelCase:
    """What the destination's sidecar would decide if its instances ran with ``labels``
    (the subset's and those that bring ``selected`` in), while none is registered."""

    labels: Mapping[str, str] = field(hash=False)
    selected: tuple[Source, ...]
    decision: Decision

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", MappingProxyType(dict(self.labels)))


@dataclass(frozen=True)
class DestinationOutcome:
    """One share of a route: where it goes, how many endpoints serve it, and what the
    destination's sidecar decides for the caller.

    ``unavailable`` says why no endpoint serves the share (every request sent to it gets
    503), None when one does. ``workload_labels`` are those its instances are known to
    have. ``label_cases`` is empty when they decide which AuthorizationPolicies apply;
    else (no instance is registered yet) the decision for each label set that matters,
    and ``decision`` says whether they agree (``undecided`` when they do not).
    """

    destination: WeightedDestination
    endpoints: int
    workload_labels: Mapping[str, str] = field(hash=False)
    decision: Decision
    rate_limits: tuple[RateLimitRule, ...]
    label_cases: tuple[LabelCase, ...] = ()
    unavailable: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "workload_labels", MappingProxyType(dict(self.workload_labels)))

    @property
    def undecided(self) -> bool:
        """Whether the outcome depends on the labels of instances not registered yet."""
        return len({case.decision.allowed for case in self.label_cases}) > 1


@dataclass(frozen=True)
class Explanation:
    """The route a request takes, where it goes and whether it is allowed, step by step."""

    proxy: str
    caller: str | None
    request: HttpRequest
    outcome: Outcome
    allowed: bool
    status: int | None
    route: Route | None
    matched: RequestMatch | None
    destinations: tuple[DestinationOutcome, ...]
    gateway_decision: Decision | None
    steps: tuple[Step, ...]

    @property
    def destination(self) -> DestinationOutcome | None:
        """The destination when one share takes every request, else None (a split)."""
        shares = [item for item in self.destinations if item.destination.weight > 0]
        return shares[0] if len(shares) == 1 else None

    @property
    def decision(self) -> Decision | None:
        """The authorization that decided: a refusal if there is one, else the first."""
        decisions = [item.decision for item in self.destinations if item.destination.weight > 0]
        if self.gateway_decision is not None:
            decisions.insert(0, self.gateway_decision)
        refused = [decision for decision in decisions if not decision.allowed]
        chosen = refused or decisions
        return chosen[0] if chosen else None

    @property
    def rate_limits(self) -> tuple[RateLimitRule, ...]:
        found: dict[Source, RateLimitRule] = {}
        for item in self.destinations:
            for rule in item.rate_limits:
                found.setdefault(rule.source, rule)
        return tuple(found.values())

    def lines(self) -> list[str]:
        return [str(step) for step in self.steps]

    def to_json(self) -> dict[str, Any]:
        document = to_json(self)
        assert isinstance(document, dict)
        return document


class _Steps:
    def __init__(self) -> None:
        self.items: list[Step] = []

    def add(self, text: str, source: Source) -> None:
        self.items.append(Step(text, source))


def explain(
    config: Config,
    catalog: Catalog,
    *,
    caller: str | SpiffeId,
    service: str,
    method: str = "GET",
    path: str = "/",
    headers: Mapping[str, str] | None = None,
    port: int | None = None,
    claims: Mapping[str, Any] | None = None,
    caller_labels: Mapping[str, str] | None = None,
) -> Explanation:
    """How the sidecar of ``caller`` routes a request to ``service``, and whether the
    destination allows it.

    ``caller_labels`` (what ``sourceLabels`` match) default to the labels every catalog
    instance of ``caller`` has. ``port`` is the port the request names (a ``Host`` with
    a port), for a Service with several.
    """
    caller_id = str(caller)
    request = HttpRequest.of(method, path, headers, port=port)
    labels = (
        dict(caller_labels) if caller_labels is not None else _common_labels(catalog, caller_id)
    )
    proxy = SidecarProxy(_service_of(config, catalog, caller_id), caller_id, labels)
    steps = _Steps()
    view = compile_view(config, catalog, proxy)
    outbound = view.outbound_service(service)
    if outbound is None:
        steps.add(f"Service {service} does not exist", Source(Service.KIND, service))
        return _explanation(proxy, request, "unknown-service", False, None, steps)
    steps.add(f"{proxy} calls {service}: {request.method} {request.path}", outbound.source)
    route = outbound.route_for(request)
    return _follow(config, catalog, view, route, request, caller_id, proxy, steps, None, claims)


def explain_gateway(
    config: Config,
    catalog: Catalog,
    *,
    labels: Mapping[str, str],
    port: int,
    host: str = "",
    method: str = "GET",
    path: str = "/",
    headers: Mapping[str, str] | None = None,
    claims: Mapping[str, Any] | None = None,
    spiffe_id: str | SpiffeId | None = None,
) -> Explanation:
    """How a gateway with ``labels`` routes a request that enters it on ``port`` (the
    Gateway's port, before ``--port-offset``) for ``host``.

    ``spiffe_id`` is the gateway's own ID: the caller the destination's sidecar judges.
    """
    gateway_id = str(spiffe_id) if spiffe_id is not None else None
    all_headers = dict(headers or {})
    if host:
        all_headers["host"] = host
    request = HttpRequest.of(method, path, all_headers, port=port)
    proxy = GatewayProxy(gateway_id or "", labels)
    steps = _Steps()
    view = compile_view(config, catalog, proxy)
    listener = view.listener(port)
    if listener is None:
        steps.add(
            f"{proxy} has no listener on port {port}: no Gateway it serves has that port",
            defaults.GATEWAY_NOT_FOUND,
        )
        return _explanation(proxy, request, "no-listener", False, None, steps, gateway_id)
    steps.add(f"port {port} ({listener.protocol})", listener.source)
    authority = request.header("host") or ""
    server = listener.server_for(authority)
    if server is None:
        return _answered(proxy, request, listener.not_found, steps, gateway_id)
    steps.add(
        f"host {authority or '(none)'} is served by hosts {', '.join(server.hosts)}", server.source
    )
    if server.https_redirect is not None:
        steps.add("answered 301 to https", server.https_redirect.source)
        return _explanation(proxy, request, "redirected", True, 301, steps, gateway_id)
    virtual_host = server.virtual_host_for(split_host(authority)[0])
    if virtual_host is None:
        return _answered(proxy, request, server.not_found, steps, gateway_id)
    steps.add(f"routed by hosts {', '.join(virtual_host.domains)}", virtual_host.source)
    gateway_decision = view.authorization.decide(None, request, claims)
    if view.authorization.rules or view.authorization.allow_policies:
        steps.add(f"gateway authorization: {gateway_decision.reason}", gateway_decision.rule)
        if not gateway_decision.allowed:
            return _explanation(
                proxy, request, "refused", False, 403, steps, gateway_id,
                gateway_decision=gateway_decision,
            )  # fmt: skip
    route = virtual_host.route_for(request)
    return _follow(
        config, catalog, view, route, request, gateway_id, proxy, steps, gateway_decision, claims
    )


def _follow(
    config: Config,
    catalog: Catalog,
    view: View,
    route: Route | None,
    request: HttpRequest,
    caller: str | None,
    proxy: SidecarProxy | GatewayProxy,
    steps: _Steps,
    gateway_decision: Decision | None,
    claims: Mapping[str, Any] | None = None,
) -> Explanation:
    """From the route taken to the destinations' decisions."""
    if route is None:  # only a Service without an HTTP port has no route for everything
        steps.add("no route takes the request: the Service has no HTTP port", steps.items[0].source)
        return _explanation(
            proxy, request, "not-found", False, None, steps, caller,
            gateway_decision=gateway_decision,
        )  # fmt: skip
    entry = route.match(request)
    matched = entry if isinstance(entry, RequestMatch) else None
    shown = f"route {route.name!r}" if route.name else "route"
    steps.add(
        f"{shown} taken: {matched}" if matched is not None else f"{shown} taken: any request",
        matched.source if matched is not None else route.source,
    )
    action = route.action
    if isinstance(action, DirectResponse):
        steps.add(f"answered {action.status}: {action.reason}", action.source)
        return _explanation(
            proxy, request, "not-found", False, action.status, steps, caller,
            route=route, matched=matched, gateway_decision=gateway_decision,
        )  # fmt: skip
    if isinstance(action, Redirect):
        steps.add(f"answered {action.code}: a redirect", action.source)
        return _explanation(
            proxy, request, "redirected", True, action.code, steps, caller,
            route=route, matched=matched, gateway_decision=gateway_decision,
        )  # fmt: skip
    upstream = route.rewrite_request(request, entry)
    if route.rewrite is not None:
        steps.add(f"rewritten to {upstream.path}", route.rewrite.source)
    _route_settings(route, steps)
    abort = route.fault.abort if route.fault is not None else None
    if abort is not None and abort.percentage >= 100:
        steps.add(f"answered {abort.http_status}: every request is aborted", abort.source)
        return _explanation(
            proxy, request, "aborted", False, abort.http_status, steps, caller,
            route=route, matched=matched, gateway_decision=gateway_decision,
        )  # fmt: skip
    outcomes = tuple(
        _destination(config, catalog, view, item, upstream, caller, claims, steps)
        for item in action.destinations
    )
    shares = [item for item in outcomes if item.destination.weight > 0]
    allowed = all(item.decision.allowed for item in shares)
    refused = any(not item.decision.allowed and not item.undecided for item in shares)
    outcome: Outcome = "forwarded" if allowed else "refused" if refused else "undecided"
    status = 403 if refused else None
    unserved = [item for item in shares if item.unavailable is not None]
    if allowed and unserved:
        # Allowed, but not served: the caller's sidecar has nowhere to send it.
        outcome, allowed, status = "unavailable", False, 503
        for item in unserved:
            share = "" if item.destination.weight >= 100 else f"{item.destination.weight}% of "
            steps.add(f"not served: {share}requests get {item.unavailable}",
                      item.destination.source)  # fmt: skip
    return _explanation(
        proxy, request, outcome, allowed, status, steps, caller,
        route=route, matched=matched, destinations=outcomes, gateway_decision=gateway_decision,
    )  # fmt: skip


def _route_settings(route: Route, steps: _Steps) -> None:
    if route.timeout is not None:
        timeout = route.timeout.duration
        steps.add(
            f"timeout {format_duration(timeout) if timeout else 'none'}", route.timeout.source
        )
    if route.retries is not None:
        retries = route.retries
        if retries.attempts:
            steps.add(f"retries {retries.attempts} on {','.join(retries.retry_on)}", retries.source)
        else:
            steps.add("no retries", retries.source)
    if route.fault is not None:
        if route.fault.delay is not None:
            delay = route.fault.delay
            steps.add(
                f"fault: {format_duration(delay.fixed_delay)} delay on {delay.percentage:g}%",
                delay.source,
            )
        if route.fault.abort is not None:
            abort = route.fault.abort
            steps.add(
                f"fault: abort with {abort.http_status} on {abort.percentage:g}%", abort.source
            )
    if route.mirror is not None:
        mirror = route.mirror
        steps.add(f"mirrored to {mirror.cluster} ({mirror.percentage:g}%)", mirror.source)


def _destination(
    config: Config,
    catalog: Catalog,
    view: View,
    destination: WeightedDestination,
    request: HttpRequest,
    caller: str | None,
    claims: Mapping[str, Any] | None,
    steps: _Steps,
) -> DestinationOutcome:
    endpoints = view.cluster_endpoints(destination.cluster)
    subset = dict(endpoints.labels) if endpoints is not None else {}
    where = endpoints.source if endpoints is not None else Source(Service.KIND, destination.service)
    labels = _workload_labels(catalog, destination.service, endpoints)
    known = subset if labels is None else labels
    unknown = _undetermined(config, known) if labels is None else ()
    cases = _label_cases(config, known, unknown, caller, request, claims)
    if cases:
        decision = _agreement(destination.service, cases, where)
    else:
        decision = compile_authorization(config, known).decide(caller, request, claims)
    rate_limits = tuple(
        rule for rule in compile_rate_limits(config, destination.service) if rule.applies_to(caller)
    )
    count = len(endpoints.endpoints) if endpoints is not None else 0
    unavailable = _unavailable(destination, endpoints) if count == 0 else None
    outcome = DestinationOutcome(
        destination, count, known, decision, rate_limits, cases, unavailable
    )
    steps.add(
        f"{destination.weight}% to {destination} (cluster {destination.cluster}, "
        f"{count} endpoint{'s' if count != 1 else ''})",
        destination.source,
    )
    if destination.weight == 0:
        return outcome
    if unavailable is not None:
        steps.add(unavailable, where)
    if cases:
        _say_cases(destination, known, unknown, cases, decision, steps, where)
    else:
        steps.add(
            f"{'allowed' if decision.allowed else 'refused'} by {destination.service}: "
            f"{decision.reason}",
            decision.rule,
        )
        for audited in decision.audited:
            steps.add("audited", audited)
    for rule in rate_limits:
        bucket = "shared bucket" if rule.keyed_on == "shared" else "its own bucket"
        steps.add(
            f"rate limit {rule.requests_per_second}/s, burst {rule.burst}, {bucket}",
            rule.source,
        )
    return outcome


_LISTED = 3  # instances named in a 503's reason; the rest are counted


def _unavailable(destination: WeightedDestination, endpoints: ClusterEndpoints | None) -> str:
    """Why no endpoint serves ``destination``: none registered, or which instances are
    not routable (``unhealthy``, or not checked yet while the Service has a health check)."""
    subset = f" subset {destination.subset}" if destination.subset else ""
    excluded = endpoints.excluded if endpoints is not None else ()
    if not excluded:
        return f"503: no instance of {destination.service}{subset} is registered"
    groups: list[str] = []
    for health, name in (("unhealthy", "unhealthy"), ("unknown", "not checked yet")):
        addresses = [str(item.address) for item in excluded if item.health == health]
        if addresses:
            shown = ", ".join(addresses[:_LISTED])
            more = f" and {len(addresses) - _LISTED} more" if len(addresses) > _LISTED else ""
            groups.append(f"{len(addresses)} {name}: {shown}{more}")
    return f"503: no healthy instance of {destination.service}{subset} ({'; '.join(groups)})"


def _workload_labels(
    catalog: Catalog, service: str, endpoints: ClusterEndpoints | None
) -> dict[str, str] | None:
    """The labels every instance of the cluster has (the routable ones, else every one
    registered), with the subset's; None when no instance of it is registered."""
    subset = dict(endpoints.labels) if endpoints is not None else {}
    instances = [item.labels for item in endpoints.endpoints] if endpoints is not None else []
    if not instances:
        instances = [
            instance.labels
            for instance in catalog.instances(service)
            if labels_match(subset, instance.labels)
        ]
    if not instances:
        return None
    return {**subset, **_shared(instances)}


def _undetermined(config: Config, known: Mapping[str, str]) -> tuple[AuthorizationPolicy, ...]:
    """The AuthorizationPolicies that select workloads by labels ``known`` do not decide:
    they may select the workload or not, as the labels it runs with have them or not."""
    return tuple(
        policy
        for policy in config.of_kind(AuthorizationPolicy)
        if policy.spec.selector is not None
        and not labels_match(policy.spec.selector.match_labels, known)
        and all(known.get(key, value) == value for key, value in _selector(policy).items())
    )


def _label_cases(
    config: Config,
    known: Mapping[str, str],
    undetermined: tuple[AuthorizationPolicy, ...],
    caller: str | None,
    request: HttpRequest,
    claims: Mapping[str, Any] | None,
) -> tuple[LabelCase, ...]:
    """The decision with the least labels that select each undetermined policy, then
    with labels that select none of them (see the module's docstring)."""
    if not undetermined:
        return ()
    label_sets: list[dict[str, str]] = []
    for policy in undetermined:
        labels = {**known, **_selector(policy)}
        if labels not in label_sets:
            label_sets.append(labels)
    label_sets.append(dict(known))
    cases = []
    for labels in label_sets:
        selected = tuple(
            Source(AuthorizationPolicy.KIND, policy.name)
            for policy in undetermined
            if labels_match(_selector(policy), labels)
        )
        decision = compile_authorization(config, labels).decide(caller, request, claims)
        cases.append(LabelCase(labels, selected, decision))
    return tuple(cases)


def _agreement(service: str, cases: tuple[LabelCase, ...], source: Source) -> Decision:
    """What the cases decide together: their answer when they agree, else not allowed."""
    outcomes = {case.decision.allowed for case in cases}
    if len(outcomes) > 1:
        reason = (
            f"undecided: {service} allows it with some of these labels and refuses it with "
            f"others; explain again once an instance of {service} is registered"
        )
        return Decision(False, source, reason)
    allowed = outcomes.pop()
    verdict = "allowed" if allowed else "refused"
    reason = f"{verdict} by {service} whatever labels its sidecars run with"
    return Decision(allowed, source, reason)


def _say_cases(
    destination: WeightedDestination,
    known: Mapping[str, str],
    undetermined: tuple[AuthorizationPolicy, ...],
    cases: tuple[LabelCase, ...],
    decision: Decision,
    steps: _Steps,
    source: Source,
) -> None:
    service = destination.service
    subset = f" subset {destination.subset}" if destination.subset else ""
    names = [f"AuthorizationPolicy {policy.name}" for policy in undetermined]
    if len(names) == 1:
        which = f"{names[0]} selects workloads by labels, so whether it applies"
        none = "labels it does not select"
    else:
        policies = ", ".join(policy.name for policy in undetermined[:-1])
        which = (
            f"AuthorizationPolicies {policies} and {undetermined[-1].name} select workloads by "
            "labels, so which of them apply"
        )
        none = "labels none of them selects"
    steps.add(
        f"no instance of {service}{subset} is registered yet: {which} depends on the labels "
        "its sidecars will run with",
        source,
    )
    for case in cases:
        added = [f"{key}={value}" for key, value in case.labels.items() if key not in known]
        verdict = "allowed" if case.decision.allowed else "refused"
        steps.add(
            f"with {', '.join(added) or none}: {verdict} by {service}: {case.decision.reason}",
            case.decision.rule,
        )
        for audited in case.decision.audited:
            steps.add("audited", audited)
    steps.add(decision.reason, decision.rule)


def _selector(policy: AuthorizationPolicy) -> Mapping[str, str]:
    selector = policy.spec.selector
    return selector.match_labels if selector is not None else {}


def _shared(label_sets: list[Mapping[str, str]]) -> dict[str, str]:
    """The labels every one of ``label_sets`` has, with the same value."""
    if not label_sets:
        return {}
    first, *others = label_sets
    return {
        key: value
        for key, value in first.items()
        if all(other.get(key) == value for other in others)
    }


def _answered(
    proxy: GatewayProxy,
    request: HttpRequest,
    response: DirectResponse,
    steps: _Steps,
    caller: str | None,
) -> Explanation:
    steps.add(f"answered {response.status}: {response.reason}", response.source)
    return _explanation(proxy, request, "not-found", False, response.status, steps, caller)


def _explanation(
    proxy: SidecarProxy | GatewayProxy,
    request: HttpRequest,
    outcome: Outcome,
    allowed: bool,
    status: int | None,
    steps: _Steps,
    caller: str | None = None,
    *,
    route: Route | None = None,
    matched: RequestMatch | None = None,
    destinations: tuple[DestinationOutcome, ...] = (),
    gateway_decision: Decision | None = None,
) -> Explanation:
    if isinstance(proxy, SidecarProxy):
        caller = proxy.spiffe_id
    return Explanation(
        proxy=str(proxy),
        caller=caller,
        request=request,
        outcome=outcome,
        allowed=allowed,
        status=status,
        route=route,
        matched=matched,
        destinations=destinations,
        gateway_decision=gateway_decision,
        steps=tuple(steps.items),
    )


def _common_labels(catalog: Catalog, spiffe_id: str) -> dict[str, str]:
    return _shared([instance.labels for instance in catalog.of_workload(spiffe_id)])


def _service_of(config: Config, catalog: Catalog, spiffe_id: str) -> str:
    """The Service the caller serves: from its instances, else the Service naming its ID."""
    for instance in catalog.of_workload(spiffe_id):
        return instance.service
    for service in config.of_kind(Service):
        if spiffe_id in service.spec.spiffe_ids:
            return service.name
    return ""
