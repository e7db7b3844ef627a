"""`LingerBatcher`: order, batch size, linger, bound, a send that raises, drain and cancel."""

from __future__ import annotations

import asyncio

from llmmesh.common.batching import LingerBatcher


class Recorder:
    """A `send` that records its batches; it waits for `release` while that is cleared."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.release = asyncio.Event()
        self.release.set()
        self.entered = asyncio.Event()
        self.raise_on: set[int] = set()  # a batch holding one of these raises

    async def __call__(self, batch: list[int]) -> None:
        self.entered.set()
        await self.release.wait()
        if self.raise_on & set(batch):
            raise RuntimeError("a bug in send")
        self.batches.append(batch)


def batcher(
    send: Recorder, *, max_batch: int = 8, max_queue: int = 100, linger_s: float = 0.0
) -> tuple[LingerBatcher[int], list[int]]:
    dropped: list[int] = []
    b = LingerBatcher(
        send,
        max_batch=max_batch,
        max_queue=max_queue,
        linger_s=linger_s,
        on_drop=dropped.append,
        name="numbers",
    )
    return b, dropped


async def test_items_leave_in_order_in_batches_of_at_most_max_batch() -> None:
    send = Recorder()
    b, _ = batcher(send, max_batch=3)
    for i in range(7):
        b.put(i)
    await b.drain()
    assert send.batches == [[0, 1, 2], [3, 4, 5], [6]]
    assert (b.queued, b.in_call) == (0, 0)


async def test_what_comes_during_a_call_waits_the_linger_and_leaves_together() -> None:
    send = Recorder()
    b, _ = batcher(send, linger_s=0.05)
    send.release.clear()
    b.put(0)
    await send.entered.wait()
    assert b.in_call == 1
    b.put(1)
    b.put(2)
    send.release.set()
    await b.drain()
    assert send.batches == [[0], [1, 2]]


async def test_the_oldest_is_dropped_beyond_the_bound() -> None:
    send = Recorder()
    b, dropped = batcher(send, max_queue=2)
    for i in range(4):
        b.put(i)  # the sender has not run yet: all four queue
    assert dropped == [0, 1]
    await b.drain()
    assert send.batches == [[2, 3]]


async def test_a_send_that_raises_strands_nothing_behind_it() -> None:
    send = Recorder()
    send.raise_on = {0}
    b, _ = batcher(send, max_batch=1)
    for i in range(3):
        b.put(i)
    await b.drain()
    assert send.batches == [[1], [2]]
    assert (b.queued, b.in_call) == (0, 0)


async def test_cancel_returns_what_was_not_taken() -> None:
    send = Recorder()
    b, _ = batcher(send, max_batch=1)
    send.release.clear()
    for i in range(3):
        b.put(i)
    await send.entered.wait()  # 0 is in the call
    assert b.cancel() == [1, 2]
    await b.drain()
    assert send.batches == []  # the call in flight was cancelled
