"""A small client for the admin API on the server's Unix socket.

    client = AdminClient(Path(".tessera/admin.sock"))
    entries = client.get("/v1/entries")["entries"]
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx

from ca.errors import CAError, TesseraError

TIMEOUT_SECONDS = 30.0


class AdminApiError(TesseraError):
    """The server refused an admin request; carries the server's status and reason."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class AdminClient:
    def __init__(self, socket_path: Path) -> None:
        self.socket_path = socket_path

    def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: Any = None,
        raw: bool = False,
    ) -> Any:
        if not self.socket_path.exists():
            raise CAError(
                f"no admin socket at {self.socket_path}: is 'tessera server run' running? "
                "Point to it with --admin-socket or --data-dir"
            )
        transport = httpx.HTTPTransport(uds=str(self.socket_path))
        try:
            with httpx.Client(
                transport=transport, base_url="http://tessera", timeout=TIMEOUT_SECONDS
            ) as client:
                response = client.request(method, path, json=json, params=params)
        except httpx.TransportError as err:
            raise CAError(
                f"cannot reach the server on {self.socket_path} ({err}); "
                "check that 'tessera server run' is running"
            ) from err
        if response.status_code >= 400:
            raise AdminApiError(response.status_code, _reason(response))
        if raw:
            return response.content
        return response.json()

    def get(self, path: str, **kwargs: Any) -> Any:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, **kwargs: Any) -> Any:
        return self.request("POST", path, **kwargs)

    def put(self, path: str, **kwargs: Any) -> Any:
        return self.request("PUT", path, **kwargs)

    def delete(self, path: str, **kwargs: Any) -> Any:
        return self.request("DELETE", path, **kwargs)


def _reason(response: httpx.Response) -> str:
    try:
        body = response.json()
        return str(body["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return f"the server answered {response.status_code}"
