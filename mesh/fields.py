"""The building blocks of the resource models: the base model and the field types.

Every model is frozen, refuses a field it does not declare (``extra="forbid"``: an Istio
field outside Tessera's subset and a misspelt one alike), and reads Istio's camelCase
names. Scalars are strict: ``number: "80"`` is a string where a number belongs, as
Kubernetes would say, not 80. Lists are tuples, so a parsed resource cannot change.

Each field type below is a plain type plus the check that makes it valid, so a model
reads as its Istio reference page does::

    class Destination(Model):
        host: DestinationHost
        subset: DnsLabel | None = None
        port: PortSelector | None = None
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from annotated_types import MaxLen
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Strict
from pydantic.alias_generators import to_camel

from mesh import durations, hosts, httpsyntax, names, principals, regex
from mesh.errors import describe

__all__ = [
    "MAX_INT32",
    "Authority",
    "Count",
    "DestinationHost",
    "DnsLabel",
    "DnsSubdomain",
    "Duration",
    "FilePath",
    "Flag",
    "GatewayHost",
    "GatewayReference",
    "HeaderName",
    "HeaderValue",
    "HttpStatus",
    "LabelKey",
    "LabelValue",
    "Labels",
    "Method",
    "Model",
    "NonNegativeCount",
    "Path",
    "PathPattern",
    "Percentage",
    "PortNumber",
    "Principal",
    "Regex",
    "RetryAttempts",
    "RetryOn",
    "RouteHost",
    "SpiffeId",
    "Text",
    "Weight",
    "nonempty",
    "unique",
]

MAX_INT32 = 2**31 - 1
MAX_TEXT_LENGTH = 4096


class Model(BaseModel):
    """Base of every resource part: frozen, camelCase, no field outside the model.

    Each model's validator is built on its first use, not when its class is defined
    (``defer_build``): a server or agent that holds no mesh resource never builds them,
    which saves about 60 ms of its start."""

    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        alias_generator=to_camel,  # and only the alias is read: spec.http[0].perTryTimeout
        defer_build=True,
    )


def _check(check: Callable[[str], None]) -> AfterValidator:
    def validate(value: str) -> str:
        check(value)
        return value

    return AfterValidator(validate)


def _check_text(value: str) -> None:
    if not value:
        raise ValueError("must not be empty")
    if len(value) > MAX_TEXT_LENGTH:
        raise ValueError(f"must be at most {MAX_TEXT_LENGTH} characters")


def _check_file_path(value: str) -> None:
    if not value.startswith("/") or "\0" in value or len(value) > MAX_TEXT_LENGTH:
        raise ValueError(
            "must be an absolute file path (the process serving it reads the file where "
            "it runs), e.g. /etc/tessera/gateway/cert.pem"
        )


def _in_range(low: int | float, high: int | float, what: str) -> AfterValidator:
    def validate(value: Any) -> Any:
        if not low <= value <= high:
            shown = f"{value:g}" if isinstance(value, float) else str(value)
            raise ValueError(f"must be {what} from {low} to {high}, got {shown}")
        return value

    return AfterValidator(validate)


def _check_unique(values: tuple[Any, ...]) -> tuple[Any, ...]:
    seen: set[Any] = set()
    for value in values:
        if value in seen:
            raise ValueError(f"has {value!r} twice")
        seen.add(value)
    return values


unique = AfterValidator(_check_unique)
"""A list whose items must differ (hashable items: strings, numbers)."""


def _check_nonempty(values: Any) -> Any:
    if not values:
        raise ValueError("must not be empty")
    return values


nonempty = AfterValidator(_check_nonempty)
"""A list or mapping with at least one item. (Not ``MinLen(1)``: on a tuple whose items
have errors, pydantic would also call the tuple too short.)"""


def _expect(what: str) -> BeforeValidator:
    """Refuse a value of the wrong YAML type saying what belongs there (``a duration``)."""

    def validate(value: Any) -> Any:
        if not isinstance(value, str):
            raise ValueError(f"must be {what}, not {describe(value)}")
        return value

    return BeforeValidator(validate)


Text = Annotated[str, Strict(), _check(_check_text)]
"""A non-empty string of at most 4096 characters."""

Flag = Annotated[bool, Strict()]
FilePath = Annotated[str, Strict(), _check(_check_file_path)]
DnsLabel = Annotated[str, Strict(), _check(names.check_dns_label)]
DnsSubdomain = Annotated[str, Strict(), _check(names.check_dns_subdomain)]
LabelKey = Annotated[str, Strict(), _check(names.check_label_key)]
LabelValue = Annotated[str, Strict(), _check(names.check_label_value)]
Labels = Annotated[dict[LabelKey, LabelValue], MaxLen(64)]
"""Labels (of a subset, a selector): Kubernetes label keys and values."""

PortNumber = Annotated[int, Strict(), _in_range(1, 65535, "a port number")]
Weight = Annotated[int, Strict(), _in_range(0, 100, "a weight")]
Percentage = Annotated[float, Strict(), _in_range(0, 100, "a percentage")]
Count = Annotated[int, Strict(), _in_range(1, MAX_INT32, "a count")]
HttpStatus = Annotated[int, Strict(), _in_range(200, 599, "an HTTP status")]
RetryAttempts = Annotated[int, Strict(), _in_range(0, 10, "a number of attempts")]
"""At most 10: each attempt is another request to a service that is already failing."""
NonNegativeCount = Annotated[int, Strict(), _in_range(0, MAX_INT32, "a count")]
Duration = Annotated[
    str, _expect("a duration such as 2s, 100ms or 1m"), _check(durations.check_duration)
]
"""Istio's ``2s``, ``100ms``, ``1.5s``, ``1m``; :func:`mesh.durations.parse_duration`."""

Regex = Annotated[str, Strict(), _check(regex.check_regex)]
HeaderName = Annotated[str, Strict(), _check(httpsyntax.check_header_name)]
HeaderValue = Annotated[str, Strict(), _check(httpsyntax.check_header_value)]
Method = Annotated[str, Strict(), _check(httpsyntax.check_method)]
Path = Annotated[str, Strict(), _check(_check_text), _check(httpsyntax.check_path)]
PathPattern = Annotated[str, Strict(), _check(_check_text), _check(httpsyntax.check_path_pattern)]
RetryOn = Annotated[str, Strict(), _check(httpsyntax.check_retry_on)]

RouteHost = Annotated[str, Strict(), _check(hosts.check_route_host)]
GatewayHost = Annotated[str, Strict(), _check(hosts.check_gateway_host)]
DestinationHost = Annotated[str, Strict(), _check(hosts.check_destination_host)]
GatewayReference = Annotated[str, Strict(), _check(hosts.check_gateway_reference)]
Authority = Annotated[str, Strict(), _check(hosts.check_authority)]

SpiffeId = Annotated[str, Strict(), _check(principals.check_spiffe_id)]
"""An exact SPIFFE ID of a workload, parsed as the SDK parses it."""
Principal = Annotated[str, Strict(), _check(principals.check_principal)]
"""A SPIFFE ID, a prefix ``spiffe://td/path/*`` or ``*`` (:mod:`mesh.principals`)."""
