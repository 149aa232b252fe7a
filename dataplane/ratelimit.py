"""The RateLimits a built-in sidecar keeps for its callers: token buckets on its inbound.

Each :class:`~mesh.view.RateLimitRule` of the sidecar's Service (compiled by
:func:`mesh.compile.compile_rate_limits`) is a token bucket, as Envoy's local rate
limit filter keeps it (:func:`mesh.envoy.policies.rate_limit_filter`): it holds
``burst`` tokens and starts full; every whole second since it was made adds
``requests_per_second`` tokens, never more than ``burst``; a request takes one. A rule
naming callers (``from.principals``) has one bucket its callers share; a rule naming
none has one bucket per caller, keyed on its SPIFFE ID, the :data:`MAX_CALLERS` most
recently seen kept (Envoy's ``max_dynamic_descriptors``: a caller forgotten comes back
to a full bucket)::

    limiter = RateLimiter(clock=time.monotonic)
    limiter.update(compile_rate_limits(config, "users-service"))   # each mesh revision
    limited = limiter.check("spiffe://example.org/web")            # None: go on
    if limited is not None:
        answer 429 with limited.reason and RATE_LIMITED_HEADERS

A request counts against every rule that applies to its caller
(:meth:`mesh.view.Inbound.rate_limits_for`) and is let through only if each of their
buckets has a token; then it takes one from each. A limited request takes none (so a
caller held back by one rule does not drain another's bucket); Envoy does not promise
either way. The sidecar judges authorization first: a refused caller takes no token.

A rule that a new mesh revision leaves as it was keeps its buckets (and what they
hold); a rule that changed (its rate, burst or callers) starts with full ones, as
Envoy's new filter would.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Final

from mesh.view import RateLimitRule

__all__ = [
    "FILL_INTERVAL",
    "MAX_CALLERS",
    "RATE_LIMITED_HEADERS",
    "RATE_LIMITED_STATUS",
    "Limited",
    "RateLimiter",
    "TokenBucket",
]

FILL_INTERVAL: Final = 1.0
"""Seconds between two fills of a bucket (``requestsPerSecond`` tokens each)."""

MAX_CALLERS: Final = 1024
"""Per-caller buckets kept per RateLimit (as Envoy's ``max_dynamic_descriptors``)."""

RATE_LIMITED_STATUS: Final = 429

RATE_LIMITED_HEADERS: Final = (("x-envoy-ratelimited", "true"),)
"""What Envoy's local rate limit filter adds to its 429 (Tessera asks for no
``x-ratelimit-*`` headers), so a client reads the built-in sidecar's 429 the same way."""


class TokenBucket:
    """``capacity`` tokens at most, ``per_fill`` more each ``interval`` seconds since it was
    made (whole intervals: Envoy's fill timer); starts full."""

    def __init__(
        self, capacity: int, per_fill: int, interval: float, clock: Callable[[], float]
    ) -> None:
        self.capacity = capacity
        self.per_fill = per_fill
        self.interval = interval
        self._clock = clock
        self._tokens = capacity
        self._filled_at = clock()

    def tokens(self) -> int:
        """The tokens it holds now."""
        now = self._clock()
        fills = int((now - self._filled_at) // self.interval)
        if fills > 0:
            self._tokens = min(self.capacity, self._tokens + fills * self.per_fill)
            self._filled_at += fills * self.interval
        return self._tokens

    def take(self) -> None:
        """Take one token (check :meth:`tokens` first)."""
        self._tokens -= 1

    def next_fill(self) -> float:
        """Seconds until the next tokens come."""
        return max(0.0, self._filled_at + self.interval - self._clock())


@dataclass(frozen=True)
class Limited:
    """A request held back by ``rule``: its caller has no token left there."""

    rule: RateLimitRule
    caller: str | None
    retry_after: float
    """Seconds until its bucket gets tokens again."""

    @property
    def reason(self) -> str:
        """One sentence for the 429's body (after the caller and the rule)."""
        rule = self.rule
        plural = "" if rule.requests_per_second == 1 else "s"
        kept = ("one bucket per caller" if rule.keyed_on == "caller"
                else "one bucket shared by the callers it names")  # fmt: skip
        return (
            f"too many requests: RateLimit {rule.name} allows "
            f"{rule.requests_per_second} request{plural} a second in bursts of {rule.burst} "
            f"({kept}); try again in {self.retry_after:.1f}s"
        )


@dataclass
class _Rule:
    rule: RateLimitRule
    buckets: OrderedDict[str, TokenBucket]
    limited: int = 0


def _same_limit(first: RateLimitRule, second: RateLimitRule) -> bool:
    return (first.callers, first.requests_per_second, first.burst) == (
        second.callers, second.requests_per_second, second.burst
    )  # fmt: skip


class RateLimiter:
    """The buckets of every RateLimit of one sidecar's Service, across mesh revisions."""

    def __init__(
        self, *, clock: Callable[[], float] = time.monotonic, max_callers: int = MAX_CALLERS
    ) -> None:
        if max_callers < 1:
            raise ValueError(f"max_callers must be at least 1, not {max_callers}")
        self._clock = clock
        self._max_callers = max_callers
        self._rules: dict[str, _Rule] = {}

    @property
    def rules(self) -> tuple[RateLimitRule, ...]:
        return tuple(kept.rule for kept in self._rules.values())

    def update(self, rules: Iterable[RateLimitRule]) -> None:
        """The RateLimits of a new mesh revision; an unchanged one keeps its buckets."""
        kept: dict[str, _Rule] = {}
        for rule in rules:
            old = self._rules.get(rule.name)
            if old is not None and _same_limit(old.rule, rule):
                kept[rule.name] = _Rule(rule, old.buckets, old.limited)
            else:
                kept[rule.name] = _Rule(rule, OrderedDict(), old.limited if old else 0)
        self._rules = kept

    def check(self, caller: str | None) -> Limited | None:
        """Take a token for a request of ``caller`` from every bucket that applies, or,
        when one of them is empty, take none and say which (the first in order)."""
        applying = [
            (kept, self._bucket(kept, caller))
            for kept in self._rules.values()
            if kept.rule.applies_to(caller)
        ]
        for kept, bucket in applying:
            if bucket.tokens() < 1:
                kept.limited += 1
                return Limited(kept.rule, caller, bucket.next_fill())
        for _, bucket in applying:
            bucket.take()
        return None

    def _bucket(self, kept: _Rule, caller: str | None) -> TokenBucket:
        key = kept.rule.bucket(caller)
        bucket = kept.buckets.get(key)
        if bucket is None:
            rule = kept.rule
            bucket = TokenBucket(rule.burst, rule.requests_per_second, FILL_INTERVAL, self._clock)
            kept.buckets[key] = bucket
            while len(kept.buckets) > self._max_callers:
                kept.buckets.popitem(last=False)
        else:
            kept.buckets.move_to_end(key)
        return bucket

    def limited_totals(self) -> Mapping[str, int]:
        """Per RateLimit name, the requests it held back (for ``/metrics``)."""
        return {name: kept.limited for name, kept in sorted(self._rules.items())}
