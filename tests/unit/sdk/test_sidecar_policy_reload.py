"""Policy files reload without a restart: when they change, and on demand (SIGHUP)."""

from __future__ import annotations

import logging
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from sdk.policy import Policy
from sdk.sidecar.config import HostPort, InboundConfig, ListenerProtocol, ProxyConfig
from sdk.sidecar.proxy import Proxy
from sdk.sources import StaticX509Source
from tests.unit.sdk.conftest import WEB_ID, LoopThread, TestCA, wait_until
from tests.unit.sdk.test_sidecar_proxy import (
    OPS_ID,
    App,
    AppHandler,
    Running,
    port_of,
    read_response,
    source_for,
    tls_socket,
)

WEB_READS = f"""
[[allow]]
name = "web-reads"
ids = ["{WEB_ID}"]
methods = ["GET"]
"""
OPS_ONLY = f"""
[[allow]]
name = "ops-only"
ids = ["{OPS_ID}"]
"""


@pytest.fixture
def app() -> Iterator[App]:
    server = App(("127.0.0.1", 0), AppHandler)
    server.requests = []
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def policy_file(tmp_path: Path) -> Path:
    path = tmp_path / "policy.toml"
    path.write_text(WEB_READS)
    return path


@pytest.fixture
def proxy(loop_thread: LoopThread, app: App, api_source: StaticX509Source,
          policy_file: Path) -> Iterator[Running]:  # fmt: skip
    listener = InboundConfig(
        name="in", listen=HostPort("127.0.0.1", 0), forward=HostPort("127.0.0.1", port_of(app)),
        policy=Policy.load(policy_file), protocol=ListenerProtocol.HTTP, policy_file=policy_file,
    )  # fmt: skip
    config = ProxyConfig(source="proxy.toml", inbound=(listener,))
    running = Running(loop_thread, Proxy(config, api_source, policy_check_seconds=0.02))
    yield running
    running.stop()


def get(tls: object, stream: object) -> tuple[int, bytes]:
    tls.sendall(b"GET /api HTTP/1.1\r\nHost: api\r\n\r\n")  # type: ignore[attr-defined]
    status, _, body = read_response(stream)  # type: ignore[arg-type]
    return status, body


def test_an_edited_policy_file_takes_effect_and_a_broken_one_is_not_taken(
    proxy: Running, ca: TestCA, policy_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    web = source_for(ca, WEB_ID)
    with caplog.at_level(logging.INFO, logger="tessera.sidecar"), \
            tls_socket(web, proxy.port("in")) as tls:  # fmt: skip
        stream = tls.makefile("rb")
        assert get(tls, stream)[0] == 200

        policy_file.write_text(OPS_ONLY)
        wait_until(lambda: "reloaded the policy file" in caplog.text, "the reload")
        # The open connection keeps going; its next request meets the new policy.
        assert get(tls, stream) == (403, f"{WEB_ID} refused by policy rule 'default-deny': no "
                                    "allow rule matches it for GET /api\n".encode())  # fmt: skip

        policy_file.write_text("[[allow]\nids = oops")
        wait_until(lambda: "failed, so the policy loaded before stays" in caplog.text,
                   "the refused reload")  # fmt: skip
        assert get(tls, stream)[0] == 403  # still OPS_ONLY

    assert (f"in: reloaded the policy file {policy_file} (the file changed): 1 allow and 0 deny "
            "rules in enforce mode now judge new connections and the next requests"
            ) in caplog.text  # fmt: skip
    refused = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(refused) == 1
    assert refused[0].startswith(
        f"in: reloading the policy file {policy_file} (the file changed) failed, so the policy "
        f"loaded before stays in effect: in: {policy_file}: not valid TOML: "
    )


def test_reload_on_demand_reads_the_file_again(
    loop_thread: LoopThread, proxy: Running, ca: TestCA, policy_file: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    proxy.proxy._policy_check_seconds = 3600.0  # only the SIGHUP path now
    policy_file.write_text(OPS_ONLY)
    with caplog.at_level(logging.INFO, logger="tessera.sidecar"):
        loop_thread.loop.call_soon_threadsafe(proxy.proxy.reload_policies)
        wait_until(lambda: "(on SIGHUP)" in caplog.text, "the reload")

    with tls_socket(source_for(ca, WEB_ID), proxy.port("in")) as tls:
        assert get(tls, tls.makefile("rb"))[0] == 403


def test_a_tcp_listener_refuses_a_new_policy_with_methods(
    loop_thread: LoopThread, app: App, api_source: StaticX509Source, tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    path = tmp_path / "tcp-policy.toml"
    path.write_text(OPS_ONLY)
    listener = InboundConfig(
        name="tcp", listen=HostPort("127.0.0.1", 0), forward=HostPort("127.0.0.1", port_of(app)),
        policy=Policy.load(path), protocol=ListenerProtocol.TCP, policy_file=path,
    )  # fmt: skip
    running = Running(loop_thread, Proxy(ProxyConfig(source="p", inbound=(listener,)), api_source,
                                         policy_check_seconds=0.02))  # fmt: skip
    try:
        with caplog.at_level(logging.INFO, logger="tessera.sidecar"):
            path.write_text(textwrap.dedent(WEB_READS))
            wait_until(lambda: "stays in effect" in caplog.text, "the refused reload")
    finally:
        running.stop()

    assert ("tcp: reloading the policy file " in caplog.text
            and "stays in effect: tcp: policy rule 'web-reads' names methods or paths, which only "
            "HTTP requests have" in caplog.text)  # fmt: skip
    assert running.proxy.listeners[0].policy.allow[0].name == "ops-only"  # type: ignore[attr-defined]
