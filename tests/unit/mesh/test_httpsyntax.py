"""HTTP spellings: header names and values, methods, paths, retry conditions."""

from __future__ import annotations

import pytest

from mesh.httpsyntax import (
    check_header_name,
    check_header_value,
    check_method,
    check_path,
    check_path_pattern,
    check_retry_on,
)

HEADER = (
    "must be a header name: lower-case letters, digits and '-' (an HTTP token), e.g. x-request-id"
)
NOT_A_CONDITION = (
    ", which is not a retry condition; use a comma separated list of 5xx, gateway-error, "
    "reset, reset-before-request, connect-failure, envoy-ratelimited, retriable-4xx, "
    "refused-stream, retriable-status-codes, retriable-headers, http3-post-connect-failure, "
    "cancelled, deadline-exceeded, internal, resource-exhausted, unavailable or HTTP status "
    "codes (503)"
)
PATTERN = (
    "may have '*' only at its start (a suffix, *.png) or its end (a prefix, /api/*), or be '*'"
)


@pytest.mark.parametrize(
    ("check", "value", "message"),
    [
        (check_header_name, "X-User", HEADER),
        (check_header_name, "x user", HEADER),
        (check_header_name, ":path", HEADER),
        (check_header_name, "", HEADER),
        (
            check_header_value,
            "a\r\nx-injected: 1",
            "must not contain a line break or a NUL character",
        ),
        (check_header_value, "x" * 8193, "must be at most 8192 characters"),
        (check_method, "get", "must be an HTTP method in upper case, e.g. GET"),
        (check_path, "api/v1", "must start with '/'"),
        (check_path, "/api v1", "must not contain spaces or control characters"),
        (check_path_pattern, "/api/*/users", PATTERN),
        (check_path_pattern, "**", PATTERN),
        (check_path_pattern, "api/*", "must start with '/'"),
        (check_retry_on, "5xx,bogus", "has 'bogus'" + NOT_A_CONDITION),
        (check_retry_on, "5xx,,reset", "has an empty condition" + NOT_A_CONDITION),
        (check_retry_on, "600", "has '600'" + NOT_A_CONDITION),
    ],
)
def test_refused(check: object, value: str, message: str) -> None:
    assert callable(check)
    with pytest.raises(ValueError) as caught:
        check(value)
    assert str(caught.value) == message


@pytest.mark.parametrize(
    ("check", "value"),
    [
        (check_header_name, "x-request-id"),
        (check_header_value, "Bearer abc"),
        (check_method, "PATCH"),
        (check_path, "/api/v1/users?x=1"),
        (check_path_pattern, "*"),
        (check_path_pattern, "/api/*"),
        (check_path_pattern, "*.png"),
        (check_path_pattern, "/exact"),
        (check_retry_on, "5xx, connect-failure,503,unavailable"),
    ],
)
def test_accepted(check: object, value: str) -> None:
    assert callable(check)
    check(value)
