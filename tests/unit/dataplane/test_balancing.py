"""The built-in proxy's balancer: policies, outlier ejection, circuit breaker, retry budget."""

from __future__ import annotations

import random
from collections import Counter
from datetime import timedelta
from typing import Any

import pytest

from dataplane.balancing import Admission, Balancers, ClusterState
from mesh import defaults
from mesh.proxy import SidecarProxy
from mesh.view import (
    Authorization,
    Cluster,
    ClusterEndpoints,
    ConnectionPool,
    DefaultDecision,
    Endpoint,
    LoadBalancer,
    OutlierDetection,
    PeerIdentities,
    Source,
    View,
)
from sdk.address import HostPort

NAME = "outbound|8080||users-service"
RULE = Source("DestinationRule", "users", "spec.trafficPolicy.connectionPool")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def endpoint(n: int) -> Endpoint:
    address = HostPort("10.0.0.1", 8000 + n)
    return Endpoint(address, "node", "spiffe://example.org/users", {}, "healthy",
                    Source("catalog", "users-service", str(address)))  # fmt: skip


def pool(**limits: Any) -> ConnectionPool:
    settings: dict[str, Any] = {
        "max_connections": None, "connect_timeout": timedelta(seconds=10),
        "http1_max_pending_requests": None, "http2_max_requests": None,
        "max_requests_per_connection": None, "max_retries": None,
        "idle_timeout": timedelta(hours=1), "defaulted": (), "source": RULE,
    }  # fmt: skip
    settings.update(limits)
    return ConnectionPool(**settings)


def outlier(**settings: Any) -> OutlierDetection:
    values: dict[str, Any] = {
        "consecutive_5xx_errors": None, "consecutive_gateway_errors": None,
        "interval": timedelta(seconds=10), "base_ejection_time": timedelta(seconds=30),
        "max_ejection_percent": 100, "defaulted": (),
        "source": Source("DestinationRule", "users", "spec.trafficPolicy.outlierDetection"),
    }  # fmt: skip
    values.update(settings)
    return OutlierDetection(**values)


def cluster(
    policy: str = "ROUND_ROBIN",
    *,
    connection_pool: ConnectionPool | None = None,
    outlier_detection: OutlierDetection | None = None,
) -> Cluster:
    return Cluster(
        NAME, "users-service", 8080, "HTTP", None,
        LoadBalancer(policy, None, False, Source("DestinationRule", "users")),  # type: ignore[arg-type]
        connection_pool or pool(), outlier_detection,
        PeerIdentities(("spiffe://example.org/users",), Source("Service", "users-service")),
        Source("Service", "users-service"),
    )  # fmt: skip


def members(*endpoints: Endpoint) -> ClusterEndpoints:
    return ClusterEndpoints(NAME, {}, endpoints, (), Source("Service", "users-service"))


def state(
    n: int = 3, policy: str = "ROUND_ROBIN", *, clock: Clock | None = None, seed: int = 7,
    **settings: Any,
) -> ClusterState:  # fmt: skip
    return ClusterState(
        cluster(policy, **settings),
        members(*(endpoint(i) for i in range(n))),
        clock=clock or Clock(),
        rng=random.Random(seed),
    )


def ports(picked: list[Endpoint | None]) -> list[int]:
    return [e.address.port if e is not None else 0 for e in picked]


# -- policies ------------------------------------------------------------------------------


def test_round_robin_takes_each_endpoint_in_turn() -> None:
    balancer = state(3, "ROUND_ROBIN")
    assert ports([balancer.pick() for _ in range(6)]) == [8000, 8001, 8002] * 2


def test_random_spreads_requests_evenly() -> None:
    balancer = state(4, "RANDOM")
    counts = Counter(ports([balancer.pick() for _ in range(4000)]))
    assert set(counts) == {8000, 8001, 8002, 8003}
    assert all(850 <= count <= 1150 for count in counts.values()), counts


def test_least_request_spreads_evenly_when_equally_loaded() -> None:
    balancer = state(4, "LEAST_REQUEST")
    counts = Counter(ports([balancer.pick() for _ in range(4000)]))
    assert all(850 <= count <= 1150 for count in counts.values()), counts


def test_least_request_prefers_the_less_loaded_of_two_random_choices() -> None:
    balancer = state(2, "LEAST_REQUEST")
    busy = balancer.endpoints[0]
    for _ in range(5):
        balancer.begin(busy)
    # Two endpoints: both are drawn each time, and the idle one always wins.
    assert set(ports([balancer.pick() for _ in range(200)])) == {8001}
    for _ in range(5):
        balancer.end(busy, 200)
    assert set(ports([balancer.pick() for _ in range(200)])) == {8000, 8001}


def test_least_request_of_many_endpoints_avoids_the_busy_one_mostly() -> None:
    balancer = state(5, "LEAST_REQUEST")
    for _ in range(3):
        balancer.begin(balancer.endpoints[0])
    counts = Counter(ports([balancer.pick() for _ in range(5000)]))
    # The busy one wins no draw it is in: never picked. The others share evenly.
    assert counts[8000] == 0
    assert all(1100 <= counts[port] <= 1400 for port in (8001, 8002, 8003, 8004)), counts


def test_consistent_hash_keeps_a_key_on_its_endpoint() -> None:
    balancer = state(5, "CONSISTENT_HASH")
    for key in ("alice", "bob", "carol"):
        assert len({balancer.pick(hash_key=key) for _ in range(20)}) == 1
    spread = Counter(ports([balancer.pick(hash_key=f"user-{n}") for n in range(5000)]))
    assert all(800 <= count <= 1200 for count in spread.values()), spread


def test_consistent_hash_moves_few_keys_when_an_endpoint_comes_or_goes() -> None:
    keys = [f"user-{n}" for n in range(2000)]
    five = state(5, "CONSISTENT_HASH")
    before = {key: five.pick(hash_key=key) for key in keys}
    # Removing endpoint 2: only its keys move.
    five.update(five.cluster, members(*(endpoint(i) for i in (0, 1, 3, 4))))
    after = {key: five.pick(hash_key=key) for key in keys}
    moved = [key for key in keys if before[key] != after[key]]
    assert moved and all(before[key] == endpoint(2) for key in moved)
    # Adding a sixth: about 1/6 of the keys move, all of them to it.
    five.update(five.cluster, members(*(endpoint(i) for i in range(6))))
    grown = {key: five.pick(hash_key=key) for key in keys}
    moved = [key for key in keys if before[key] != grown[key]]
    assert all(grown[key] == endpoint(5) for key in moved)
    assert 250 <= len(moved) <= 420, len(moved)


def test_consistent_hash_without_a_key_is_random() -> None:
    balancer = state(3, "CONSISTENT_HASH")
    assert set(ports([balancer.pick() for _ in range(100)])) == {8000, 8001, 8002}


@pytest.mark.parametrize("policy", ["ROUND_ROBIN", "LEAST_REQUEST", "RANDOM", "CONSISTENT_HASH"])
def test_an_endpoint_tried_already_is_avoided_while_another_is_left(policy: str) -> None:
    balancer = state(3, policy)
    tried = {endpoint(0).address, endpoint(1).address}
    assert {balancer.pick(hash_key="k", tried=tried) for _ in range(30)} == {endpoint(2)}
    everything = tried | {endpoint(2).address}
    assert balancer.pick(hash_key="k", tried=everything) is not None  # all tried: any


def test_no_endpoint_picks_none() -> None:
    assert ClusterState(cluster(), None, clock=Clock()).pick() is None
    assert state(0).pick() is None


# -- outlier detection ------------------------------------------------------------------------


def test_consecutive_5xx_eject_then_the_endpoint_returns_after_the_ejection_time() -> None:
    clock = Clock()
    balancer = state(3, clock=clock, outlier_detection=outlier(consecutive_5xx_errors=3))
    bad = endpoint(0)
    for status in (500, 503, 200, 500, 500):  # the 200 ends the first run
        balancer.end(bad, status)
    assert balancer.ejected() == ()
    balancer.end(bad, None)  # a reset counts as a 5xx
    assert balancer.ejected() == ((bad, clock.now + 30),)
    assert bad not in {balancer.pick() for _ in range(30)}
    clock.advance(29.9)
    assert bad not in {balancer.pick() for _ in range(30)}
    clock.advance(0.1)
    assert bad in {balancer.pick() for _ in range(30)}
    assert balancer.stats().ejections_5xx_total == 1
    assert balancer.stats().ejected == 0


def test_gateway_errors_eject_while_an_apps_500s_do_not() -> None:
    balancer = state(3, outlier_detection=outlier(consecutive_gateway_errors=2))
    for status in (500, 500, 500, 502, 500, 504):  # a 500 ends a run of gateway errors
        balancer.end(endpoint(0), status)
    assert balancer.ejected() == ()
    balancer.end(endpoint(0), None)
    assert [ejected for ejected, _ in balancer.ejected()] == [endpoint(0)]
    assert balancer.stats().ejections_gateway_total == 1


def test_4xx_ends_a_run_of_errors() -> None:
    balancer = state(3, outlier_detection=outlier(consecutive_5xx_errors=2))
    for status in (503, 404, 503):
        balancer.end(endpoint(1), status)
    assert balancer.ejected() == ()


def test_without_outlier_detection_nothing_is_ejected() -> None:
    balancer = state(3)
    for _ in range(100):
        balancer.end(endpoint(0), None)
    assert balancer.ejected() == ()
    assert balancer.stats().ejections_total == 0


def test_each_ejection_lasts_longer_and_the_count_decays_while_back_in_service() -> None:
    clock = Clock()
    balancer = state(3, clock=clock, outlier_detection=outlier(consecutive_5xx_errors=1))
    bad = endpoint(0)

    def eject() -> float:
        balancer.end(bad, 500)
        ((_, until),) = balancer.ejected()
        clock.now = until  # back exactly when it ends
        balancer.pick()
        return until

    started = clock.now
    assert eject() - started == 30
    started = clock.now
    assert eject() - started == 60  # base_ejection_time x times ejected
    started = clock.now
    assert eject() - started == 90
    # Three ejections; 20 s (two intervals) back in service forget two of them.
    clock.advance(20)
    started = clock.now
    assert eject() - started == 60


def test_an_ejection_lasts_at_most_300s_unless_the_base_is_longer() -> None:
    clock = Clock()
    balancer = state(3, clock=clock, outlier_detection=outlier(
        consecutive_5xx_errors=1, base_ejection_time=timedelta(seconds=200)))  # fmt: skip
    balancer.end(endpoint(0), 500)
    ((_, until),) = balancer.ejected()
    clock.now = until
    balancer.end(endpoint(0), 500)
    ((_, until),) = balancer.ejected()
    assert until - clock.now == 300
    slow = state(3, clock=clock, outlier_detection=outlier(
        consecutive_5xx_errors=1, base_ejection_time=timedelta(minutes=10)))  # fmt: skip
    slow.end(endpoint(0), 500)
    assert [until - clock.now for _, until in slow.ejected()] == [600]


def test_max_ejection_percent_is_honoured() -> None:
    balancer = state(10, outlier_detection=outlier(consecutive_5xx_errors=1,
                                                   max_ejection_percent=30))  # fmt: skip
    for n in range(10):
        balancer.end(endpoint(n), 503)
    assert [ejected.address.port for ejected, _ in balancer.ejected()] == [8000, 8001, 8002]
    assert balancer.stats().ejections_overflow_total == 7
    assert len({balancer.pick() for _ in range(50)}) == 7


def test_one_endpoint_may_always_be_ejected_whatever_the_percentage() -> None:
    # Envoy's rule: "will eject at least one host regardless of the value".
    balancer = state(4, outlier_detection=outlier(consecutive_5xx_errors=1,
                                                  max_ejection_percent=10))  # fmt: skip
    balancer.end(endpoint(0), 503)
    balancer.end(endpoint(1), 503)
    assert [ejected for ejected, _ in balancer.ejected()] == [endpoint(0)]
    alone = state(1, outlier_detection=outlier(consecutive_5xx_errors=1,
                                               max_ejection_percent=50))  # fmt: skip
    alone.end(endpoint(0), None)
    assert alone.pick() is None  # its only endpoint ejected: nothing to pick


def test_a_refused_ejection_is_tried_again_at_the_next_error() -> None:
    clock = Clock()
    balancer = state(2, clock=clock, outlier_detection=outlier(consecutive_5xx_errors=2,
                                                               max_ejection_percent=50))
    balancer.end(endpoint(0), 503)
    balancer.end(endpoint(0), 503)
    balancer.end(endpoint(1), 503)
    balancer.end(endpoint(1), 503)  # refused: endpoint 0 is out
    assert [ejected for ejected, _ in balancer.ejected()] == [endpoint(0)]
    clock.advance(30)
    balancer.end(endpoint(1), 503)  # its run goes on: ejected now that there is room
    assert [ejected for ejected, _ in balancer.ejected()] == [endpoint(1)]


# -- state across views -----------------------------------------------------------------------


def view(*clusters: tuple[Cluster, ClusterEndpoints]) -> View:
    return View(
        SidecarProxy("web", "spiffe://example.org/web"), None,
        Authorization((), (), DefaultDecision("ALLOW", Source("default", "authorization"))),
        (), (), (), tuple(c for c, _ in clusters), tuple(e for _, e in clusters), (),
    )  # fmt: skip


def test_an_endpoint_kept_across_views_keeps_its_state_a_new_one_starts_afresh() -> None:
    clock = Clock()
    balancers = Balancers(clock=clock, rng=random.Random(1))
    first = cluster(outlier_detection=outlier(consecutive_5xx_errors=2))
    balancers.update(view((first, members(endpoint(0), endpoint(1)))))
    users = balancers.get(NAME)
    assert users is not None
    users.end(endpoint(0), 503)
    users.end(endpoint(0), 503)
    users.begin(endpoint(1))
    users.end(endpoint(1), 503)
    # A new revision: another load balancer, endpoint 2 added, endpoint 0 kept.
    second = cluster("LEAST_REQUEST", outlier_detection=outlier(consecutive_5xx_errors=2))
    balancers.update(view((second, members(endpoint(0), endpoint(1), endpoint(2)))))
    assert balancers.get(NAME) is users
    assert users.cluster.load_balancer.policy == "LEAST_REQUEST"
    assert [ejected for ejected, _ in users.ejected()] == [endpoint(0)]
    users.end(endpoint(1), 503)  # its run of one goes on to two
    assert len(users.ejected()) == 2
    # Endpoint 0 leaves and comes back: it starts afresh.
    balancers.update(view((second, members(endpoint(1), endpoint(2)))))
    balancers.update(view((second, members(endpoint(0), endpoint(1), endpoint(2)))))
    assert [ejected for ejected, _ in users.ejected()] == [endpoint(1)]
    assert balancers.stats()[NAME].ejections_total == 2
    balancers.update(view())
    assert balancers.get(NAME) is None


# -- circuit breaker ------------------------------------------------------------------------


def test_the_circuit_breaker_names_the_limit_and_where_it_came_from() -> None:
    balancer = state(2, connection_pool=pool(http2_max_requests=2))
    first, second = balancer.admit(), balancer.admit()
    assert isinstance(first, Admission) and isinstance(second, Admission)
    assert balancer.admit() == (
        "circuit breaker: 2 requests in flight to users-service port 8080 (DestinationRule "
        "users spec.trafficPolicy.connectionPool.http.http2MaxRequests)"
    )
    first.release()
    first.release()  # a second release changes nothing
    assert isinstance(balancer.admit(), Admission)
    assert isinstance(balancer.admit(), str)
    assert balancer.stats().overflows_total == 2
    assert balancer.stats().requests_in_flight == 2


def test_connections_and_pending_requests_limit_together() -> None:
    balancer = state(2, connection_pool=pool(max_connections=1, http1_max_pending_requests=2,
                                             http2_max_requests=10))  # fmt: skip
    assert all(isinstance(balancer.admit(), Admission) for _ in range(3))
    assert balancer.admit() == (
        "circuit breaker: 3 requests in flight to users-service port 8080 (DestinationRule "
        "users spec.trafficPolicy.connectionPool.tcp.maxConnections and "
        "http.http1MaxPendingRequests)"
    )
    unlimited = state(2, connection_pool=pool(max_connections=1))
    assert all(isinstance(unlimited.admit(), Admission) for _ in range(100))


# -- retries ---------------------------------------------------------------------------------


def test_the_retry_budget_is_a_share_of_the_requests_in_flight_with_a_minimum() -> None:
    balancer = state(2)
    admissions = [balancer.admit() for _ in range(30)]
    assert defaults.RETRY_BUDGET_MIN_RETRIES == 3 and defaults.RETRY_BUDGET_PERCENT == 20.0
    assert balancer.retry_limit() == 6  # 20% of 30
    for _ in range(6):
        assert balancer.may_retry()
        balancer.retry_started()
    assert not balancer.may_retry()
    balancer.retry_finished()
    assert balancer.may_retry()
    for admission in admissions:
        assert isinstance(admission, Admission)
        admission.release()
    assert balancer.retry_limit() == 3  # the minimum, with nothing in flight
    assert balancer.stats().retry_overflows_total == 1


def test_max_retries_is_a_fixed_limit() -> None:
    balancer = state(2, connection_pool=pool(max_retries=1))
    for _ in range(50):
        balancer.admit()
    assert balancer.may_retry()
    balancer.retry_started()
    assert not balancer.may_retry()
    none = state(2, connection_pool=pool(max_retries=0))
    assert not none.may_retry()
