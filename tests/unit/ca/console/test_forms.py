"""The console's small parsers: the explain form, TTLs, --rate-window."""

from __future__ import annotations

import pytest

from ca.cli.console import _valid_window
from ca.console.app import _explain_body, _ttl

FORM = {"from": "spiffe://example.org/web", "to": "users", "method": "", "path": "",
        "headers": "x-user: 7", "port": ""}


def test_explain_body_defaults_method_and_path() -> None:
    assert _explain_body(FORM) == {"from": "spiffe://example.org/web", "to": "users",
                                   "method": "GET", "path": "/",
                                   "headers": {"x-user": "7"}}


@pytest.mark.parametrize("port", ["0", "65536", "99999", "-1", "eighty", "8080.5"])
def test_explain_body_refuses_a_port_out_of_range(port: str) -> None:
    with pytest.raises(ValueError, match="1 to 65535"):
        _explain_body({**FORM, "port": port})


def test_explain_body_takes_a_port() -> None:
    assert _explain_body({**FORM, "port": " 8080 "})["port"] == 8080


@pytest.mark.parametrize("field", ["from", "to"])
def test_explain_body_needs_caller_and_service(field: str) -> None:
    with pytest.raises(ValueError, match="are needed"):
        _explain_body({**FORM, field: "  "})


def test_ttl_zero_is_the_default() -> None:
    assert _ttl(0) == "default"
    assert _ttl(None) == "default"
    assert _ttl(3600) == "1h"
    assert _ttl(90) == "1m 30s"


@pytest.mark.parametrize("window", ["1s", "30s", "5m", "1h30m", "2d3h4m5s", "1w", "1y",
                                    "1500ms"])
def test_rate_window_accepts_prometheus_durations(window: str) -> None:
    assert _valid_window(window)


@pytest.mark.parametrize("window", ["", "m", "0s", "500ms", "1m1h", "30x", "soon", "1 m"])
def test_rate_window_refuses_the_rest(window: str) -> None:
    assert not _valid_window(window)
