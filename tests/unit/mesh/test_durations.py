"""Istio's durations."""

from __future__ import annotations

from datetime import timedelta

import pytest

from mesh.durations import parse_duration

NOT_A_DURATION = "must be a duration: a number with a unit h, m, s or ms, e.g. 2s, 100ms, 1.5s, 1m"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2s", timedelta(seconds=2)),
        ("100ms", timedelta(milliseconds=100)),
        ("1.5s", timedelta(milliseconds=1500)),
        ("1m", timedelta(minutes=1)),
        ("1h30m", timedelta(minutes=90)),
        ("1m0.5s", timedelta(seconds=60.5)),
        ("1ms", timedelta(milliseconds=1)),
        ("24h", timedelta(hours=24)),
    ],
)
def test_parse(text: str, expected: timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("5", NOT_A_DURATION),
        ("5 s", NOT_A_DURATION),
        ("5sec", NOT_A_DURATION),
        ("-1s", NOT_A_DURATION),
        ("1d", NOT_A_DURATION),
        ("10us", NOT_A_DURATION),
        ("", NOT_A_DURATION),
        (".5s", NOT_A_DURATION),
        ("1" * 40 + "s", NOT_A_DURATION),
        ("0s", "must be at least 1ms"),
        ("0.5ms", "must be a whole number of milliseconds (e.g. 1.5s, 250ms)"),
        ("1.0001s", "must be a whole number of milliseconds (e.g. 1.5s, 250ms)"),
        ("25h", "must be at most 24h"),
        ("24h1ms", "must be at most 24h"),
    ],
)
def test_refused(text: str, message: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_duration(text)
    assert str(caught.value) == message
