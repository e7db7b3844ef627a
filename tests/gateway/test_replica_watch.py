"""The per-attempt read guard: the stall bound measured per read with one timer, trips, and
cancellations that are not the guard's own."""

from __future__ import annotations

import asyncio

import pytest

from services.gateway.faults import Fault, FaultKind, FaultReason
from services.gateway.replica_watch import STALLED, ReplicaWatch, Wait

DEAD = Fault(FaultKind.REPLICA, FaultReason.BACKEND_DEAD)


async def guarded_read(wait: Wait, read: asyncio.Future[int], stall_s: float | None) -> object:
    """One read as `Attempts._stream` brackets it: its value, or why the guard ended it."""
    wait.reading(stall_s)
    try:
        return await read
    except asyncio.CancelledError:
        why = wait.interrupted()
        if why is None:
            raise
        return why
    finally:
        wait.idle()


async def answered_read(wait: Wait, value: int, stall_s: float | None) -> object:
    """A guarded read whose token is already there."""
    read: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    read.set_result(value)
    return await guarded_read(wait, read, stall_s)


async def suspended_read(
    wait: Wait, stall_s: float | None
) -> tuple[asyncio.Future[int], asyncio.Task[object]]:
    """A guarded read in its own task, suspended waiting for its token (the future)."""
    read: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    task = asyncio.ensure_future(guarded_read(wait, read, stall_s))
    await asyncio.sleep(0)  # the task runs up to its read
    return read, task


async def test_a_read_longer_than_the_stall_bound_is_interrupted() -> None:
    watch = ReplicaWatch()
    with watch.attempt("r1", "m") as wait:
        never: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        assert await guarded_read(wait, never, 0.02) == STALLED
        assert never.cancelled()
        # the interruption is withdrawn from the task's cancel count: the caller's stays 0
        assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]


async def test_the_stall_bound_counts_each_read_not_the_stream() -> None:
    """Reads that each take a fifth of the bound never stall, however long the stream runs,
    and the time the stream spends outside a read (its client being slow) never counts."""
    loop = asyncio.get_running_loop()
    stall = 0.2
    with ReplicaWatch().attempt("r1", "m") as wait:
        for i in range(4):
            read: asyncio.Future[int] = loop.create_future()
            loop.call_later(stall * 0.2, read.set_result, i)
            assert await guarded_read(wait, read, stall) == i
            await asyncio.sleep(stall * 1.5)  # the scenario: a client slower than the bound


async def test_the_timer_re_arms_from_the_current_reads_start() -> None:
    """The one timer was set for the first read; when it fires during a later read it moves to
    that read's start plus the bound, not to the time it fired."""
    with ReplicaWatch().attempt("r1", "m") as wait:
        assert await answered_read(wait, 0, 30.0) == 0
        timer = wait._timer
        assert timer is not None
        armed_at = timer.when()
        await asyncio.sleep(0.01)
        wait.reading(30.0)  # a second read, 10 ms later: the timer is not touched
        assert wait._timer is timer
        wait._check()  # as if the timer fired now
        assert wait._timer is not timer
        assert wait._timer is not None
        assert wait._timer.when() == wait._since + 30.0
        assert wait._timer.when() > armed_at
        assert wait.interrupted() is None  # nothing was cancelled
        wait.idle()


async def test_a_trip_ends_the_current_read_and_no_other_attempt() -> None:
    watch = ReplicaWatch()
    with (
        watch.attempt("r1", "m") as a,
        watch.attempt("r1", "m") as b,
        watch.attempt("r2", "m") as c,
    ):
        (read_a, task_a), (_, task_b), (read_c, task_c) = [
            await suspended_read(w, None) for w in (a, b, c)
        ]
        assert watch.trip("r1", "m", DEAD, source=a) == 1
        assert await task_b == DEAD
        assert b.tripped == DEAD
        assert a.tripped is None
        assert c.tripped is None
        read_a.set_result(1)
        read_c.set_result(3)
        assert [await task_a, await task_c] == [1, 3]
        assert watch.trip("r1", "m", DEAD) == 1  # a; b was tripped already
        assert watch.in_flight("r1") == 2


async def test_a_trip_for_one_models_fault_spares_the_replicas_other_models() -> None:
    """A model's stub died, or it was unloaded: its streams move on; another model's on the
    same replica keep streaming. A server stopping ends them all."""
    watch = ReplicaWatch()
    with (
        watch.attempt("r1", "m") as a,
        watch.attempt("r1", "m") as b,
        watch.attempt("r1", "other") as c,
    ):
        unloaded = Fault(FaultKind.REPLICA, FaultReason.MODEL_UNAVAILABLE)
        for fault in (DEAD, unloaded):
            assert watch.trip("r1", "m", fault, source=a) == 1
            assert (b.tripped, c.tripped) == (fault, None)
            b.tripped = None
        stopping = Fault(FaultKind.REPLICA, FaultReason.ENGINE_STOPPING)
        assert watch.trip("r1", "m", stopping, source=a) == 2
        assert (b.tripped, c.tripped) == (stopping, stopping)


async def test_a_trip_between_reads_cancels_nothing() -> None:
    """A wait tripped after a read, while its stream is outside a read, is only marked: the
    caller checks `tripped` before its next read; nothing is cancelled in the meantime."""
    watch = ReplicaWatch()
    with watch.attempt("r1", "m") as wait:
        assert await answered_read(wait, 7, 30.0) == 7
        assert watch.trip("r1", "m", DEAD) == 1
        await asyncio.sleep(0)  # would raise CancelledError if the task had been cancelled
        assert wait.tripped == DEAD
        assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]


async def test_the_callers_own_cancellation_propagates() -> None:
    with ReplicaWatch().attempt("r1", "m") as wait:
        _, task = await suspended_read(wait, 10.0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_a_caller_cancellation_racing_a_trip_still_propagates() -> None:
    """Both fired before the read resumed: the caller's cancellation wins, as with
    `asyncio.timeout`."""
    watch = ReplicaWatch()
    with watch.attempt("r1", "m") as wait:
        _, task = await suspended_read(wait, None)
        watch.trip("r1", "m", DEAD)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_the_timer_ends_with_the_attempt() -> None:
    watch = ReplicaWatch()
    with watch.attempt("r1", "m") as wait:
        assert await answered_read(wait, 1, 30.0) == 1
        timer = wait._timer
        assert timer is not None
        assert not timer.cancelled()
    assert timer.cancelled()
    assert watch.in_flight("r1") == 0
