"""In-flight engine reads per replica: the stall timeout, and one stream's news about a replica
reaching the others.

A replica whose backend died (a dead Python-backend stub, an unloaded model, a stopping engine)
answers new requests with an error at once, but the streams already running on it just stop
receiving tokens: without this they would wait out the stall timeout (or, before their first
token, their whole deadline). When one attempt sees such a replica-wide fault, `trip` ends every
other wait on that replica at once (of the attempt's model only, when the fault is that model's:
its stub died, it was unloaded); those attempts fail as replica faults and migrate.

Each attempt registers one `Wait` for its lifetime and brackets every read with `reading` and
`idle`. The stall bound is one timer per attempt, not one per read: it fires at the earliest time
the current read could have stalled, and re-arms from the read's start when a token came in the
meantime. A read costs two attribute stores and a clock read, not an `asyncio.Timeout` (a timer
handle, a heap push and a `getpid` per token); the stall is still measured from each read's own
start, and never counts time the stream spent handing a token to its client.

Invariant: a wait cancels its task only while that task is suspended in a read it bracketed (the
timer and `trip` run on the loop, so the task is not running then), and `interrupted` tells that
cancellation apart from anyone else's (the task's cancel count, as `asyncio.Timeout` does). Waits
are bounded by the attempts in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

from services.gateway.faults import Fault

__all__ = ["STALLED", "ReplicaWatch", "Wait"]

# `Wait.interrupted` when the stall bound ended the read (else the tripping fault)
STALLED = "stalled"
# A loop may run a timer up to a clock tick before its time (uvloop: whole milliseconds); a
# read that close to its bound counts as stalled rather than re-arming the timer at once.
_EARLY_S = 0.001


class Wait:
    __slots__ = (
        "_cancelling",
        "_fired",
        "_loop",
        "_reading",
        "_since",
        "_stall",
        "_task",
        "_timer",
        "model",
        "tripped",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop, model: str) -> None:
        self._loop = loop
        self.model = model  # the Triton model the attempt streams from
        self.tripped: Fault | None = None  # set when another stream saw the replica fail
        self._stall: float | None = None  # the bound on one read (None: unbounded)
        self._timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[object] | None = None  # the task of the current read
        self._reading = False
        self._since = 0.0  # the current read's start (loop time)
        self._cancelling = 0  # the task's cancel count when the read began
        self._fired: Fault | str | None = None  # why this wait cancelled the read

    def reading(self, stall_s: float | None) -> None:
        """A read begins, bounded by `stall_s` (None: unbounded). The caller checks `tripped`
        first: a wait tripped between reads has no read to end."""
        loop = self._loop
        task = asyncio.current_task(loop)  # with the loop given: a dict lookup
        assert task is not None, "a read outside a task"
        self._task = task
        self._cancelling = task.cancelling()
        self._since = loop.time()
        self._reading = True
        if stall_s != self._stall:
            self._stall = stall_s
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            if stall_s:
                self._timer = loop.call_at(self._since + stall_s, self._check)

    def idle(self) -> None:
        """The read ended (a token, an error or the interruption). A cancellation of this
        wait's that did not come back as CancelledError (an engine client turned it into
        something else) is withdrawn here, so the task's cancel count stays the caller's."""
        self._reading = False
        if self._fired is not None:
            self._fired = None
            if self._task is not None:
                self._task.uncancel()

    def interrupted(self) -> Fault | str | None:
        """After a read ended in CancelledError: why this wait cancelled it (`STALLED`, or the
        fault another stream saw), or None when the cancellation is not (only) its own: the
        caller's, which must propagate."""
        fired, self._fired = self._fired, None
        if fired is None or self._task is None:
            return None
        if self._task.uncancel() > self._cancelling:
            return None
        return fired

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def trip(self, fault: Fault) -> bool:
        """End the current read now (the next one, between reads); False when already tripped."""
        if self.tripped is not None:
            return False
        self.tripped = fault
        if self._reading and self._fired is None:
            self._interrupt(fault)
        return True

    def _interrupt(self, why: Fault | str) -> None:
        assert self._task is not None
        self._fired = why
        self._task.cancel()

    def _check(self) -> None:
        self._timer = None
        stall = self._stall
        if not stall or self._fired is not None:
            return
        now = self._loop.time()
        due = self._since + stall
        if not self._reading:  # between reads: the next read starts later than now
            self._timer = self._loop.call_at(now + stall, self._check)
        elif now >= due - _EARLY_S:
            self._interrupt(STALLED)
        else:  # a token came since the timer was set: this read started later
            self._timer = self._loop.call_at(due, self._check)


class ReplicaWatch:
    def __init__(self) -> None:
        self._waits: dict[str, set[Wait]] = {}

    @contextlib.contextmanager
    def attempt(self, replica_id: str, model: str) -> Iterator[Wait]:
        wait = Wait(asyncio.get_running_loop(), model)
        waits = self._waits.setdefault(replica_id, set())
        waits.add(wait)
        try:
            yield wait
        finally:
            wait.close()
            waits.discard(wait)
            if not waits:
                del self._waits[replica_id]

    def trip(self, replica_id: str, model: str, fault: Fault, source: Wait | None = None) -> int:
        """End every other wait on the replica now (for `model` only, when the fault is that
        model's); how many were ended."""
        scoped = fault.model_scoped
        return sum(
            wait.trip(fault)
            for wait in list(self._waits.get(replica_id, ()))
            if wait is not source and not (scoped and wait.model != model)
        )

    def in_flight(self, replica_id: str) -> int:
        return len(self._waits.get(replica_id, ()))
