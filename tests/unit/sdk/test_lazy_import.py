"""The SDK's ground-floor modules load without grpc: ``import sdk.x`` runs ``sdk/__init__``,
and a server or CLI that needs only errors or IDs must not pay for the Workload API client."""

from __future__ import annotations

import subprocess
import sys

import pytest

import sdk

GROUND_FLOOR = [
    "sdk",
    "sdk.clock",
    "sdk.commandline",
    "sdk.csr",
    "sdk.der",
    "sdk.errors",
    "sdk.keys",
    "sdk.spiffeid",
]


def loaded_after_import(module: str) -> set[str]:
    script = f"import sys, {module}; print(' '.join(sorted(sys.modules)))"
    ran = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    )
    return set(ran.stdout.split())


@pytest.mark.parametrize("module", GROUND_FLOOR)
def test_importing_loads_no_grpc(module: str) -> None:
    loaded = loaded_after_import(module)
    assert module in loaded
    assert not {"grpc", "spiffe"} & loaded


def test_every_public_name_resolves() -> None:
    for name in sdk.__all__:
        assert getattr(sdk, name) is not None, name
    assert set(sdk.__all__) <= set(dir(sdk))


def test_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="module 'sdk' has no attribute 'Nope'"):
        _ = sdk.Nope  # type: ignore[attr-defined]
