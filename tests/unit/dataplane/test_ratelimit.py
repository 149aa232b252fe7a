"""The built-in sidecar's RateLimits: token buckets per rule and caller, judged after
authorization (the clock is moved, never waited for)."""

from __future__ import annotations

import pytest
from spiffe import SpiffeId

from dataplane.authorization import MeshJudge
from dataplane.ratelimit import RateLimiter, TokenBucket
from mesh import Config, parse_documents
from mesh.compile import compile_authorization, compile_rate_limits
from mesh.view import RateLimitRule, Source

WEB = "spiffe://example.org/web"
REPORTS = "spiffe://example.org/reports"
INTRUDER = "spiffe://example.org/intruder"


class Clock:
    def __init__(self) -> None:
        self.now = 500.0

    def __call__(self) -> float:
        return self.now


def rule(name: str, callers: tuple[str, ...] | None, rate: int, burst: int) -> RateLimitRule:
    return RateLimitRule(name, callers, rate, burst, Source("RateLimit", name, "spec"))


def allowed(limiter: RateLimiter, caller: str, times: int) -> list[bool]:
    return [limiter.check(caller) is None for _ in range(times)]


def test_a_bucket_starts_full_and_gets_its_tokens_each_whole_interval() -> None:
    clock = Clock()
    bucket = TokenBucket(5, 2, 1.0, clock)
    assert bucket.tokens() == 5
    for _ in range(5):
        bucket.take()
    assert bucket.tokens() == 0
    clock.now += 0.99
    assert bucket.tokens() == 0
    assert bucket.next_fill() == pytest.approx(0.01)
    clock.now += 0.01
    assert bucket.tokens() == 2
    clock.now += 10
    assert bucket.tokens() == 5  # never more than its capacity


def test_a_shared_limit_holds_back_the_callers_it_names_together() -> None:
    clock = Clock()
    limiter = RateLimiter(clock=clock)
    limiter.update([rule("web-and-reports", (WEB, REPORTS), 1, 3)])
    assert allowed(limiter, WEB, 2) == [True, True]
    assert allowed(limiter, REPORTS, 2) == [True, False]  # one bucket for both
    assert allowed(limiter, INTRUDER, 5) == [True] * 5  # not named: not limited
    clock.now += 1
    assert allowed(limiter, WEB, 2) == [True, False]


def test_a_limit_without_callers_keeps_a_bucket_per_caller() -> None:
    clock = Clock()
    limiter = RateLimiter(clock=clock)
    limiter.update([rule("each", None, 2, 2)])
    assert allowed(limiter, WEB, 3) == [True, True, False]
    assert allowed(limiter, REPORTS, 3) == [True, True, False]
    clock.now += 1.5
    assert allowed(limiter, WEB, 3) == [True, True, False]


def test_the_limited_request_is_told_which_limit_and_when_to_try_again() -> None:
    clock = Clock()
    limiter = RateLimiter(clock=clock)
    limiter.update([rule("web-to-users", (WEB,), 1, 1)])
    limiter.check(WEB)
    clock.now += 0.25
    limited = limiter.check(WEB)
    assert limited is not None
    assert (limited.rule.name, limited.caller) == ("web-to-users", WEB)
    assert limited.reason == (
        "too many requests: RateLimit web-to-users allows 1 request a second in bursts of 1 "
        "(one bucket shared by the callers it names); try again in 0.8s"
    )
    assert limiter.limited_totals() == {"web-to-users": 1}


def test_a_request_takes_a_token_from_every_limit_or_from_none() -> None:
    clock = Clock()
    limiter = RateLimiter(clock=clock)
    limiter.update([rule("generous", None, 1, 10), rule("strict", (WEB,), 1, 2)])
    assert allowed(limiter, WEB, 3) == [True, True, False]
    # The limited request took no token from "generous": 8 left there for web.
    limiter.update([rule("generous", None, 1, 10)])
    assert allowed(limiter, WEB, 9) == [True] * 8 + [False]


def test_buckets_live_through_a_revision_that_keeps_the_rule_and_not_one_that_changes_it() -> None:
    clock = Clock()
    limiter = RateLimiter(clock=clock)
    limiter.update([rule("each", None, 1, 2), rule("other", (REPORTS,), 1, 1)])
    assert allowed(limiter, WEB, 2) == [True, True]
    limiter.update([rule("other", (REPORTS,), 1, 1), rule("each", None, 1, 2)])
    assert allowed(limiter, WEB, 1) == [False]  # the same bucket, still empty
    limiter.update([rule("each", None, 1, 3)])
    assert allowed(limiter, WEB, 4) == [True, True, True, False]  # changed: full again
    limiter.update([])
    assert allowed(limiter, WEB, 10) == [True] * 10


def test_only_the_most_recent_callers_keep_their_buckets() -> None:
    limiter = RateLimiter(clock=Clock(), max_callers=2)
    limiter.update([rule("each", None, 1, 1)])
    callers = [f"spiffe://example.org/caller-{n}" for n in range(3)]
    for caller in callers:
        assert limiter.check(caller) is None
    assert limiter.check(callers[2]) is not None  # still remembered: empty
    assert limiter.check(callers[0]) is None  # forgotten: a full bucket again
    with pytest.raises(ValueError, match="max_callers must be at least 1, not 0"):
        RateLimiter(max_callers=0)


MESH = f"""\
apiVersion: tessera.io/v1alpha1
kind: Service
metadata: {{name: users-service}}
spec:
  spiffeIds: [spiffe://example.org/users]
  ports: [{{number: 80, name: http, protocol: HTTP}}]
---
apiVersion: tessera.io/v1alpha1
kind: Service
metadata: {{name: orders-service}}
spec:
  spiffeIds: [spiffe://example.org/orders]
  ports: [{{number: 80, name: http, protocol: HTTP}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: users-allow}}
spec:
  selector: {{matchLabels: {{app: users}}}}
  rules:
  - from: [{{source: {{principals: ["{WEB}", "{REPORTS}"]}}}}]
---
apiVersion: tessera.io/v1alpha1
kind: RateLimit
metadata: {{name: web-to-users}}
spec:
  service: users-service
  from: {{principals: ["{WEB}", "{INTRUDER}"]}}
  requestsPerSecond: 1
  burst: 2
---
apiVersion: tessera.io/v1alpha1
kind: RateLimit
metadata: {{name: elsewhere}}
spec:
  service: orders-service
  requestsPerSecond: 1
"""


def test_the_mesh_judge_answers_429_after_authorization_and_a_refused_caller_takes_no_token() -> (
    None
):
    config, _ = Config().apply(parse_documents(MESH))
    clock = Clock()
    limiter = RateLimiter(clock=clock)
    limiter.update(compile_rate_limits(config, "users-service"))
    assert [limit.name for limit in limiter.rules] == ["web-to-users"]
    judge = MeshJudge(compile_authorization(config, {"app": "users"}), revision=3,
                      rate_limits=limiter)  # fmt: skip
    web, intruder, reports = SpiffeId(WEB), SpiffeId(INTRUDER), SpiffeId(REPORTS)

    # The handshake's judgement takes no token; the intruder is refused (403) before
    # the RateLimit naming it is asked.
    assert judge.at_handshake().decide(web).allowed
    for _ in range(3):
        refused = judge.decide(intruder, "GET", "/api")
        assert (refused.allowed, refused.status) == (False, 403)
    assert limiter.limited_totals() == {"web-to-users": 0}

    first, second, third = (judge.decide(web, "GET", "/api") for _ in range(3))
    assert first.allowed and second.allowed
    assert (third.allowed, third.status, third.headers) == (
        False, 429, (("x-envoy-ratelimited", "true"),))  # fmt: skip
    assert third.rule == "RateLimit web-to-users spec"
    assert third.reason.startswith("too many requests: RateLimit web-to-users allows 1 request")
    assert all(judge.decide(reports, "GET", "/api").allowed for _ in range(5))  # not named
    clock.now += 1
    assert judge.decide(web, "GET", "/api").allowed
