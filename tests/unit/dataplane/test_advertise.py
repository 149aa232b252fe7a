"""The address a sidecar registers: its listener's, or this host's for a wildcard."""

from __future__ import annotations

import ipaddress

import pytest

from dataplane.advertise import AdvertiseError, advertised_address
from sdk.address import HostPort


def test_a_listener_on_one_address_is_registered_there() -> None:
    listening = HostPort("10.0.0.5", 15006)
    assert advertised_address(listening, environ={}) == listening


def test_the_variable_names_this_hosts_address_for_a_wildcard_listener() -> None:
    environ = {"TESSERA_ADVERTISE_ADDRESS": " users-1.internal "}
    assert advertised_address(HostPort("0.0.0.0", 15006), environ=environ) == HostPort(
        "users-1.internal", 15006)
    environ = {"TESSERA_ADVERTISE_ADDRESS": "[fd00::5]"}
    assert advertised_address(HostPort("::", 15006), environ=environ) == HostPort("fd00::5", 15006)


@pytest.mark.parametrize("value", ["0.0.0.0", "10.0.0.5:80", "[::]", "a b"])
def test_a_variable_that_is_not_a_reachable_host_is_refused(value: str) -> None:
    with pytest.raises(AdvertiseError) as refused:
        advertised_address(HostPort("0.0.0.0", 15006),
                           environ={"TESSERA_ADVERTISE_ADDRESS": value})  # fmt: skip
    assert refused.value.message == (
        f"TESSERA_ADVERTISE_ADDRESS={value!r} is not an address other hosts can reach: give "
        "this host's name or IP address, without a port, e.g. 10.0.0.5")


def test_without_the_variable_the_default_routes_interface_is_taken() -> None:
    address = advertised_address(HostPort("0.0.0.0", 15006), environ={})
    assert address.port == 15006
    assert not ipaddress.ip_address(address.host).is_unspecified
