"""Regexes are checked by RE2, the engine Envoy runs."""

from __future__ import annotations

import pytest

from mesh.regex import MAX_PROGRAM_SIZE, check_regex


@pytest.mark.parametrize(
    "pattern",
    [
        r"^/api/v[0-9]+/users/[^/]+$",
        r"(?i)^aaa$",
        r"^(.*?;)?(user=jason)(;.*)?$",
        r"/static/[a-zA-Z0-9._-]{0,200}/",  # over Envoy's default program size of 100
        r"(?P<id>\d+)",
    ],
)
def test_accepted(pattern: str) -> None:
    check_regex(pattern)


@pytest.mark.parametrize(
    ("pattern", "message"),
    [
        (
            "(?=admin)",
            "must be an RE2 regular expression: invalid perl operator: (?= (RE2 has no lookahead)",
        ),
        (
            "^(?!/admin)",
            "must be an RE2 regular expression: invalid perl operator: (?! (RE2 has no lookahead)",
        ),
        (
            "(?<=a)b",
            "must be an RE2 regular expression: invalid perl operator: (?<= (RE2 has no "
            "lookbehind)",
        ),
        (
            r"(a)\1",
            "must be an RE2 regular expression: invalid escape sequence: \\1 (RE2 has no "
            "backreferences)",
        ),
        ("[a-z", "must be an RE2 regular expression: missing ]: [a-z"),
        ("a)", "must be an RE2 regular expression: unexpected ): a)"),
        ("*a", "must be an RE2 regular expression: no argument for repetition operator: *"),
        ("a{1001}", "must be an RE2 regular expression: invalid repetition size: {1001}"),
        ("", "must not be empty"),
        ("a" * 1025, "must be at most 1024 characters"),
    ],
)
def test_refused(pattern: str, message: str) -> None:
    with pytest.raises(ValueError) as caught:
        check_regex(pattern)
    assert str(caught.value) == message


def test_a_program_too_large_is_refused() -> None:
    pattern = "[a-z]{1000}" * 11
    with pytest.raises(ValueError) as caught:
        check_regex(pattern)
    assert str(caught.value).startswith("is too complex: RE2 program size ")
    assert str(caught.value).endswith(
        f", at most {MAX_PROGRAM_SIZE}; simplify it (large counted repetitions such as "
        "{1000} grow it most)"
    )


def test_refusals_are_not_printed(capfd: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ValueError):
        check_regex("(?=x)")
    assert capfd.readouterr().err == ""
