"""sdk.address: one HOST:PORT reader for the server, the agent and the sidecar."""

from __future__ import annotations

import socket

import pytest

from sdk.address import UNUSED_PORTS, HostPort, unused_port
from sdk.errors import ConfigError


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:8081", HostPort("127.0.0.1", 8081)),
        ("tessera.internal:443", HostPort("tessera.internal", 443)),
        ("localhost:1", HostPort("localhost", 1)),
        ("  localhost:65535 \n", HostPort("localhost", 65535)),
        ("[::1]:8443", HostPort("::1", 8443)),
        ("[::]:8443", HostPort("::", 8443)),
        ("[fe80::1%eth0]:80", HostPort("fe80::1%eth0", 80)),
        ("0.0.0.0:08081", HostPort("0.0.0.0", 8081)),
    ],
)
def test_host_and_port(text: str, expected: HostPort) -> None:
    assert HostPort.parse(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "8081",  # no host
        ":8081",
        "localhost",  # no port
        "localhost:",
        "localhost:http",  # not a number
        "localhost:-1",
        "localhost:+80",
        "localhost:٨٠",  # digits, but not ASCII ones
        "localhost:0",  # 0 only where any port will do
        "localhost:65536",
        "::1:8443",  # an IPv6 address needs brackets: the port cannot be told from it
        "::1",
        "[::1]",
        "[::1]8443",
        "[localhost]:80",  # brackets are for IPv6 addresses
        "[]:80",
        "a]:80",
        "[a:80",
    ],
)
def test_not_host_and_port(text: str) -> None:
    with pytest.raises(ConfigError) as caught:
        HostPort.parse(text)
    assert caught.value.message == f"address {text!r} is not HOST:PORT, e.g. 127.0.0.1:8081"


def test_the_message_names_the_setting_and_shows_an_example() -> None:
    with pytest.raises(ConfigError) as caught:
        HostPort.parse("8443", what="inbound[0].listen", example="0.0.0.0:8443")
    assert caught.value.message == "inbound[0].listen '8443' is not HOST:PORT, e.g. 0.0.0.0:8443"


@pytest.mark.parametrize("value", [8443, None, b"127.0.0.1:80"])
def test_only_text_is_read(value: object) -> None:
    with pytest.raises(ConfigError) as caught:
        HostPort.parse(value, what="forward", example="127.0.0.1:8080")
    assert caught.value.message == f"forward {value!r} is not HOST:PORT, e.g. 127.0.0.1:8080"


def test_port_zero_where_any_free_port_will_do() -> None:
    assert HostPort.parse("127.0.0.1:0", any_port=True) == HostPort("127.0.0.1", 0)
    assert HostPort.parse("[::]:0", any_port=True) == HostPort("::", 0)
    with pytest.raises(ConfigError):
        HostPort.parse("127.0.0.1:65536", any_port=True)


@pytest.mark.parametrize(
    ("address", "text"),
    [
        (HostPort("127.0.0.1", 8081), "127.0.0.1:8081"),
        (HostPort("tessera.internal", 443), "tessera.internal:443"),
        (HostPort("::1", 8443), "[::1]:8443"),
        (HostPort("::", 0), "[::]:0"),
    ],
)
def test_str_brackets_ipv6_and_parses_back(address: HostPort, text: str) -> None:
    assert str(address) == text
    assert HostPort.parse(text, any_port=True) == address


def test_is_ip() -> None:
    assert HostPort("::1", 80).is_ip
    assert HostPort("10.0.0.1", 80).is_ip
    assert not HostPort("localhost", 80).is_ip


def test_a_subclass_parses_to_itself() -> None:
    class ServerAddress(HostPort):
        @property
        def url(self) -> str:
            return f"https://{self}"

    parsed = ServerAddress.parse("[::1]:8081")

    assert type(parsed) is ServerAddress
    assert parsed.url == "https://[::1]:8081"


def test_an_unused_port_is_outside_the_ephemeral_range_and_free() -> None:
    port = unused_port()
    assert port in UNUSED_PORTS
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))  # nothing had it
        taken.listen()
        assert all(unused_port() != port for _ in range(200))


def test_an_unused_port_is_never_handed_out_twice_by_one_process() -> None:
    """Two ports asked for before either is listened on (a sidecar's --outbound and
    another's --health-bind, say) must differ, though both are free when asked for."""
    ports = [unused_port() for _ in range(500)]
    assert len(set(ports)) == len(ports)
