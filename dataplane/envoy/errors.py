"""What can go wrong with the Envoy a proxy supervises, each error saying what to do next.

    EnvoyError            root: Envoy cannot run, or does not answer (HTTP status 503)
    ├── EnvoyMissing      no envoy binary is installed (the ``tessera[envoy]`` extra)
    ├── EnvoyRefused      Envoy exited before it served: ``reason`` is Envoy's own words
    │                     (a bootstrap it refuses, a port it cannot bind), ``exit_code``
    └── EnvoyAdminError   Envoy's admin interface did not answer, or not in time
"""

from __future__ import annotations

from sdk.errors import TesseraError

__all__ = ["EnvoyAdminError", "EnvoyError", "EnvoyMissing", "EnvoyRefused"]


class EnvoyError(TesseraError):
    """Root of the errors of :mod:`dataplane.envoy`."""

    status = 503


class EnvoyMissing(EnvoyError):
    """No envoy binary: the message names the extra that installs it."""


class EnvoyRefused(EnvoyError):
    """Envoy exited before it served, or kept exiting as soon as it started."""

    def __init__(self, message: str, *, reason: str, exit_code: int | None) -> None:
        super().__init__(message)
        self.reason = reason
        """What Envoy said last, in its own words (one line)."""
        self.exit_code = exit_code
        """Its exit status (negative: killed by that signal), None if it still ran."""


class EnvoyAdminError(EnvoyError):
    """Envoy's admin interface refused a request, or did not answer within its bound."""
