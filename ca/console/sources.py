"""Where the console's data comes from: the server's admin API and, optionally, Prometheus.

:class:`AdminSource` speaks to the admin API on the server's Unix socket (the same
authority as ``tessera server ...`` commands); :class:`PrometheusSource` asks a
Prometheus server's HTTP API for the proxies' request metrics. Both are asynchronous
(httpx) so one slow answer holds up only the page that asked, and both bound what
they read and how long they wait: the server and Prometheus are peers like any other.

Errors of either become :class:`SourceError`, with a sentence the page shows as is.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import httpx

from sdk.errors import TesseraError

ADMIN_TIMEOUT_SECONDS = 10.0
PROMETHEUS_TIMEOUT_SECONDS = 5.0
MAX_ANSWER_BYTES = 64 * 1024 * 1024


class SourceError(TesseraError):
    """A source could not answer; ``answered`` is the admin API's HTTP status if it gave
    one."""

    def __init__(self, message: str, answered: int | None = None) -> None:
        super().__init__(message)
        self.answered = answered


class AdminSource:
    """The server's admin API, over its Unix socket."""

    def __init__(self, socket_path: Path, *, timeout: float = ADMIN_TIMEOUT_SECONDS) -> None:
        self.socket_path = socket_path
        self._timeout = timeout
        self._client = httpx.AsyncClient(
            transport=httpx.AsyncHTTPTransport(uds=str(socket_path)),
            base_url="http://tessera",
            timeout=timeout,
        )

    async def close(self) -> None:
        await self._client.aclose()

    async def get(
        self, path: str, params: dict[str, Any] | None = None, *, timeout: float | None = None
    ) -> Any:
        """The JSON (or text) answer to GET ``path``; parameters that are None or empty
        are left out."""
        query = {k: v for k, v in (params or {}).items() if v is not None and v != ""}
        return await self._call("GET", path, params=query, timeout=timeout)

    async def post(self, path: str, body: dict[str, Any] | None = None) -> Any:
        return await self._call("POST", path, json=body or {})

    async def _call(self, method: str, path: str, *, timeout: float | None = None,
                    **kwargs: Any) -> Any:
        limit = self._timeout if timeout is None else timeout
        try:
            async with self._client.stream(method, path, timeout=limit, **kwargs) as answer:
                body = await _read_bounded(answer)
        except httpx.TimeoutException as err:
            raise SourceError(f"the server did not answer within {limit:g} s") from err
        except httpx.HTTPError as err:
            raise SourceError(
                f"cannot reach the server's admin socket {self.socket_path}: "
                f"{err or type(err).__name__}; is "
                "'tessera server run' running with that --admin-socket?"
            ) from err
        if answer.status_code >= 400:
            raise SourceError(_reason(answer.status_code, body), answered=answer.status_code)
        if not body:
            return None
        if answer.headers.get("content-type", "").startswith("application/json"):
            return json.loads(body)
        return body.decode(errors="replace")


class PrometheusSource:
    """A Prometheus server's HTTP API (``/api/v1/query``)."""

    def __init__(self, url: str, *, timeout: float = PROMETHEUS_TIMEOUT_SECONDS) -> None:
        self.url = url.rstrip("/")
        self._client = httpx.AsyncClient(base_url=self.url, timeout=timeout)

    async def close(self) -> None:
        await self._client.aclose()

    async def query(self, promql: str) -> list[tuple[dict[str, str], float]]:
        """An instant vector: (labels, value) per series; NaN values are left out."""
        try:
            async with self._client.stream(
                "GET", "/api/v1/query", params={"query": promql}
            ) as answer:
                body = await _read_bounded(answer)
        except httpx.HTTPError as err:
            raise SourceError(
                f"cannot reach Prometheus at {self.url}: {err or type(err).__name__}"
            ) from err
        try:
            document = json.loads(body)
        except ValueError as err:
            raise SourceError(f"Prometheus at {self.url} did not answer with JSON") from err
        if answer.status_code >= 400 or document.get("status") != "success":
            reason = document.get("error", answer.status_code)
            raise SourceError(f"Prometheus refused the query {promql!r}: {reason}")
        result = document.get("data", {}).get("result", [])
        samples = []
        for series in result if isinstance(result, list) else []:
            try:
                value = float(series["value"][1])
            except (KeyError, IndexError, TypeError, ValueError):
                continue
            if not math.isnan(value):
                samples.append((dict(series.get("metric", {})), value))
        return samples


async def _read_bounded(answer: httpx.Response) -> bytes:
    chunks, size = [], 0
    async for chunk in answer.aiter_bytes():
        size += len(chunk)
        if size > MAX_ANSWER_BYTES:
            raise SourceError(f"an answer was larger than {MAX_ANSWER_BYTES} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _reason(status: int, body: bytes) -> str:
    """The admin API's own sentence (``{"error": {"message": ...}}``), else the status."""
    try:
        return str(json.loads(body)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return f"the server answered {status}"
