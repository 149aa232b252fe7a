"""``RateLimit`` (tessera.io): how many requests per second callers may send a Service.

Istio has no field for it. Fields:

- spec.service: the Service's name
- spec.from.principals: the callers (SPIFFE IDs, exact, a prefix ending in ``/*``, or
  ``*``) who share one bucket; left out, each caller gets a bucket of its own
- spec.requestsPerSecond: how many requests per second the bucket refills
- spec.burst: how many it holds (a burst above the rate); left out, one second's worth

Example::

    apiVersion: tessera.io/v1alpha1
    kind: RateLimit
    metadata: {name: orders-to-users}
    spec:
      service: users-service
      from: {principals: [spiffe://example.org/orders]}
      requestsPerSecond: 50
      burst: 100

The limit is kept by the Service's sidecars, each for the requests it receives.
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import AfterValidator, Field, Strict

from mesh.fields import DnsLabel, Model, Principal, nonempty, unique
from mesh.resources.base import Resource

__all__ = [
    "MAX_REQUESTS_PER_SECOND",
    "RateLimit",
    "RateLimitFrom",
    "RateLimitSpec",
]

MAX_REQUESTS_PER_SECOND = 1_000_000


def _check_rate(value: int) -> int:
    if not 1 <= value <= MAX_REQUESTS_PER_SECOND:
        raise ValueError(f"must be from 1 to {MAX_REQUESTS_PER_SECOND:,}, got {value}")
    return value


Rate = Annotated[int, Strict(), AfterValidator(_check_rate)]


class RateLimitFrom(Model):
    principals: Annotated[tuple[Principal, ...], nonempty, unique]


class RateLimitSpec(Model):
    service: DnsLabel
    from_: RateLimitFrom | None = Field(default=None, alias="from")
    requests_per_second: Rate
    burst: Rate | None = None

    @property
    def bucket_size(self) -> int:
        """``burst``, or one second's worth of requests when it is left out."""
        return self.burst if self.burst is not None else self.requests_per_second


class RateLimit(Resource):
    """A token bucket for the calls to one Service, per caller or shared by some."""

    GROUP: ClassVar[str] = "tessera.io"
    VERSIONS: ClassVar[tuple[str, ...]] = ("v1alpha1",)
    KIND: ClassVar[str] = "RateLimit"

    kind: Literal["RateLimit"]
    spec: RateLimitSpec
