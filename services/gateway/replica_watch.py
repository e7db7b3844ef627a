"""In-flight engine waits per replica, so that one stream's news about a replica reaches the others.

A replica whose backend died (a dead Python-backend stub, an unloaded model, a stopping engine)
answers new requests with an error at once, but the streams already running on it just stop
receiving tokens: without this they would wait out the stall timeout (or, before their first
token, their whole deadline). When one attempt sees such a replica-wide fault, `trip` ends every
other wait on that replica at once; those attempts fail as replica faults and migrate.

Each attempt registers one `Wait` for its lifetime and points it at the `asyncio.Timeout` of its
current read (a fresh one per token: the stall timeout after the first token, none before), so
the per-token cost is one attribute store. Waits are bounded by the attempts in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

from services.gateway.faults import Fault

__all__ = ["ReplicaWatch", "Wait"]


class Wait:
    __slots__ = ("timeout", "tripped")

    def __init__(self) -> None:
        self.timeout: asyncio.Timeout | None = None  # the current read's, while one runs
        self.tripped: Fault | None = None  # set when another stream saw the replica fail


class ReplicaWatch:
    def __init__(self) -> None:
        self._waits: dict[str, set[Wait]] = {}

    @contextlib.contextmanager
    def attempt(self, replica_id: str) -> Iterator[Wait]:
        wait = Wait()
        waits = self._waits.setdefault(replica_id, set())
        waits.add(wait)
        try:
            yield wait
        finally:
            waits.discard(wait)
            if not waits:
                del self._waits[replica_id]

    def trip(self, replica_id: str, fault: Fault, source: Wait | None = None) -> int:
        """End every other wait on the replica now; how many were ended."""
        loop = asyncio.get_running_loop()
        ended = 0
        for wait in list(self._waits.get(replica_id, ())):
            if wait is source or wait.tripped is not None:
                continue
            wait.tripped = fault
            if wait.timeout is not None:
                wait.timeout.reschedule(loop.time())
            ended += 1
        return ended

    def in_flight(self, replica_id: str) -> int:
        return len(self._waits.get(replica_id, ()))
