"""An HTTP inbound answers a refusal with the decision's status and response fields (a
rate limit's 429), and keeps the connection as it does for a 403."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest

from sdk.policy import Decision
from sdk.sidecar.proxy import Proxy
from sdk.sources import StaticX509Source
from tests.unit.sdk.conftest import WEB_ID, LoopThread, TestCA
from tests.unit.sdk.test_sidecar_proxy import (
    App,
    AppHandler,
    Running,
    inbound,
    port_of,
    read_response,
    source_for,
    tls_socket,
)


@pytest.fixture
def upstream() -> Iterator[App]:
    server = App(("127.0.0.1", 0), AppHandler)
    server.requests = []
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


class Every3rd:
    """Allows the caller, then refuses every third request with 429."""

    def __init__(self) -> None:
        self.requests = 0

    def decide(self, peer_id: Any, method: str | None = None, path: str | None = None
               ) -> Decision:  # fmt: skip
        if method is None:
            return Decision(True, "caller", "any caller")
        self.requests += 1
        if self.requests % 3:
            return Decision(True, "limit", "within the limit")
        return Decision(False, "RateLimit web spec", "too many requests", status=429,
                        headers=(("x-envoy-ratelimited", "true"),))  # fmt: skip

    def at_handshake(self) -> Every3rd:
        return self


def test_a_refusal_is_answered_with_its_status_and_fields_on_the_same_connection(
    loop_thread: LoopThread, upstream: App, ca: TestCA, api_source: StaticX509Source
) -> None:
    proxy = Proxy(inbound(port_of(upstream)), api_source, judges={"in": Every3rd()})
    running = Running(loop_thread, proxy)
    try:
        with tls_socket(source_for(ca, WEB_ID), running.port("in")) as tls:
            stream = tls.makefile("rb")
            answers = []
            for _ in range(4):
                tls.sendall(b"GET /api/items HTTP/1.1\r\nHost: api\r\n\r\n")
                answers.append(read_response(stream))
    finally:
        running.stop()

    assert [status for status, _, _ in answers] == [200, 200, 429, 200]
    _, headers, body = answers[2]
    assert headers["x-envoy-ratelimited"] == "true"
    assert headers["connection"] == "keep-alive"
    assert body == (
        f"{WEB_ID} refused by policy rule 'RateLimit web spec': too many requests\n".encode()
    )
    assert len(upstream.requests) == 3
    assert running.sample("tessera_sidecar_decisions_total", listener="in", stage="request",
                          rule="RateLimit web spec", result="refused") == 1  # fmt: skip
