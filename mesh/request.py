"""An HTTP request as the compiled routes and policies see it.

What a proxy matches routes and authorization rules against, and what ``explain``
takes::

    request = HttpRequest.of("GET", "/api/v1/../v1/users?page=2", {"X-User": "ada"})
    request.uri_path            # "/api/v1/users": dot segments resolved, query removed
    request.query_params        # {"page": "2"}
    request.headers["x-user"]   # names in lower case

The path is normalised as Istio's default (``BASE``) does before routing and
authorization: ``.`` and ``..`` segments are resolved (RFC 3986, section 5.2.4), so
``/public/../admin`` is judged as ``/admin``; double slashes are kept. Routes and
policies match the path without its query string, as Envoy does.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from urllib.parse import parse_qsl

__all__ = [
    "HttpRequest",
    "remove_dot_segments",
    "split_host",
]


def remove_dot_segments(path: str) -> str:
    """RFC 3986's algorithm: ``/a/b/../c/./d`` → ``/a/c/d``; never above ``/``."""
    output: list[str] = []
    segments = path.split("/")
    for position, segment in enumerate(segments):
        last = position == len(segments) - 1
        if segment == ".":
            if last:
                output.append("")
        elif segment == "..":
            if len(output) > 1:
                output.pop()
            if last:
                output.append("")
        else:
            output.append(segment)
    result = "/".join(output)
    return result if result.startswith("/") else "/" + result


def split_host(authority: str) -> tuple[str, int | None]:
    """A ``Host`` header's name in lower case and its port, if it has a valid one."""
    text = authority.strip().lower()
    if text.startswith("["):  # an IPv6 literal
        address, _, rest = text[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
        return address, int(port_text) if port_text.isdigit() else None
    name, colon, port_text = text.rpartition(":")
    if colon and port_text.isdigit() and 0 < int(port_text) < 65536:
        return name, int(port_text)
    return text, None


@dataclass(frozen=True)
class HttpRequest:
    """A request's method, path (with its query), headers and, where known, port."""

    method: str
    path: str
    headers: Mapping[str, str] = field(default_factory=dict, hash=False)
    port: int | None = None

    def __post_init__(self) -> None:
        lowered = {name.lower(): value for name, value in self.headers.items()}
        object.__setattr__(self, "headers", MappingProxyType(dict(sorted(lowered.items()))))
        object.__setattr__(self, "method", self.method.upper())

    @classmethod
    def of(
        cls,
        method: str = "GET",
        path: str = "/",
        headers: Mapping[str, str] | None = None,
        *,
        port: int | None = None,
    ) -> HttpRequest:
        return cls(method, path or "/", dict(headers or {}), port)

    @property
    def uri_path(self) -> str:
        """The path without its query, dot segments resolved."""
        return remove_dot_segments(self.path.partition("?")[0] or "/")

    @property
    def query_params(self) -> Mapping[str, str]:
        """Each query parameter's first value."""
        found: dict[str, str] = {}
        for name, value in parse_qsl(self.path.partition("?")[2], keep_blank_values=True):
            found.setdefault(name, value)
        return found

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())
