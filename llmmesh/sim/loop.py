"""An asyncio event loop on virtual time.

`VirtualTimeLoop.time()` is a virtual clock that starts at 0 and moves only when the loop has
nothing ready to run: it then jumps to the next scheduled timer (`call_at`, `asyncio.sleep`,
`asyncio.wait_for`, ...). Code that waits only through the running loop's timers, as the
orchestrator's director does, therefore runs unchanged and as fast as the CPU allows, while every
timestamp it reads from `loop.time()` (or from an injected clock bound to it) is modelled time.

Invariants:
- Virtual time never goes backwards; it advances only inside the selector's `select(timeout)`,
  by exactly `timeout` (the delay to the earliest timer), never while callbacks are ready.
- There is no real I/O: file descriptors may be registered (the loop's self-pipe) but are never
  polled. `run_in_executor` (hence `asyncio.to_thread`) runs the function at once on the loop's
  thread and returns a finished future, so no wake-up from another thread is ever awaited.
- A loop with no ready callback and no timer while the main coroutine is still pending is a
  deadlock: `select` raises `VirtualDeadlock` instead of blocking forever.
- Timers due at the same virtual time run in the order they were scheduled (asyncio's heap
  alone orders only by time: same-time arrivals would reach the code under test shuffled).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import heapq
import itertools
import selectors
from collections.abc import Callable, Coroutine, Mapping
from typing import Any, TypeVar

T = TypeVar("T")


class VirtualDeadlock(RuntimeError):
    """Nothing is ready and no timer is scheduled, yet the run has not finished."""


class VirtualClock:
    """Seconds of modelled time; advanced only by the loop's selector."""

    __slots__ = ("now",)

    def __init__(self, start: float = 0.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        if seconds > 0:
            self.now += seconds


class _VirtualSelector(selectors.BaseSelector):
    """Keeps registrations (the loop requires them) and never polls: `select(timeout)` is where
    virtual time passes."""

    def __init__(self, clock: VirtualClock) -> None:
        self._clock = clock
        self._keys: dict[Any, selectors.SelectorKey] = {}
        self.selects = 0

    def register(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        key = selectors.SelectorKey(fileobj, _fd(fileobj), events, data)
        self._keys[fileobj] = key
        return key

    def unregister(self, fileobj: Any) -> selectors.SelectorKey:
        return self._keys.pop(fileobj)

    def modify(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        self._keys.pop(fileobj, None)
        return self.register(fileobj, events, data)

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        self.selects += 1
        if timeout is None:
            raise VirtualDeadlock("no callback is ready and no timer is scheduled")
        now = self._clock.now
        when = self.next_timer()
        # Land exactly on the timer (now + (when - now) may miss it by an ulp, and such errors
        # would accumulate); a timeout the loop capped below the delay advances by itself.
        if when is not None and timeout == max(0.0, when - now):
            self._clock.now = max(now, when)
        else:
            self._clock.advance(timeout)
        return []

    def next_timer(self) -> float | None:
        """When the loop's earliest timer is due (set by the loop that owns this selector)."""
        return None

    def get_map(self) -> Mapping[Any, selectors.SelectorKey]:
        return self._keys

    def close(self) -> None:
        self._keys.clear()


def _fd(fileobj: Any) -> int:
    return fileobj if isinstance(fileobj, int) else int(fileobj.fileno())


class _OrderedTimer(asyncio.TimerHandle):
    """A timer that sorts after every earlier-scheduled timer due at the same time."""

    __slots__ = ("_seq",)

    def __init__(self, seq: int, when: float, *args: Any) -> None:
        super().__init__(when, *args)
        self._seq = seq

    def _key(self) -> tuple[float, int]:
        return (self._when, self._seq)  # type: ignore[attr-defined]

    def __lt__(self, other: object) -> bool:
        return self._key() < other._key() if isinstance(other, _OrderedTimer) else NotImplemented

    def __le__(self, other: object) -> bool:
        return self._key() <= other._key() if isinstance(other, _OrderedTimer) else NotImplemented

    def __gt__(self, other: object) -> bool:
        return self._key() > other._key() if isinstance(other, _OrderedTimer) else NotImplemented

    def __ge__(self, other: object) -> bool:
        return self._key() >= other._key() if isinstance(other, _OrderedTimer) else NotImplemented

    __hash__ = asyncio.TimerHandle.__hash__


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    def __init__(self, clock: VirtualClock | None = None) -> None:
        self._timer_seq = itertools.count()
        self.clock = clock or VirtualClock()
        self._virtual_selector = _VirtualSelector(self.clock)
        self._virtual_selector.next_timer = self._next_timer  # type: ignore[method-assign]
        super().__init__(self._virtual_selector)
        # The base loop rounds timers to this resolution; virtual time needs none.
        self._clock_resolution = 1e-9

    def time(self) -> float:
        return self.clock.now

    def call_at(  # type: ignore[override]
        self,
        when: float,
        callback: Callable[..., object],
        *args: Any,
        context: Any = None,
    ) -> asyncio.TimerHandle:
        """The base loop's `call_at` with an `_OrderedTimer` (FIFO among equal times)."""
        self._check_closed()  # type: ignore[attr-defined]
        timer = _OrderedTimer(next(self._timer_seq), when, callback, args, self, context)
        if timer._source_traceback:  # type: ignore[attr-defined]
            del timer._source_traceback[-1]  # type: ignore[attr-defined]
        heapq.heappush(self._scheduled, timer)  # type: ignore[attr-defined]
        timer._scheduled = True  # type: ignore[attr-defined]
        return timer

    def _next_timer(self) -> float | None:
        scheduled: list[asyncio.TimerHandle] = self._scheduled  # type: ignore[attr-defined]
        return scheduled[0].when() if scheduled else None

    @property
    def jumps(self) -> int:
        """How many times the loop went idle and virtual time jumped to the next timer."""
        return self._virtual_selector.selects

    def run_in_executor(  # type: ignore[override]
        self, executor: concurrent.futures.Executor | None, func: Callable[..., T], *args: Any
    ) -> asyncio.Future[T]:
        fut: asyncio.Future[T] = self.create_future()
        try:
            fut.set_result(func(*args))
        except Exception as exc:  # delivered to the awaiting coroutine, as an executor would
            fut.set_exception(exc)
        return fut


def run(main: Coroutine[Any, Any, T], clock: VirtualClock | None = None) -> T:
    """Run `main` to completion on a fresh virtual-time loop and close the loop."""
    loop = VirtualTimeLoop(clock)
    try:
        return loop.run_until_complete(main)
    finally:
        try:
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            loop.close()
