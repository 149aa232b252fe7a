"""A small client for the admin API on the server's Unix socket.

    client = AdminClient(Path(".tessera/admin.sock"))
    entries = client.get("/v1/entries")["entries"]

Written on the standard library's ``http.client`` over an ``AF_UNIX`` socket rather
than httpx: every ``tessera server ...`` command is one short request, and importing
httpx (with the rich console its command line pulls in) cost a command about 110 ms,
most of its run. The server is the only peer; its answer is still read within
:data:`MAX_RESPONSE_BYTES` and :data:`TIMEOUT_SECONDS`.
"""

from __future__ import annotations

import errno
import http.client
import json as jsonlib
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from ca.errors import CAError
from sdk.errors import TesseraError

TIMEOUT_SECONDS = 30.0
MAX_RESPONSE_BYTES = 256 * 1024 * 1024


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


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, socket_path: Path, timeout: float) -> None:
        super().__init__("tessera", timeout=timeout)
        self._socket_path = socket_path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(str(self._socket_path))
        except BaseException:
            sock.close()
            raise
        self.sock = sock


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
        """Send one request; the decoded JSON answer (its bytes with ``raw``), or
        :class:`AdminApiError` with the server's reason for a 4xx/5xx."""
        target = f"{path}?{urlencode(params, doseq=True)}" if params else path
        sent = dict(headers or {})
        body = content
        if json is not None:
            body = jsonlib.dumps(json).encode()
            sent["Content-Type"] = "application/json"
        connection = _UnixConnection(self.socket_path, TIMEOUT_SECONDS)
        try:
            connection.request(method, target, body=body, headers=sent)
            response = connection.getresponse()
            answer = response.read(MAX_RESPONSE_BYTES + 1)
        except (OSError, http.client.HTTPException) as err:
            raise unreachable(self.socket_path, err) from err
        finally:
            connection.close()
        if len(answer) > MAX_RESPONSE_BYTES:
            raise CAError(f"the server's answer to {method} {path} is over "
                          f"{MAX_RESPONSE_BYTES // (1024 * 1024)} MiB")  # fmt: skip
        if response.status >= 400:
            raise AdminApiError(response.status, _reason(response.status, answer),
                                _field_errors(answer))  # fmt: skip
        if raw:
            return answer
        try:
            return jsonlib.loads(answer)
        except ValueError as err:
            raise CAError(f"the server's answer to {method} {path} is not JSON") from err

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
    """The OSError under any wrapper, if the failure was one."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno is not None:
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _field_errors(answer: bytes) -> list[dict[str, Any]]:
    try:
        errors = jsonlib.loads(answer)["error"]["field_errors"]
    except (ValueError, KeyError, TypeError):
        return []
    return [e for e in errors if isinstance(e, dict)] if isinstance(errors, list) else []


def _reason(status: int, answer: bytes) -> str:
    try:
        return str(jsonlib.loads(answer)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return f"the server answered {status}"
