"""The issuance bench counts every SVID its connections received, and fails when the
datastore holds a different number."""

from __future__ import annotations

import asyncio
import json

import pytest

from bench.issuance import MAX_SMALL_BODIES, Case, Recorded, _bodies, drive_for


def test_every_connection_s_svids_are_counted() -> None:
    answered = 0

    async def once() -> int:
        nonlocal answered
        await asyncio.sleep(0)  # the other connection's loop runs meanwhile
        answered += 1
        return 10

    issued = asyncio.run(drive_for(0.05, 2, once))
    assert answered > 2
    assert issued == 10 * answered


def test_a_count_the_datastore_does_not_match_fails_the_bench() -> None:
    Recorded("SQLite", issued=12_000, rows=12_000, audited=12_000).check()
    with pytest.raises(RuntimeError) as raised:
        Recorded("SQLite", issued=6_000, rows=12_000, audited=12_000).check()
    assert str(raised.value) == (
        "SQLite: the bench received 6,000 X509-SVIDs but the datastore holds 12,000 in "
        "issued_svids and names 12,000 in x509svid.issue audit events")
    with pytest.raises(RuntimeError, match="holds 12,000 in issued_svids and names 11,500"):
        Recorded("SQLite", issued=12_000, rows=12_000, audited=11_500).check()


def test_requests_of_one_csr_take_turns_over_the_entries_and_a_big_batch_signs_them_all(
) -> None:  # fmt: skip
    entries: list[dict[str, object]] = [
        {"id": f"e{n}", "spiffe_id": f"spiffe://bench.test/workload/{n}"} for n in range(500)]

    small = _bodies(entries, Case(batch=1, connections=16, seconds=1, target=0))
    big = _bodies(entries, Case(batch=500, connections=2, seconds=1, target=0))

    assert [[r["entry_id"] for r in json.loads(b)["requests"]] for b in small] == [
        [f"e{n}"] for n in range(MAX_SMALL_BODIES)]
    [body] = big
    assert [r["entry_id"] for r in json.loads(body)["requests"]] == [f"e{n}" for n in range(500)]
