"""``VirtualService`` (networking.istio.io): how requests for some hosts are routed.

Tessera's subset of Istio's fields, by type (everything else is refused by name):

- spec: ``hosts``, ``gateways``, ``http``
- http[]: ``name``, ``match``, ``route``, ``redirect``, ``rewrite``, ``timeout``,
  ``retries``, ``fault``, ``mirror``, ``mirrorPercentage``, ``headers``
- match[]: ``name``, ``uri``, ``method``, ``headers``, ``queryParams``, ``sourceLabels``
- route[]: ``destination`` (``host``, ``subset``, ``port.number``), ``weight``,
  ``headers``

Example::

    apiVersion: networking.istio.io/v1
    kind: VirtualService
    metadata: {name: reviews}
    spec:
      hosts: [reviews]
      http:
      - match: [{uri: {prefix: /v2/}}]
        route:
        - destination: {host: reviews, subset: v2}
          weight: 90
        - destination: {host: reviews, subset: v1}
          weight: 10

Within one route the weights add up to 100; a single destination without a weight
takes every request. A ``regex`` is RE2's and matches the whole value
(:mod:`mesh.regex`). Whether the hosts, gateways and subsets exist is checked over the
whole configuration (:mod:`mesh.references`).
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal, Self

from pydantic import AfterValidator, BeforeValidator, Strict, model_validator

from mesh.fields import (
    Authority,
    DestinationHost,
    DnsLabel,
    Duration,
    GatewayReference,
    HeaderName,
    HeaderValue,
    HttpStatus,
    Labels,
    Method,
    Model,
    Path,
    Percentage,
    PortNumber,
    Regex,
    RetryAttempts,
    RetryOn,
    RouteHost,
    Text,
    Weight,
    nonempty,
    unique,
)
from mesh.hosts import MESH_GATEWAY, gateway_name
from mesh.resources.base import Resource

__all__ = [
    "Destination",
    "FaultAbort",
    "FaultDelay",
    "HTTPFaultInjection",
    "HTTPMatchRequest",
    "HTTPRedirect",
    "HTTPRetry",
    "HTTPRewrite",
    "HTTPRoute",
    "HTTPRouteDestination",
    "HeaderOperations",
    "Headers",
    "MethodMatch",
    "Percent",
    "PortSelector",
    "QueryParamMatch",
    "StringMatch",
    "UriMatch",
    "VirtualService",
    "VirtualServiceSpec",
]


def _set_fields(model: Model, names: tuple[str, ...]) -> list[str]:
    return [name for name in names if getattr(model, name) is not None]


def _aliases(model: type[Model], names: list[str]) -> list[str]:
    return [model.model_fields[name].alias or name for name in names]


def _one_of(names: list[str]) -> str:
    return ", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else names[0]


class StringMatch(Model):
    """Istio's ``StringMatch``: at most one of ``exact``, ``prefix``, ``regex``.

    In a ``headers`` match, none of them (``x-debug: {}``) matches any request that has
    the header.
    """

    exact: HeaderValue | None = None
    prefix: HeaderValue | None = None
    regex: Regex | None = None

    REQUIRED: ClassVar[bool] = False

    @model_validator(mode="after")
    def _check_one(self) -> Self:
        chosen = _set_fields(self, ("exact", "prefix", "regex"))
        if len(chosen) > 1:
            raise ValueError(
                f"must set only one of exact, prefix and regex, not {' and '.join(chosen)}"
            )
        if self.REQUIRED and not chosen:
            raise ValueError("must set one of exact, prefix or regex")
        return self


class UriMatch(StringMatch):
    exact: Path | None = None
    prefix: Path | None = None
    REQUIRED: ClassVar[bool] = True


class MethodMatch(StringMatch):
    exact: Method | None = None
    prefix: Text | None = None
    REQUIRED: ClassVar[bool] = True


class QueryParamMatch(StringMatch):
    exact: Text | None = None
    prefix: Text | None = None
    REQUIRED: ClassVar[bool] = True


class HTTPMatchRequest(Model):
    """One condition set; a request matches when every condition given holds."""

    name: Text | None = None
    uri: UriMatch | None = None
    method: MethodMatch | None = None
    headers: dict[HeaderName, StringMatch] | None = None
    query_params: dict[Annotated[str, Strict(), nonempty], QueryParamMatch] | None = None
    source_labels: Labels | None = None

    _CONDITIONS: ClassVar[tuple[str, ...]] = (
        "uri",
        "method",
        "headers",
        "query_params",
        "source_labels",
    )

    @model_validator(mode="after")
    def _check_not_empty(self) -> Self:
        if not any(getattr(self, name) for name in self._CONDITIONS):
            raise ValueError(
                "must set at least one of uri, method, headers, queryParams or sourceLabels "
                "(a route without match takes every request)"
            )
        return self


class PortSelector(Model):
    number: PortNumber


def _port_as_mapping(value: object) -> object:
    if isinstance(value, int) and not isinstance(value, bool):
        raise ValueError(f"must be a mapping: write port: {{number: {value}}}, as Istio does")
    return value


class Destination(Model):
    """A Service (``host``), optionally a subset of its instances and one of its ports.

    ``port`` may be left out when the Service has one port.
    """

    host: DestinationHost
    subset: DnsLabel | None = None
    port: Annotated[PortSelector, BeforeValidator(_port_as_mapping)] | None = None


class HeaderOperations(Model):
    set: dict[HeaderName, HeaderValue] | None = None
    add: dict[HeaderName, HeaderValue] | None = None
    remove: Annotated[tuple[HeaderName, ...], unique] | None = None


class Headers(Model):
    """Headers to set, add or remove on the request (to the destination) and response."""

    request: HeaderOperations | None = None
    response: HeaderOperations | None = None


class HTTPRouteDestination(Model):
    destination: Destination
    weight: Weight | None = None
    headers: Headers | None = None


class HTTPRedirect(Model):
    uri: Path | None = None
    authority: Authority | None = None
    port: PortNumber | None = None
    scheme: Literal["http", "https"] | None = None
    redirect_code: Literal[301, 302, 303, 307, 308] | None = None

    @model_validator(mode="after")
    def _check_target(self) -> Self:
        if not _set_fields(self, ("uri", "authority", "port", "scheme")):
            raise ValueError("must set at least one of uri, authority, port or scheme")
        return self


class HTTPRewrite(Model):
    uri: Path | None = None
    authority: Authority | None = None

    @model_validator(mode="after")
    def _check_target(self) -> Self:
        if not _set_fields(self, ("uri", "authority")):
            raise ValueError("must set uri, authority or both")
        return self


class HTTPRetry(Model):
    attempts: RetryAttempts
    per_try_timeout: Duration | None = None
    retry_on: RetryOn | None = None


class Percent(Model):
    value: Percentage


class FaultDelay(Model):
    fixed_delay: Duration
    percentage: Percent | None = None


class FaultAbort(Model):
    http_status: HttpStatus
    percentage: Percent | None = None


class HTTPFaultInjection(Model):
    delay: FaultDelay | None = None
    abort: FaultAbort | None = None

    @model_validator(mode="after")
    def _check_one(self) -> Self:
        if self.delay is None and self.abort is None:
            raise ValueError("must set delay, abort or both")
        return self


def _check_weights(route: tuple[HTTPRouteDestination, ...]) -> tuple[HTTPRouteDestination, ...]:
    if len(route) == 1 and route[0].weight is None:
        return route
    total = sum(destination.weight or 0 for destination in route)
    if total != 100:
        raise ValueError(
            f"must have weights that add up to 100, not {total} (with several "
            "destinations, one without a weight counts as 0)"
        )
    return route


class HTTPRoute(Model):
    """One rule: where requests that match go (``route``) or are sent back (``redirect``)."""

    name: Text | None = None
    match: Annotated[tuple[HTTPMatchRequest, ...], nonempty] | None = None
    route: (
        Annotated[tuple[HTTPRouteDestination, ...], nonempty, AfterValidator(_check_weights)] | None
    ) = None
    redirect: HTTPRedirect | None = None
    rewrite: HTTPRewrite | None = None
    timeout: Duration | None = None
    retries: HTTPRetry | None = None
    fault: HTTPFaultInjection | None = None
    mirror: Destination | None = None
    mirror_percentage: Percent | None = None
    headers: Headers | None = None

    @model_validator(mode="after")
    def _check_action(self) -> Self:
        if self.route is None and self.redirect is None:
            raise ValueError("must have a route or a redirect")
        if self.redirect is not None:
            extra = _set_fields(self, ("route", "rewrite", "mirror", "retries", "timeout"))
            if extra:
                raise ValueError(
                    f"cannot have {_one_of(_aliases(HTTPRoute, extra))} with a redirect "
                    "(a redirect answers the request itself)"
                )
        if self.mirror_percentage is not None and self.mirror is None:
            raise ValueError("cannot have mirrorPercentage without a mirror")
        return self


class VirtualServiceSpec(Model):
    hosts: Annotated[tuple[RouteHost, ...], nonempty, unique]
    gateways: Annotated[tuple[GatewayReference, ...], unique] | None = None
    http: Annotated[tuple[HTTPRoute, ...], nonempty]


class VirtualService(Resource):
    """Routes for ``spec.hosts``, on the named gateways (``mesh``: the sidecars; the default)."""

    GROUP: ClassVar[str] = "networking.istio.io"
    VERSIONS: ClassVar[tuple[str, ...]] = ("v1", "v1beta1", "v1alpha3")
    KIND: ClassVar[str] = "VirtualService"

    kind: Literal["VirtualService"]
    spec: VirtualServiceSpec

    @property
    def gateway_names(self) -> tuple[str, ...]:
        """The gateways this applies to, namespace dropped; ``("mesh",)`` when none given."""
        if not self.spec.gateways:
            return (MESH_GATEWAY,)
        return tuple(dict.fromkeys(gateway_name(ref) for ref in self.spec.gateways))
