"""The server's periodic work, driven by a manual clock."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from ca.config import server_config
from ca.datastore.records import IssuedSvid
from ca.server import Server
from sdk.clock import ManualClock
from tests.unit.ca.conftest import START


def test_the_tick_lets_expired_issuance_records_go_after_a_day(tmp_path: Path) -> None:
    clock = ManualClock(START)
    server = Server(server_config({"trust_domain": "example.org", "data_dir": str(tmp_path),
                                   "key_manager": {"memory": {}}}), clock=clock)
    try:
        server.store.record_issued_svids([
            IssuedSvid(serial="0a", spiffe_id="spiffe://example.org/old", kind="x509",
                       agent_id=None, authority_id="x", expires_at=START + timedelta(hours=1)),
            IssuedSvid(serial="0b", spiffe_id="spiffe://example.org/new", kind="x509",
                       agent_id=None, authority_id="x", expires_at=START + timedelta(days=2)),
        ])
        server._tick_once()
        assert server.store.count_issued_svids() == 2
        clock.advance(timedelta(days=1, hours=2))  # the first expired a day and an hour ago
        server._next_count = 0.0  # due now, as 15 s would have made it
        server._tick_once()
        assert server.store.count_issued_svids() == 1
    finally:
        server.store.close()
