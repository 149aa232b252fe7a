"""How the sidecar reaches the Workload API, and what it says when that goes wrong.

::

    source = connect_x509_source("unix:///run/tessera/agent.sock",
                                 spiffe_id=SpiffeId("spiffe://example.org/api"), timeout=10,
                                 consequence="new connections are refused")
    snapshot = source.snapshot()        # the SVID and every bundle, from the same update
    stop = source.subscribe(on_change)  # called from the Workload API thread
    source.close()

The source is the SDK's :class:`sdk.sources.WorkloadApiX509Source`, so
:mod:`sdk.tls` contexts built on it follow every rotation. The sidecar builds
it to

- drop the SVID when the Workload API withdraws it, logging one ERROR on the
  ``tessera.sidecar`` logger that says why, what the sidecar does meanwhile
  (``consequence``) and what to do (:func:`withdrawal_in_words`);
- wait up to ``timeout`` seconds at start for the socket to appear and for
  the first SVID, then fail with a sentence saying what to do: the agent is
  not running, this process has no identity, or it has no SVID for
  ``spiffe_id``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final

import grpc  # type: ignore[import-untyped]
import spiffe
from spiffe.errors import PySpiffeError

from sdk.errors import SourceError
from sdk.sources import (
    ENDPOINT_SOCKET_ENV,
    RETRY_SECONDS,
    Withdrawal,
    WorkloadApiX509Source,
    workload_api_address,
    workload_api_status,
)
from sdk.spiffeid import SpiffeId

__all__ = ["connect_x509_source", "withdrawal_in_words"]

_log = logging.getLogger("tessera.sidecar")

_POLL_SECONDS: Final = 0.1
_PROBE_SECONDS: Final = 2.0


def connect_x509_source(
    socket: str | None,
    *,
    spiffe_id: SpiffeId | None = None,
    timeout: float = 10.0,
    consequence: str = "",
    socket_setting: str = "--socket",
    retry_seconds: float = RETRY_SECONDS,
) -> WorkloadApiX509Source:
    """Wait up to ``timeout`` seconds for the socket and the first SVID; SourceError says why not.

    ``socket`` is ``unix:///path`` or a path; None means ``$SPIFFE_ENDPOINT_SOCKET``. Messages
    name ``socket_setting`` (the flag or config key the user sets) for it. The source drops a
    withdrawn SVID and says so in the sidecar's words, ending with ``consequence``.
    """
    if not (socket or os.environ.get(ENDPOINT_SOCKET_ENV)):
        raise SourceError(
            f"no Workload API socket: pass {socket_setting} or set ${ENDPOINT_SOCKET_ENV}, e.g. "
            "unix:///run/tessera/agent.sock"
        )
    address = workload_api_address(socket)
    path = _socket_path(address)
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() >= deadline:
            raise SourceError(
                f"no Tessera agent is listening on {path} (waited {timeout:g}s); start one with "
                "'tessera agent run', or pass its socket with --socket"
            )
        time.sleep(_POLL_SECONDS)
    remaining = max(deadline - time.monotonic(), 0.1)
    try:
        return WorkloadApiX509Source(
            address,
            spiffe_id=spiffe_id,
            timeout=remaining,
            drop_withdrawn=True,
            explain_withdrawal=withdrawal_in_words(consequence),
            retry_seconds=retry_seconds,
            logger=_log,
        )
    except (SourceError, PySpiffeError) as err:
        raise SourceError(_diagnose(address, path, spiffe_id, timeout)) from err


def withdrawal_in_words(consequence: str = "") -> Callable[[Withdrawal], str]:
    """The sidecar's sentence for a withdrawn SVID: why, what it does meanwhile, what to do."""
    then = f"; {consequence}" if consequence else ""

    def explain(withdrawal: Withdrawal) -> str:
        if not withdrawal.offered:
            uid = os.getuid()
            return (
                f"the Workload API at {withdrawal.address} says this process has no identity "
                "(PERMISSION_DENIED): its registration entry was deleted or no longer matches "
                f"it. Dropped the SVID of {withdrawal.spiffe_id or 'its SVID'}{then}. Register "
                f"an entry whose selectors match this process (uid {uid}), e.g. --selector "
                f"unix:uid:{uid}; the sidecar picks it up by itself"
            )
        offered = ", ".join(str(spiffe_id) for spiffe_id in withdrawal.offered)
        return (
            f"the Workload API at {withdrawal.address} no longer offers {withdrawal.spiffe_id} "
            f"to this process (it offers {offered}): its registration entry was deleted or no "
            f"longer matches it. Dropped that SVID{then}. Register the entry again, or pick "
            "one of those with --spiffe-id; the sidecar picks it up by itself"
        )

    return explain


def _socket_path(address: str) -> Path:
    rest = address.removeprefix("unix://").removeprefix("unix:")
    if not rest.startswith("/"):
        raise SourceError(
            f"the Workload API socket {address!r} is not an absolute path; write "
            "unix:///absolute/path/agent.sock"
        )
    return Path(rest)


def _diagnose(address: str, path: Path, spiffe_id: SpiffeId | None, timeout: float) -> str:
    """Why no SVID came: ask the Workload API once and read its status."""
    uid = os.getuid()
    try:
        client = spiffe.WorkloadApiClient(socket_path=address, default_timeout=_PROBE_SECONDS)
        with client:
            svids = client.fetch_x509_svids()
    except PySpiffeError as err:
        code = workload_api_status(err)
        if code == grpc.StatusCode.PERMISSION_DENIED:
            return (
                f"the agent on {path} has no identity for this process (uid {uid}); register "
                f"an entry whose selectors match it, e.g. --selector unix:uid:{uid}"
            )
        return (
            f"cannot get an X509-SVID from the agent on {path} within {timeout:g}s "
            f"({code.name if code else err}); check that 'tessera agent run' is running"
        )
    offered = ", ".join(str(s.spiffe_id) for s in svids) or "none"
    if spiffe_id is not None and all(s.spiffe_id != spiffe_id for s in svids):
        return (
            f"the agent on {path} has no SVID for {spiffe_id} for this process (uid {uid}; it "
            f"offers {offered}); register an entry for {spiffe_id} whose selectors match this "
            "process, or pick one of those with --spiffe-id"
        )
    return (
        f"the agent on {path} sent no X509-SVID within {timeout:g}s; try again, or give it "
        "longer with --timeout"
    )
