"""The mesh package's names load on first use (PEP 562): a server that stores
resources imports the configuration model without the compiler or the YAML loader."""

from __future__ import annotations

import subprocess
import sys

import pytest

import mesh


def test_every_public_name_resolves() -> None:
    for name in mesh.__all__:
        assert getattr(mesh, name) is not None, name
    assert set(mesh.__all__) <= set(dir(mesh))


def test_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="module 'mesh' has no attribute 'Nope'"):
        _ = mesh.Nope  # type: ignore[attr-defined]


def test_the_configuration_model_loads_without_the_compiler() -> None:
    script = """
import sys
from mesh import Change, Config, Resource
later = {"mesh.compile", "mesh.explain", "mesh.describe", "mesh.parse", "yaml"}
print(sorted(later & set(sys.modules)))
sys.modules["mesh"].load_all()
print(sorted(later - set(sys.modules)))
"""
    ran = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=60, check=True)
    assert ran.stdout.split("\n")[:2] == ["[]", "[]"], ran.stderr
