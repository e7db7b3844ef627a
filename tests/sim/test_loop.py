"""The virtual-time event loop: time moves only when nothing is ready, by exactly the delay to
the next timer; asyncio's timers, timeouts and to_thread work on it unchanged."""

from __future__ import annotations

import asyncio
import time

import pytest

from llmmesh.sim.loop import VirtualClock, VirtualDeadlock, VirtualTimeLoop, run


def test_sleep_advances_virtual_time_only() -> None:
    async def main() -> tuple[float, float]:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        await asyncio.sleep(3600.0)
        return t0, loop.time()

    wall = time.monotonic()
    t0, t1 = run(main())
    assert t0 == 0.0
    assert t1 == pytest.approx(3600.0, abs=1e-9)
    assert time.monotonic() - wall < 5.0  # an hour of virtual time, not of wall time


def test_timers_fire_in_order_at_their_times() -> None:
    fired: list[tuple[str, float]] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()

        def fire(name: str) -> None:
            fired.append((name, loop.time()))

        for name, delay in (("c", 3.0), ("a", 1.0), ("b", 2.0), ("a2", 1.0)):
            loop.call_later(delay, fire, name)
        await asyncio.sleep(5.0)

    run(main())
    assert fired == [("a", 1.0), ("a2", 1.0), ("b", 2.0), ("c", 3.0)]


def test_timers_due_at_the_same_time_run_in_the_order_they_were_scheduled() -> None:
    async def main() -> list[int]:
        order: list[int] = []

        async def arrive(i: int) -> None:
            await asyncio.sleep(0.5)  # a burst: every arrival at the same instant
            order.append(i)

        loop = asyncio.get_running_loop()
        loop.call_at(0.5, order.append, -1)  # scheduled first: runs first
        await asyncio.gather(*(arrive(i) for i in range(32)))
        return order

    assert run(main()) == [-1, *range(32)]


def test_ready_callbacks_run_before_time_moves() -> None:
    seen: list[float] = []

    async def spin(loop: asyncio.AbstractEventLoop) -> None:
        for _ in range(100):
            seen.append(loop.time())
            await asyncio.sleep(0)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        await asyncio.gather(spin(loop), asyncio.sleep(0.5))

    run(main())
    assert set(seen) == {0.0}


def test_wait_for_times_out_in_virtual_time() -> None:
    async def main() -> float:
        loop = asyncio.get_running_loop()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(asyncio.Event().wait(), 30.0)
        return loop.time()

    assert run(main()) == pytest.approx(30.0)


def test_to_thread_runs_inline_at_the_same_instant() -> None:
    async def main() -> tuple[int, float]:
        loop = asyncio.get_running_loop()
        await asyncio.sleep(2.0)
        value = await asyncio.to_thread(lambda: 42)
        return value, loop.time()

    assert run(main()) == (42, 2.0)


def test_to_thread_propagates_errors() -> None:
    def boom() -> None:
        raise OSError("unreachable")

    async def main() -> None:
        await asyncio.to_thread(boom)

    with pytest.raises(OSError, match="unreachable"):
        run(main())


def test_deadlock_raises_instead_of_blocking() -> None:
    async def main() -> None:
        await asyncio.Event().wait()

    with pytest.raises(VirtualDeadlock):
        run(main())


def test_clock_is_shared_and_counts_jumps() -> None:
    clock = VirtualClock(10.0)
    loop = VirtualTimeLoop(clock)
    try:
        loop.run_until_complete(asyncio.sleep(5.0))
        assert clock() == pytest.approx(15.0)
        assert loop.time() == clock()
        assert loop.jumps >= 1
    finally:
        loop.close()
