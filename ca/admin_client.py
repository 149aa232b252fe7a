"""A small client for the admin API on the server's Unix socket.

    client = AdminClient(Path(".tessera/admin.sock"))
    entries = client.get("/v1/entries")["entries"]
"""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Any

import httpx

from ca.errors import CAError
from sdk.errors import TesseraError

TIMEOUT_SECONDS = 30.0


class AdminApiError(TesseraError):
    """The server refused an admin request; carries the server's status and reason, and
    for a mesh configuration that cannot be applied, each of its problems
    (``field_errors``: ``{"kind", "name", "path", "message", "source", "document"}``)."""

    def __init__(
        self, status: int, message: str, field_errors: list[dict[str, Any]] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.field_errors = field_errors or []


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
        content: bytes | None = None,
        headers: dict[str, str] | None = None,
        raw: bool = False,
    ) -> Any:
        transport = httpx.HTTPTransport(uds=str(self.socket_path))
        try:
            with httpx.Client(
                transport=transport, base_url="http://tessera", timeout=TIMEOUT_SECONDS
            ) as client:
                response = client.request(
                    method, path, json=json, params=params, content=content, headers=headers
                )
        except httpx.TransportError as err:
            raise unreachable(self.socket_path, err) from err
        if response.status_code >= 400:
            raise AdminApiError(
                response.status_code, _reason(response), _field_errors(response)
            )
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


def unreachable(socket_path: Path, err: BaseException) -> CAError:
    """One sentence for a failed connection to the admin socket: which socket, what the
    system said (permission denied, not found, refused) and what to do."""
    cause = _os_error(err)
    code = cause.errno if cause is not None else None
    if code in (errno.EACCES, errno.EPERM):
        return CAError(
            f"permission denied on the admin socket {socket_path}; run the command as the "
            "user the server runs as, or pass --admin-socket PATH of a socket you may open"
        )
    if code in (errno.ENOENT, errno.ENOTDIR):
        return CAError(
            f"no admin socket at {socket_path} (not found): is the server running? "
            "'tessera server run' listens on <data-dir>/admin.sock; pass --data-dir DIR or "
            "--admin-socket PATH"
        )
    if code == errno.ECONNREFUSED:
        return CAError(
            f"the admin socket {socket_path} refused the connection: is the server running? "
            "It listens there while it runs; start it with 'tessera server run', or pass "
            "--admin-socket PATH"
        )
    reason = (cause.strerror if cause is not None else None) or str(err) or type(err).__name__
    return CAError(
        f"cannot reach the server on {socket_path} ({reason}); "
        "check that 'tessera server run' is running"
    )


def _os_error(err: BaseException) -> OSError | None:
    """The OSError under httpx's and httpcore's wrappers, if the failure was one."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno is not None:
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _field_errors(response: httpx.Response) -> list[dict[str, Any]]:
    try:
        errors = response.json()["error"]["field_errors"]
    except (ValueError, KeyError, TypeError):
        return []
    return [e for e in errors if isinstance(e, dict)] if isinstance(errors, list) else []


def _reason(response: httpx.Response) -> str:
    try:
        body = response.json()
        return str(body["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return f"the server answered {response.status_code}"
