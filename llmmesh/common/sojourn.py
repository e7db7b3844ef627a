"""How long a call waited at its server before the server's handler started on it.

A grpc.aio process that cannot keep up does not queue the calls it has not started where the
service sees them: they wait in gRPC, per connection, before any handler runs (measured with a
saturated orchestrator, `bench-admit` at 1,000 Admit/s: handler starts 0.2-2.2 s after the send,
at most 2 handlers running, the event loop's lag under 1 ms, and a health check on another
connection answered within 15 ms throughout). Nothing in the process itself shows the wait.

The caller says who it is (`CALLER_KEY`: an id per caller process) and when, by its wall clock,
it sent the call (`SENT_AT_KEY`). The handler's reading, `its wall clock - sent at`, is the wait
plus the network hop plus the two hosts' clock offset (either sign, steady for a pair of hosts).
`CallerBaselines` takes the offset out as LEDBAT takes out a path's base delay: per caller, the
smallest reading of the last `window_s` is its baseline, and the wait is the reading above it.

Not the deadline: gRPC rounds the timeout it sends up to a few significant digits (a 10 s
timeout arrives up to ~0.1 s longer, 600 s up to ~1 s), and Istio cuts it to the route's timeout
(`max_grpc_timeout`), so `sent timeout - time remaining` errs by more than the waits it would
measure.

The service's own wall clock may be stepped (a time sync, a VM resumed): every reading moves by
the step, its baselines with it (`CallerBaselines` follows the wall clock's offset from the
service's monotonic one), so no wait is read into it.

Limits, by construction: a caller whose every call of a whole window waited (a queue that never
drained for `window_s`) has that wait in its baseline and reads only what comes on top; a caller
whose clock is stepped back by d reads every call d late until the step leaves the window. The
values are the caller's word: only trusted callers (the gateways, by the mesh's authorization
policy) reach a service that acts on them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Final, cast

CALLER_KEY: Final = "x-llmmesh-caller"  # the calling process's id
SENT_AT_KEY: Final = "x-llmmesh-sent-at"  # the caller's wall clock when it sent the call, Unix s
# A reading further off than this is no clock offset or wait: ignored.
MAX_READING_S: Final = 3600.0
# A move of the service's wall clock against its monotonic clock larger than this, seen by two
# readings in a row, is a step of the wall clock, which every baseline follows (smaller ones, or
# one reading alone: the two clocks read a moment apart, a thread switch between them).
CLOCK_STEP_S: Final = 0.001


def call_metadata(caller: str, wall_now: float) -> tuple[tuple[str, str], ...]:
    """The metadata a caller adds to a call it sends at wall time `wall_now`."""
    return ((CALLER_KEY, caller), (SENT_AT_KEY, f"{wall_now:.6f}"))


def caller_of(metadata: Iterable[object] | None) -> str | None:
    """The caller id a call's metadata names (a stream's: its messages carry their send
    times); None without one."""
    for item in metadata or ():
        key, value = cast(tuple[str, str | bytes], item)
        if key == CALLER_KEY and isinstance(value, str) and value:
            return value
    return None


def read_call(metadata: Iterable[object] | None, wall_now: float) -> tuple[str, float] | None:
    """(caller, reading) of a call whose handler starts at wall time `wall_now`; None for a call
    that says no caller or no readable send time."""
    caller = sent_at = None
    for item in metadata or ():
        key, value = cast(tuple[str, str | bytes], item)
        if key == CALLER_KEY and isinstance(value, str) and value:
            caller = value
        elif key == SENT_AT_KEY:
            try:
                sent_at = float(value)
            except (TypeError, ValueError):
                return None
    if caller is None or sent_at is None:
        return None
    return read_sent(caller, sent_at, wall_now)


def read_sent(caller: str | None, sent_at: float, wall_now: float) -> tuple[str, float] | None:
    """(caller, reading) of a message `caller` sent at its wall time `sent_at` and read at wall
    time `wall_now` (a stream's message carries its send time itself); None for no caller or an
    unusable send time."""
    if not caller or not math.isfinite(sent_at):
        return None
    reading = wall_now - sent_at
    return (caller, reading) if abs(reading) <= MAX_READING_S else None


class CallerBaselines:
    """Per caller, the smallest reading of the last `window_s` (the current half-window's and
    the previous one's), at most `max_callers` callers (the least recently heard forgotten
    first)."""

    def __init__(self, window_s: float = 60.0, max_callers: int = 1024) -> None:
        self._half_s = window_s / 2
        self._max_callers = max_callers
        # caller -> [smallest reading this half-window, the previous half-window's, its start]
        self._callers: dict[str, list[float]] = {}
        # The service's wall clock less its monotonic clock, as the baselines stand; and a new
        # offset one reading showed, which the next must confirm.
        self._offset: float | None = None
        self._moved: float | None = None

    def sojourn(
        self, caller: str, reading: float, now: float, wall_now: float | None = None
    ) -> float:
        """The wait a reading of `caller` at `now` (the service's monotonic clock) shows;
        `wall_now`: the service's wall clock the reading was taken with (a step of it since the
        last reading moves every baseline by the step)."""
        if wall_now is not None and self._follow(wall_now - now):
            # The clock may have moved (one reading shows it): a reading in the new clock must
            # not enter a baseline that the confirming reading will move again.
            b = self._callers.get(caller)
            return 0.0 if b is None else max(reading - min(b[0], b[1]), 0.0)
        b = self._callers.pop(caller, None)  # re-inserted last: the dict is in use order
        if b is None:
            if len(self._callers) >= self._max_callers:
                del self._callers[next(iter(self._callers))]
            b = [reading, reading, now]
        self._callers[caller] = b
        if now - b[2] >= self._half_s:
            # A new half-window; after a whole window without calls, nothing older counts.
            b[1] = b[0] if now - b[2] < 2 * self._half_s else reading
            b[0], b[2] = reading, now
        elif reading < b[0]:
            b[0] = reading
        return max(reading - min(b[0], b[1]), 0.0)

    def _follow(self, offset: float) -> bool:
        """Move the baselines by a step of the wall clock two readings in a row show; True
        while one reading alone shows a move (it is not followed yet)."""
        if self._offset is None:
            self._offset = offset
            return False
        step = offset - self._offset
        if abs(step) <= CLOCK_STEP_S:
            self._moved = None
            return False
        if self._moved is None or abs(offset - self._moved) > CLOCK_STEP_S:
            self._moved = offset  # one reading: maybe the two clocks read a moment apart
            return True
        self._offset, self._moved = offset, None
        for b in self._callers.values():
            b[0] += step
            b[1] += step
        return False

    def __len__(self) -> int:
        return len(self._callers)
