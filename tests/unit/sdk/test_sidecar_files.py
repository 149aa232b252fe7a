"""``tessera sidecar files``: atomic SVID files, reload actions, and the watch-and-write loop."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import stat
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from spiffe import SpiffeId

from sdk.errors import SourceError
from sdk.sidecar import svid_files
from sdk.sidecar.cli import _reload
from sdk.sidecar.connect import connect_x509_source
from sdk.sidecar.errors import SidecarConfigError, SidecarError
from sdk.sidecar.files import FilesSidecar
from sdk.sidecar.reload import command_reload, parse_signal, signal_reload
from sdk.sidecar.svid_files import write_svid_files
from sdk.sources import FileX509Source, X509Snapshot
from tests.support.pki import x509_svid_material
from tests.unit.sdk.conftest import (
    PARTNER_DOMAIN,
    WEB_ID,
    LoopThread,
    RunningWorkloadApi,
    TestCA,
    wait_until,
)
from workload_api.identity import X509Context

API_ID = "spiffe://example.org/api"


def snapshot(ca: TestCA, spiffe_id: str = WEB_ID, *others: TestCA) -> X509Snapshot:
    return X509Snapshot(ca.issue_x509_svid(spiffe_id), (ca.bundle(), *(o.bundle() for o in others)))


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# -- writing -------------------------------------------------------------------------------


def test_the_files_hold_the_svid_its_key_and_the_own_bundle(tmp_path: Path, ca: TestCA) -> None:
    intermediate = ca.intermediate()
    state = snapshot(intermediate)

    written = write_svid_files(tmp_path / "svid", state)

    directory = tmp_path / "svid"
    chain = x509.load_pem_x509_certificates((directory / "svid.pem").read_bytes())
    assert chain == list(state.svid.cert_chain) and len(chain) == 2
    key = serialization.load_pem_private_key((directory / "svid.key").read_bytes(), None)
    assert key.public_key() == state.svid.leaf.public_key()
    assert (directory / "svid.key").read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    bundle = x509.load_pem_x509_certificates((directory / "bundle.pem").read_bytes())
    assert bundle == [ca.certificate]
    assert (mode(directory / "svid.key"), mode(directory / "svid.pem"),
            mode(directory / "bundle.pem")) == (0o600, 0o644, 0o644)
    assert list((directory / "federated").iterdir()) == []
    assert written.spiffe_id == SpiffeId(WEB_ID)
    assert written.as_json() == {
        "event": "written",
        "spiffe_id": WEB_ID,
        "serial": f"{state.svid.leaf.serial_number:x}",
        "not_after": state.svid.leaf.not_valid_after_utc.isoformat(),
        "directory": str(directory),
        "files": [str(directory / n) for n in ("bundle.pem", "svid.key", "svid.pem")],
        "federated_trust_domains": [],
    }
    with FileX509Source(directory, poll_interval=None) as source:
        assert source.x509_svid().leaf == state.svid.leaf


def test_federated_bundles_get_a_file_each_apart_from_bundle_pem(
    tmp_path: Path, ca: TestCA, partner_ca: TestCA
) -> None:
    written = write_svid_files(tmp_path, snapshot(ca, WEB_ID, partner_ca))

    federated = tmp_path / "federated" / f"{PARTNER_DOMAIN}.pem"
    assert x509.load_pem_x509_certificates(federated.read_bytes()) == [partner_ca.certificate]
    bundle = x509.load_pem_x509_certificates((tmp_path / "bundle.pem").read_bytes())
    assert bundle == [ca.certificate]
    assert written.as_json()["federated_trust_domains"] == [PARTNER_DOMAIN]
    with FileX509Source(tmp_path, federated_bundles={PARTNER_DOMAIN: federated},
                        poll_interval=None) as source:
        assert {b.trust_domain.name for b in source.x509_bundles()} == {"example.org",
                                                                        PARTNER_DOMAIN}


def test_the_names_are_links_into_one_generation_switched_at_once(
    tmp_path: Path, ca: TestCA
) -> None:
    write_svid_files(tmp_path, snapshot(ca))
    first = os.readlink(tmp_path / ".tessera-svid")
    write_svid_files(tmp_path, snapshot(ca))
    second = os.readlink(tmp_path / ".tessera-svid")
    state = snapshot(ca)
    write_svid_files(tmp_path, state)
    third = os.readlink(tmp_path / ".tessera-svid")

    for name in ("svid.pem", "svid.key", "bundle.pem", "federated"):
        assert os.readlink(tmp_path / name) == f".tessera-svid/{name}"
    generations = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".tessera-svid-"))
    assert generations == sorted([second, third])  # the one before is kept, older ones go
    assert first not in generations
    key = serialization.load_pem_private_key((tmp_path / "svid.key").read_bytes(), None)
    assert key.public_key() == state.svid.leaf.public_key()


def test_a_failed_write_leaves_the_previous_files_whole(
    tmp_path: Path, ca: TestCA, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = snapshot(ca)
    write_svid_files(tmp_path, before)
    current = os.readlink(tmp_path / ".tessera-svid")
    real_write = svid_files._write_synced

    def failing(path: Path, content: bytes, mode: int) -> None:
        if path.name == "svid.key":
            raise OSError(28, "No space left on device")
        real_write(path, content, mode)

    monkeypatch.setattr(svid_files, "_write_synced", failing)
    with pytest.raises(OSError, match="No space left on device"):
        write_svid_files(tmp_path, snapshot(ca))

    assert os.readlink(tmp_path / ".tessera-svid") == current
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tessera-svid-")] == [current]
    assert (tmp_path / "svid.pem").read_bytes() == before.svid.leaf.public_bytes(
        serialization.Encoding.PEM)
    with FileX509Source(tmp_path, poll_interval=None) as source:  # still a matching pair
        assert source.x509_svid().leaf == before.svid.leaf


def test_regular_files_from_before_are_replaced_by_the_links(tmp_path: Path, ca: TestCA) -> None:
    (tmp_path / "svid.pem").write_text("old")
    write_svid_files(tmp_path, snapshot(ca))
    assert (tmp_path / "svid.pem").is_symlink()


def test_a_directory_in_the_way_is_refused(tmp_path: Path, ca: TestCA) -> None:
    (tmp_path / "federated").mkdir()
    with pytest.raises(SidecarError) as caught:
        write_svid_files(tmp_path, snapshot(ca))
    assert caught.value.message == (
        f"{tmp_path / 'federated'} is a directory, so it cannot become the link to the SVID "
        "files; move it away or give --dir a directory of its own"
    )


def test_an_svid_without_its_own_bundle_is_refused(
    tmp_path: Path, ca: TestCA, partner_ca: TestCA
) -> None:
    state = X509Snapshot(ca.issue_x509_svid(WEB_ID), (partner_ca.bundle(),))
    with pytest.raises(SidecarError) as caught:
        write_svid_files(tmp_path, state)
    assert caught.value.message == (
        "the Workload API sent no X.509 bundle for trust domain example.org, so bundle.pem "
        "cannot be written"
    )
    assert list(tmp_path.iterdir()) == []


# -- reloading -----------------------------------------------------------------------------


def test_a_command_runs_without_a_shell(tmp_path: Path) -> None:
    marker = tmp_path / "it ran; rm -rf x"
    reload = command_reload(f"touch '{marker}'")
    assert asyncio.run(reload()) is True
    assert marker.exists()


def test_a_failing_command_is_logged_and_reported(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    script = 'import sys; print("bad config"); sys.exit(3)'
    failing = command_reload(f"{sys.executable} -c '{script}'")
    missing = command_reload(str(tmp_path / "no-such-program"))
    with caplog.at_level(logging.WARNING, logger="tessera.sidecar"):
        assert asyncio.run(failing()) is False
        assert asyncio.run(missing()) is False
    messages = [r.getMessage() for r in caplog.records]
    assert messages[0].endswith("exited 3: bad config")
    missing_path = str(tmp_path / "no-such-program")
    assert messages[1] == f"cannot run {missing_path!r}: No such file or directory"


def test_a_slow_command_is_killed(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    slow = command_reload(f"{sys.executable} -c 'import time; time.sleep(30)'", timeout=0.2)
    with caplog.at_level(logging.WARNING, logger="tessera.sidecar"):
        assert asyncio.run(slow()) is False
    assert "did not finish within 0.2s; killed it" in caplog.text


@pytest.mark.parametrize(
    ("command", "message"),
    [
        ("nginx -s 'reload", "--cmd \"nginx -s 'reload\" cannot be split into words: "
         "No closing quotation"),
        ("  ", "--cmd is empty; give the command to run, e.g. 'nginx -s reload'"),
    ],
)
def test_bad_commands_are_refused_at_start(command: str, message: str) -> None:
    with pytest.raises(SidecarConfigError) as caught:
        command_reload(command)
    assert caught.value.message == message


@pytest.mark.parametrize(
    ("command", "signal_name", "pid_file", "message"),
    [
        ("true", "HUP", None, "give either --cmd, or --signal with --pid-file, not both; the "
         "sidecar does one thing after each write"),
        (None, "HUP", None, "--signal needs --pid-file, the file holding the pid to signal"),
        (None, None, "x.pid", "--pid-file needs --signal, the signal to send, e.g. SIGHUP"),
    ],
)
def test_the_reload_flags_go_together(
    command: str | None, signal_name: str | None, pid_file: str | None, message: str
) -> None:
    with pytest.raises(SidecarConfigError) as caught:
        _reload(command, signal_name, pid_file)
    assert caught.value.message == message


def test_signal_names() -> None:
    assert parse_signal("SIGHUP") is signal.SIGHUP
    assert parse_signal("hup") is signal.SIGHUP
    assert parse_signal("10") is signal.Signals(10)
    with pytest.raises(SidecarConfigError) as caught:
        parse_signal("SIGNOPE")
    assert caught.value.message == (
        "--signal 'SIGNOPE' is not a signal; give a name such as SIGHUP, SIGUSR1 or SIGTERM"
    )


def test_a_signal_goes_to_the_pid_in_the_pid_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    received = threading.Event()
    previous = signal.signal(signal.SIGUSR1, lambda *_: received.set())
    pid_file = tmp_path / "app.pid"
    reload = signal_reload("SIGUSR1", pid_file)
    try:
        with caplog.at_level(logging.WARNING, logger="tessera.sidecar"):
            assert asyncio.run(reload()) is False  # no pid file yet
            pid_file.write_text("nonsense\n")
            assert asyncio.run(reload()) is False
        pid_file.write_text(f"{os.getpid()}\n")
        assert asyncio.run(reload()) is True
        assert received.wait(5)
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert [r.getMessage() for r in caplog.records] == [
        f"cannot read the pid file {pid_file}: No such file or directory; no SIGUSR1 sent",
        f"the pid file {pid_file} holds 'nonsense', not a pid; no SIGUSR1 sent",
    ]


# -- the loop, against a real Workload API ------------------------------------------------


class Recorder:
    def __init__(self) -> None:
        self.written: list[dict[str, Any]] = []
        self.reloads = 0

    def on_written(self, written: Any) -> None:
        self.written.append(written.as_json())

    async def reload(self) -> bool:
        self.reloads += 1
        return True


def test_the_files_follow_rotations_and_reload_each_time(
    tmp_path: Path, workload_api: RunningWorkloadApi, loop_thread: LoopThread, ca: TestCA
) -> None:
    directory = tmp_path / "out"
    recorder = Recorder()
    source = connect_x509_source(workload_api.address, spiffe_id=None, timeout=5)
    sidecar = FilesSidecar(source, directory, reload=recorder.reload,
                           on_written=recorder.on_written)  # fmt: skip
    stop = asyncio.Event()
    running = asyncio.run_coroutine_threadsafe(sidecar.run(stop), loop_thread.loop)
    try:
        wait_until(lambda: len(recorder.written) == 1, "the first write")
        assert sidecar.ready_problem() is None
        first = x509.load_pem_x509_certificate((directory / "svid.pem").read_bytes())

        workload_api.replace(X509Context(svids=(x509_svid_material(ca, WEB_ID),),
                                         federated_bundles={}))  # fmt: skip
        wait_until(lambda: len(recorder.written) == 2, "the write after the rotation")
        second = x509.load_pem_x509_certificate((directory / "svid.pem").read_bytes())
        assert second.serial_number != first.serial_number
        assert recorder.written[1]["serial"] == f"{second.serial_number:x}"
        assert recorder.reloads == 2
        registry = sidecar.metrics.registry
        assert registry.get_sample_value("tessera_sidecar_svid_writes_total") == 2
        assert registry.get_sample_value("tessera_sidecar_svid_expiry_timestamp_seconds") == (
            second.not_valid_after_utc.timestamp())
        assert json.loads(json.dumps(recorder.written[1]))["spiffe_id"] == WEB_ID
    finally:
        loop_thread.loop.call_soon_threadsafe(stop.set)
        running.result(5)
        source.close()


def test_the_svid_named_is_the_one_written(
    tmp_path: Path, workload_api: RunningWorkloadApi, ca: TestCA
) -> None:
    both = (x509_svid_material(ca, WEB_ID), x509_svid_material(ca, API_ID))
    workload_api.replace(X509Context(svids=both, federated_bundles={}))
    with connect_x509_source(workload_api.address, spiffe_id=SpiffeId(API_ID), timeout=5) as source:
        wait_until(lambda: source.x509_svid().spiffe_id == SpiffeId(API_ID), "the api SVID")
        written = write_svid_files(tmp_path, source.snapshot())
    assert written.spiffe_id == SpiffeId(API_ID)


# -- connecting ----------------------------------------------------------------------------


def test_connecting_says_what_is_wrong(tmp_path: Path, workload_api: RunningWorkloadApi) -> None:
    missing = tmp_path / "none.sock"
    with pytest.raises(SourceError) as caught:
        connect_x509_source(str(missing), timeout=0)
    assert caught.value.message == (
        f"no Tessera agent is listening on {missing} (waited 0s); start one with 'tessera agent "
        "run', or pass its socket with --socket"
    )

    with pytest.raises(SourceError) as caught:
        connect_x509_source(workload_api.address, spiffe_id=SpiffeId(API_ID), timeout=5)
    assert caught.value.message == (
        f"the agent on {workload_api.socket_path} has no SVID for {API_ID} for this process "
        f"(uid {os.getuid()}; it offers {WEB_ID}); register an entry for {API_ID} whose "
        "selectors match this process, or pick one of those with --spiffe-id"
    )

    with connect_x509_source(workload_api.address, timeout=5) as source:
        assert source.x509_svid().spiffe_id == SpiffeId(WEB_ID)
        assert source.problem() is None


def test_without_a_socket_the_message_names_the_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SPIFFE_ENDPOINT_SOCKET", raising=False)
    with pytest.raises(SourceError) as caught:
        connect_x509_source(None, timeout=0)
    assert caught.value.message == (
        "no Workload API socket: pass --socket or set $SPIFFE_ENDPOINT_SOCKET, e.g. "
        "unix:///run/tessera/agent.sock"
    )
