"""HTTP spellings in routes and policies: header names and values, methods, paths,
Envoy's retry conditions.

Header names are RFC 9110 tokens in lower case (HTTP/2 sends them so, and Istio asks
for it); pseudo-headers (``:path``) are Envoy's own and cannot be matched or set here.
A header value may not hold a line break or a NUL (it would split the header).

Usage::

    check_header_name("x-user")         # fine
    check_header_name("X_User")         # ValueError: must be a header name: ...
    check_retry_on("5xx,connect-failure,503")
"""

from __future__ import annotations

import re

__all__ = [
    "MAX_HEADER_VALUE_LENGTH",
    "RETRY_ON_CONDITIONS",
    "check_header_name",
    "check_header_value",
    "check_method",
    "check_path",
    "check_path_pattern",
    "check_retry_on",
]

MAX_HEADER_NAME_LENGTH = 256
MAX_HEADER_VALUE_LENGTH = 8192

RETRY_ON_CONDITIONS = (
    # HTTP (Envoy's x-envoy-retry-on)
    "5xx",
    "gateway-error",
    "reset",
    "reset-before-request",
    "connect-failure",
    "envoy-ratelimited",
    "retriable-4xx",
    "refused-stream",
    "retriable-status-codes",
    "retriable-headers",
    "http3-post-connect-failure",
    # gRPC (x-envoy-retry-grpc-on)
    "cancelled",
    "deadline-exceeded",
    "internal",
    "resource-exhausted",
    "unavailable",
)

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9a-z]+")
_METHOD = re.compile(r"[A-Z]+")
_STATUS = re.compile(r"[1-5][0-9][0-9]")


def check_header_name(name: str) -> None:
    if len(name) > MAX_HEADER_NAME_LENGTH or _TOKEN.fullmatch(name) is None:
        raise ValueError(
            "must be a header name: lower-case letters, digits and '-' (an HTTP token), "
            "e.g. x-request-id"
        )


def check_header_value(value: str) -> None:
    if len(value) > MAX_HEADER_VALUE_LENGTH:
        raise ValueError(f"must be at most {MAX_HEADER_VALUE_LENGTH} characters")
    if any(character in value for character in "\r\n\0"):
        raise ValueError("must not contain a line break or a NUL character")


def check_method(method: str) -> None:
    if len(method) > 32 or _METHOD.fullmatch(method) is None:
        raise ValueError("must be an HTTP method in upper case, e.g. GET")


def check_path(path: str) -> None:
    """A request path (a URI match, a redirect, a health check): starts with '/'."""
    if not path.startswith("/"):
        raise ValueError("must start with '/'")
    if any(character.isspace() or character == "\0" for character in path):
        raise ValueError("must not contain spaces or control characters")


def check_path_pattern(pattern: str) -> None:
    """An authorization path: exact, prefix (``/api/*``), suffix (``*.png``) or ``*``."""
    if pattern == "*":
        return
    inner = pattern[1:] if pattern.startswith("*") else pattern
    inner = inner[:-1] if inner.endswith("*") and not pattern.startswith("*") else inner
    if "*" in inner:
        raise ValueError(
            "may have '*' only at its start (a suffix, *.png) or its end (a prefix, "
            "/api/*), or be '*'"
        )
    if not pattern.startswith("*"):
        check_path(pattern)


def check_retry_on(value: str) -> None:
    """Envoy's retry conditions, comma separated; an HTTP status code stands for itself."""
    for written in value.split(","):
        condition = written.strip()
        if condition in RETRY_ON_CONDITIONS or _STATUS.fullmatch(condition):
            continue
        shown = repr(condition) if condition else "an empty condition"
        raise ValueError(
            f"has {shown}, which is not a retry condition; use a comma separated list of "
            f"{', '.join(RETRY_ON_CONDITIONS)} or HTTP status codes (503)"
        )
