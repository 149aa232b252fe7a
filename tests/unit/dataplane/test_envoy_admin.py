"""The admin client against a small server that answers as Envoy's admin does (or not)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import pytest

from dataplane.envoy import EnvoyAdmin, EnvoyAdminError

T = TypeVar("T")
Answer = Callable[[bytes], bytes | None]  # the request head -> the raw answer (None: silence)


def against(tmp_path: Path, answer: Answer, call: Callable[[EnvoyAdmin], Awaitable[T]],
            **bounds: float) -> tuple[T, list[bytes]]:  # fmt: skip
    """Run ``call`` with a client of a server on a Unix socket answering with ``answer``;
    its result and the request heads the server read."""
    socket = tmp_path / "admin.sock"
    heads: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        heads.append(head)
        raw = answer(head)
        if raw is None:
            await reader.read()  # until the client gives up
        else:
            writer.write(raw)
            await writer.drain()
        writer.close()

    async def main() -> T:
        server = await asyncio.start_unix_server(serve, socket)
        async with server:
            return await call(EnvoyAdmin.unix(socket, **bounds))

    return asyncio.run(main()), heads


def test_a_chunked_json_answer_is_read_whole(tmp_path: Path) -> None:
    body = (b'{"listener_statuses": [{"name": "inbound", "local_address": '
            b'{"socket_address": {"address": "127.0.0.1", "port_value": 15006}}}, '
            b'{"name": "admin-less"}]}')  # fmt: skip
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in (body[:20], body[20:]))
    raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunks + b"0\r\n\r\n"

    listeners, heads = against(tmp_path, lambda head: raw, lambda admin: admin.listeners())

    assert listeners == {"inbound": "127.0.0.1:15006", "admin-less": ""}
    assert heads[0].startswith(b"GET /listeners?format=json HTTP/1.1\r\n")
    assert b"Connection: close\r\n" in heads[0]


def test_stats_are_flattened_and_the_filter_quoted(tmp_path: Path) -> None:
    body = (b'{"stats": [{"name": "listener_manager.total_listeners_warming", "value": 1},'
            b'{"name": "listener_manager.lds.version_text", "value": "7"},'
            b'{"histograms": {"computed_quantiles": []}}]}')  # fmt: skip
    raw = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)

    stats, heads = against(tmp_path, lambda head: raw,
                           lambda admin: admin.stats(r"^listener_manager\."))  # fmt: skip

    assert stats == {"listener_manager.total_listeners_warming": 1,
                     "listener_manager.lds.version_text": "7"}  # fmt: skip
    assert heads[0].startswith(b"GET /stats?format=json&filter=%5Elistener_manager%5C. ")


def test_a_refusal_names_the_request_and_envoys_words(tmp_path: Path) -> None:
    raw = b"HTTP/1.1 404 Not Found\r\nContent-Length: 15\r\n\r\ninvalid path\r\n\r\n"

    with pytest.raises(EnvoyAdminError) as caught:
        against(tmp_path, lambda head: raw, lambda admin: admin.drain_listeners())

    assert str(caught.value) == (
        f"Envoy's admin (unix:{tmp_path}/admin.sock) answered POST /drain_listeners?graceful "
        "with 404: invalid path"
    )


def test_an_answer_larger_than_the_bound_is_an_error(tmp_path: Path) -> None:
    body = b"x" * 2000
    raw = b"HTTP/1.1 200 OK\r\n\r\n" + body  # ends with the connection

    with pytest.raises(EnvoyAdminError) as caught:
        against(tmp_path, lambda head: raw, lambda admin: admin.prometheus_stats(),
                max_bytes=1000)  # fmt: skip

    assert str(caught.value) == (
        f"Envoy's admin (unix:{tmp_path}/admin.sock) answered with more than 1000 bytes, the "
        "most this client reads"
    )


def test_silence_is_an_error_after_the_timeout(tmp_path: Path) -> None:
    with pytest.raises(EnvoyAdminError) as caught:
        against(tmp_path, lambda head: None, lambda admin: admin.server_state(), timeout=0.05)

    assert str(caught.value) == (
        f"Envoy's admin (unix:{tmp_path}/admin.sock) did not answer GET /ready within 0.05 s"
    )


def test_nothing_listening_is_an_error(tmp_path: Path) -> None:
    async def call() -> None:
        await EnvoyAdmin.unix(tmp_path / "gone.sock").clusters()

    with pytest.raises(EnvoyAdminError) as caught:
        asyncio.run(call())

    assert str(caught.value) == (
        f"cannot reach Envoy's admin (unix:{tmp_path}/gone.sock) for GET /clusters?format=json: "
        "No such file or directory"
    )
