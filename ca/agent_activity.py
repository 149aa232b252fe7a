"""When each agent was last heard from: the time of its last authenticated node API request.

Kept in memory by the server that answered (no write per sync): with several servers
sharing a database, each knows its own agents' contacts. Bounded: past
:data:`MAX_AGENTS` the agents heard from longest ago are forgotten first::

    activity = AgentActivity(clock)
    activity.seen("spiffe://example.org/spire/agent/join_token/...")   # node API
    activity.last_seen(spiffe_id)                                        # admin API
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from datetime import datetime

from sdk.clock import Clock

MAX_AGENTS = 100_000


class AgentActivity:
    def __init__(self, clock: Clock, *, limit: int = MAX_AGENTS) -> None:
        self._clock = clock
        self._limit = limit
        self._seen: OrderedDict[str, datetime] = OrderedDict()
        self._lock = threading.Lock()  # the node API records from its worker threads too

    def seen(self, spiffe_id: str) -> None:
        """``spiffe_id`` made an authenticated request now."""
        now = self._clock.now()
        with self._lock:
            self._seen[spiffe_id] = now
            self._seen.move_to_end(spiffe_id)
            if len(self._seen) > self._limit:
                self._seen.popitem(last=False)

    def last_seen(self, spiffe_id: str) -> datetime | None:
        return self._seen.get(spiffe_id)
