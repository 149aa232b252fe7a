"""How the values of a view are spelled in Envoy's proto3 JSON.

Every renderer module writes durations, percentages, string matchers, header changes,
config sources and the ``tessera`` metadata through these, so one spelling holds
everywhere::

    duration(timedelta(milliseconds=1500))      # "1.5s"
    fraction(0.5)                               # {"numerator": 5000, "denominator": "MILLION"}
    string_matcher(StringMatch("prefix", "/api"))   # {"prefix": "/api"}
    header_value("50%")                         # "50%%": Envoy reads % as a formatter

Dicts are in Envoy's field names (snake_case), which ``json_format.ParseDict`` and
Envoy's own JSON/YAML loader accept alike.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import timedelta
from typing import Any

from mesh.view import HeaderRewrite, Source, StringMatch, format_duration

__all__ = [
    "ADS",
    "TYPE_PREFIX",
    "any_of",
    "duration",
    "fraction",
    "header_value",
    "header_value_options",
    "metadata",
    "runtime_fraction",
    "socket_address",
    "string_matcher",
    "typed",
]

TYPE_PREFIX = "type.googleapis.com/"

ADS: Mapping[str, Any] = {"ads": {}, "resource_api_version": "V3"}
"""A config source: the ADS stream the proxy already holds to its agent."""

_MILLION = 1_000_000


def typed(message: str, **fields: Any) -> dict[str, Any]:
    """An ``Any``: the message's full name, then its fields."""
    return {"@type": TYPE_PREFIX + message, **fields}


def duration(value: timedelta) -> str:
    """A ``google.protobuf.Duration``: ``10s``, ``1.5s``, ``0.1s`` (whole milliseconds)."""
    return format_duration(value)


def fraction(percentage: float) -> dict[str, Any]:
    """A ``FractionalPercent`` for 0-100 percent, to a millionth (Istio's 0.0001%)."""
    numerator = round(min(max(percentage, 0.0), 100.0) * _MILLION / 100)
    return {"numerator": numerator, "denominator": "MILLION"}


def runtime_fraction(percentage: float) -> dict[str, Any]:
    """A ``RuntimeFractionalPercent`` with no runtime key: the value as given."""
    return {"default_value": fraction(percentage)}


def string_matcher(match: StringMatch) -> dict[str, Any]:
    """A ``type.matcher.v3.StringMatcher``; ``present`` has none (see ``present_match``)."""
    if match.kind == "exact":
        return {"exact": match.value}
    if match.kind == "prefix":
        return {"prefix": match.value}
    if match.kind == "regex":
        return {"safe_regex": {"regex": match.value}}
    raise ValueError("a presence match has no StringMatcher: use present_match")


def any_of(literals: list[str]) -> str:
    """An RE2 expression matching exactly one of ``literals`` (escaped)."""
    return "|".join(_re2_escape(text) for text in literals)


def _re2_escape(text: str) -> str:
    # RE2 takes a backslash before any ASCII punctuation, and only there.
    return "".join(
        f"\\{char}" if char.isascii() and not (char.isalnum() or char == "_") else char
        for char in text
    )


def header_value(text: str) -> str:
    """A header value as written: Envoy reads ``%...%`` in added headers as a formatter,
    so a literal ``%`` is doubled."""
    return text.replace("%", "%%")


def header_value_options(rewrite: HeaderRewrite) -> list[dict[str, Any]]:
    """``set`` replaces a header, ``add`` appends a value to it (``remove`` goes in the
    ``*_headers_to_remove`` lists)."""
    options = [
        {
            "header": {"key": name, "value": header_value(value)},
            "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
        }
        for name, value in rewrite.set.items()
    ]
    options.extend(
        {
            "header": {"key": name, "value": header_value(value)},
            "append_action": "APPEND_IF_EXISTS_OR_ADD",
        }
        for name, value in rewrite.add.items()
    )
    return options


def metadata(source: Source, **more: str | None) -> dict[str, Any]:
    """``metadata.filter_metadata.tessera``: where an element came from (``source``, as
    ``tessera mesh describe`` prints it) and whatever else relates it to the view."""
    fields: dict[str, Any] = {"source": str(source)}
    fields.update({key: value for key, value in more.items() if value is not None})
    return {"filter_metadata": {"tessera": fields}}


def socket_address(host: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": host, "port_value": port}}
