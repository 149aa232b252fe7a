"""A withdrawn identity: the sidecar drops the SVID, says why, refuses, and recovers by itself.

The Workload API here is the real server (``workload_api.server``) over a fake
agent; ``replace`` with no SVID makes it answer ``PERMISSION_DENIED`` "no
identity issued", as the agent does once the workload's entry is deleted.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from spiffe import SpiffeId

from sdk.authorize import authorize_id
from sdk.errors import SourceError
from sdk.integrations.httpx import httpx_client
from sdk.policy import Policy
from sdk.sidecar.connect import connect_x509_source
from sdk.sidecar.files import FilesSidecar
from sdk.sidecar.proxy import Proxy
from sdk.sources import StaticX509Source
from tests.support.pki import x509_svid_material
from tests.unit.sdk.conftest import WEB_ID, LoopThread, RunningWorkloadApi, TestCA, wait_until
from tests.unit.sdk.test_sidecar_proxy import (
    App,
    AppHandler,
    Running,
    inbound,
    outbound,
    port_of,
    source_for,
)
from workload_api.identity import X509Context

API_ID = "spiffe://example.org/api"
ALLOW_WEB = Policy.from_dict({"allow": [{"ids": [WEB_ID]}]})
DROPPED = "new connections, inbound and outbound, are refused until an SVID is issued again"


@pytest.fixture
def app() -> Iterator[App]:
    server = App(("127.0.0.1", 0), AppHandler)
    server.requests = []
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def no_identity_reason(api: RunningWorkloadApi, held: str, consequence: str = DROPPED) -> str:
    uid = os.getuid()
    return (
        f"the Workload API at {api.address} says this process has no identity "
        "(PERMISSION_DENIED): its registration entry was deleted or no longer matches it. "
        f"Dropped the SVID of {held}; {consequence}. Register an entry whose selectors match "
        f"this process (uid {uid}), e.g. --selector unix:uid:{uid}; the sidecar picks it up by "
        "itself"
    )


def withdraw(api: RunningWorkloadApi) -> None:
    api.replace(X509Context(svids=(), federated_bundles={}))


def errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


def test_the_source_drops_a_withdrawn_svid_and_takes_the_next_one(
    workload_api: RunningWorkloadApi, ca: TestCA, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="tessera.sidecar"), connect_x509_source(
        workload_api.address, spiffe_id=None, timeout=5, consequence=DROPPED, retry_seconds=0.2
    ) as source:
        first = source.x509_svid()
        assert source.no_identity() is None

        withdraw(workload_api)
        wait_until(lambda: source.no_identity() is not None, "the SVID being dropped")
        reason = no_identity_reason(workload_api, WEB_ID)
        assert source.no_identity() == reason
        with pytest.raises(SourceError) as caught:
            source.x509_svid()
        assert caught.value.message == reason
        assert source.problem() is None  # not fatal: it keeps asking
        wait_until(lambda: caplog.text.count("PERMISSION_DENIED") >= 1, "the ERROR")

        workload_api.replace(X509Context(svids=(x509_svid_material(ca, WEB_ID),),
                                         federated_bundles={}))  # fmt: skip
        wait_until(lambda: source.no_identity() is None, "the SVID coming back")
        assert source.x509_svid().leaf.serial_number != first.leaf.serial_number

    assert errors(caplog) == [reason]  # one ERROR, however often it asked meanwhile
    assert (f"the Workload API at {workload_api.address} issued an SVID for {WEB_ID} again; "
            "using it from now on") in caplog.text  # fmt: skip


def test_an_svid_no_longer_offered_is_dropped_too(
    workload_api: RunningWorkloadApi, ca: TestCA, caplog: pytest.LogCaptureFixture
) -> None:
    both = (x509_svid_material(ca, WEB_ID), x509_svid_material(ca, API_ID))
    workload_api.replace(X509Context(svids=both, federated_bundles={}))
    with caplog.at_level(logging.INFO, logger="tessera.sidecar"), connect_x509_source(
        workload_api.address, spiffe_id=SpiffeId(API_ID), timeout=5, retry_seconds=0.2
    ) as source:
        assert source.x509_svid().spiffe_id == SpiffeId(API_ID)
        workload_api.replace(X509Context(svids=(x509_svid_material(ca, WEB_ID),),
                                         federated_bundles={}))  # fmt: skip
        wait_until(lambda: source.no_identity() is not None, "the SVID being dropped")

    assert errors(caplog) == [
        f"the Workload API at {workload_api.address} no longer offers {API_ID} to this process "
        f"(it offers {WEB_ID}): its registration entry was deleted or no longer matches it. "
        "Dropped that SVID. Register the entry again, or pick one of those with --spiffe-id; "
        "the sidecar picks it up by itself"
    ]


def test_the_proxy_refuses_new_connections_both_ways_without_an_identity(
    loop_thread: LoopThread, workload_api: RunningWorkloadApi, app: App, ca: TestCA
) -> None:
    web = connect_x509_source(workload_api.address, spiffe_id=None, timeout=5, retry_seconds=0.2)
    api_source = source_for(ca, API_ID)
    server_side = Running(loop_thread, Proxy(inbound(port_of(app), policy=ALLOW_WEB), api_source))
    # web's sidecar: an inbound listener (web as a server) and an outbound one (web calling api)
    web_inbound = Running(loop_thread, Proxy(inbound(port_of(app), policy=ALLOW_WEB), web))
    web_outbound = Running(loop_thread, Proxy(outbound(server_side.port("in")), web))
    caller = StaticX509Source(ca.issue_x509_svid(WEB_ID), [ca.bundle()])
    try:
        def call_out() -> int:
            return httpx.get(f"http://127.0.0.1:{web_outbound.port('out')}/api", timeout=5
                             ).status_code  # fmt: skip

        def call_in() -> int:
            with httpx_client(caller, authorize_id(WEB_ID), timeout=5) as client:
                return client.get(f"https://127.0.0.1:{web_inbound.port('in')}/api").status_code

        assert (call_out(), call_in()) == (200, 200)

        withdraw(workload_api)
        wait_until(lambda: web.no_identity() is not None, "the SVID being dropped")
        with pytest.raises(httpx.HTTPError):
            call_out()
        with pytest.raises((httpx.HTTPError, ssl.SSLError)):
            call_in()
        for running, name in ((web_outbound, "out"), (web_inbound, "in")):
            wait_until(lambda r=running, n=name: r.sample(  # type: ignore[misc]
                "tessera_sidecar_handshake_failures_total", listener=n, reason="no_identity") == 1,
                "the refusal being counted")  # fmt: skip

        workload_api.replace(X509Context(svids=(x509_svid_material(ca, WEB_ID),),
                                         federated_bundles={}))  # fmt: skip
        wait_until(lambda: web.no_identity() is None, "the SVID coming back")
        assert (call_out(), call_in()) == (200, 200)
    finally:
        for running in (web_outbound, web_inbound, server_side):
            running.stop()
        web.close()


def test_the_files_sidecar_is_not_ready_and_leaves_the_files_until_an_svid_comes_back(
    tmp_path: Path, workload_api: RunningWorkloadApi, loop_thread: LoopThread, ca: TestCA
) -> None:
    directory = tmp_path / "out"
    consequence = f"the files in {directory} are left as they are"
    source = connect_x509_source(workload_api.address, spiffe_id=None, timeout=5,
                               consequence=consequence, retry_seconds=0.2)  # fmt: skip
    sidecar = FilesSidecar(source, directory)
    stop = asyncio.Event()
    running = asyncio.run_coroutine_threadsafe(sidecar.run(stop), loop_thread.loop)
    try:
        wait_until(lambda: sidecar.ready_problem() is None, "the first write")
        written = (directory / "svid.pem").read_bytes()

        withdraw(workload_api)
        wait_until(lambda: sidecar.ready_problem() is not None, "not ready")
        assert sidecar.ready_problem() == no_identity_reason(workload_api, WEB_ID, consequence)
        assert (directory / "svid.pem").read_bytes() == written
        assert sidecar.metrics.registry.get_sample_value(
            "tessera_sidecar_svid_write_failures_total") == 0  # fmt: skip

        rotated = x509_svid_material(ca, WEB_ID)
        workload_api.replace(X509Context(svids=(rotated,), federated_bundles={}))
        wait_until(lambda: sidecar.ready_problem() is None
                   and (directory / "svid.pem").read_bytes() != written, "the new SVID written")
        serial = x509.load_pem_x509_certificate((directory / "svid.pem").read_bytes()).serial_number
        assert serial == x509.load_der_x509_certificate(rotated.cert_chain_der).serial_number
    finally:
        loop_thread.loop.call_soon_threadsafe(stop.set)
        running.result(5)
        source.close()
