"""The sidecar's exceptions, under the SDK's root.

    SdkError                      root of the SDK (sdk.errors)
    └── SidecarError              root of the sidecar (``tessera sidecar``)
        ├── SidecarConfigError    proxy.toml or a flag is wrong; the message names the key
        └── HttpError             an HTTP/1.1 message the proxy cannot pass on (its ``status``)

``tessera sidecar`` prints a SidecarError's message as one sentence and exits
1; an HttpError becomes the response to the client (400, 414, 431, 501, 502,
505) with the message as its text body.
"""

from __future__ import annotations

from sdk.errors import SdkError

__all__ = ["HttpError", "SidecarConfigError", "SidecarError"]


class SidecarError(SdkError):
    """Root of the sidecar's errors."""


class SidecarConfigError(SidecarError):
    """The proxy configuration or a command-line flag is wrong."""

    status = 400


class HttpError(SidecarError):
    """A request (or the app's response) the proxy refuses to pass on; ``status`` is the answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
