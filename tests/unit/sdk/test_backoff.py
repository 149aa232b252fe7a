"""sdk.backoff: capped exponential delays, jitter from an injected random source, reset."""

from __future__ import annotations

import random

import pytest

from sdk.backoff import Backoff


def test_delays_grow_by_the_multiplier_up_to_the_maximum() -> None:
    backoff = Backoff(initial=0.5, maximum=5.0)

    assert [backoff.next() for _ in range(7)] == [0.5, 1.0, 2.0, 4.0, 5.0, 5.0, 5.0]
    assert backoff.attempts == 7


def test_another_multiplier() -> None:
    backoff = Backoff(initial=1, maximum=100, multiplier=3)

    assert [backoff.next() for _ in range(6)] == [1, 3, 9, 27, 81, 100]


def test_a_multiplier_of_one_keeps_the_delay() -> None:
    backoff = Backoff(initial=2, maximum=10, multiplier=1)

    assert [backoff.next() for _ in range(3)] == [2, 2, 2]


def test_reset_starts_again_from_initial() -> None:
    backoff = Backoff(initial=5, maximum=300)
    for _ in range(4):
        backoff.next()

    backoff.reset()

    assert backoff.attempts == 0
    assert backoff.next() == 5


def test_delay_gives_any_attempts_nominal_delay_without_counting_it() -> None:
    backoff = Backoff(initial=5, maximum=300, jitter=0.5)

    assert [backoff.delay(n) for n in range(8)] == [5, 10, 20, 40, 80, 160, 300, 300]
    assert backoff.attempts == 0


def test_an_outage_long_past_the_cap_stays_at_the_maximum() -> None:
    # 2.0 ** 1100 overflows a float: the delay must stay capped, not raise
    backoff = Backoff(initial=0.5, maximum=5.0, jitter=0.5, rng=random.Random(3))
    delays = [backoff.next() for _ in range(1100)]

    assert all(2.5 <= delay <= 5.0 for delay in delays[4:])
    assert Backoff(initial=0.5, maximum=5.0).delay(10**6) == 5.0


def test_jitter_draws_each_delay_from_the_injected_random_source() -> None:
    backoff = Backoff(initial=1, maximum=8, jitter=0.25, rng=random.Random(7))
    twin = random.Random(7)

    delays = [backoff.next() for _ in range(6)]

    assert delays == [cap * twin.uniform(0.75, 1.0) for cap in (1, 2, 4, 8, 8, 8)]
    assert all(0.75 * cap <= d <= cap for d, cap in zip(delays, (1, 2, 4, 8, 8, 8), strict=True))


def test_full_jitter_may_go_down_to_zero() -> None:
    class Lowest(random.Random):
        def uniform(self, a: float, b: float) -> float:
            return a

    backoff = Backoff(initial=1, maximum=4, jitter=1.0, rng=Lowest())

    assert [backoff.next() for _ in range(3)] == [0.0, 0.0, 0.0]


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"initial": 0, "maximum": 5}, "a backoff needs 0 < initial <= maximum, not 0.0 and 5.0"),
        ({"initial": 6, "maximum": 5}, "a backoff needs 0 < initial <= maximum, not 6.0 and 5.0"),
        ({"initial": 1, "maximum": 5, "multiplier": 0.5},
         "a backoff's multiplier must be at least 1, not 0.5"),
        ({"initial": 1, "maximum": 5, "jitter": 1.5},
         "a backoff's jitter must be between 0 and 1, not 1.5"),
        ({"initial": 1, "maximum": 5, "jitter": -0.1},
         "a backoff's jitter must be between 0 and 1, not -0.1"),
    ],
)
def test_settings_that_make_no_sense_are_refused(settings: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError) as caught:
        Backoff(**settings)
    assert str(caught.value) == message


def test_a_negative_attempt_is_refused() -> None:
    with pytest.raises(ValueError, match=r"^attempt must be 0 or more, not -1$"):
        Backoff(initial=1, maximum=2).delay(-1)
