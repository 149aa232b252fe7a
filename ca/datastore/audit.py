"""The audit log's hash chain: tampering with a stored event is detectable.

Each event stores ``prev_hash`` (the hash of the event before it) and
``hash = sha256(prev_hash, id, at, actor, action, target, details)`` over a
canonical JSON encoding. A head row remembers the newest event and its hash,
so deleting the newest events shows too. Editing a row without fixing its
hash breaks that row; fixing its hash breaks the link from the next row.

    digest = event_digest(prev_hash, event_id, at, actor, action, target, details)
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

GENESIS = ""


def event_digest(
    prev_hash: str,
    event_id: int,
    at: datetime,
    actor: str,
    action: str,
    target: str,
    details: Mapping[str, Any],
) -> str:
    document = {
        "prev": prev_hash,
        "id": event_id,
        "at": at.astimezone(UTC).isoformat(timespec="microseconds"),
        "actor": actor,
        "action": action,
        "target": target,
        "details": details,
    }
    encoded = json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(encoded.encode()).hexdigest()
