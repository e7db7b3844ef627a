"""A bounded queue whose items one background task sends in order, in batches: what a caller
hands over off its request path (the orchestrator's kv_registry updates, the gateway's lease
reports) costs one call per batch instead of one per item.

Invariants:
- Items leave in the order they were put, at most `max_batch` per `send` call, one call at a
  time. A batch that is not full waits `linger_s` before it leaves (the first, after the item
  that found the queue empty; the next, after the previous call returned), so a busy caller
  makes at most one call per `linger_s` until its batches fill (as Kafka's linger.ms).
- At most `max_queue` items wait; putting one more hands the oldest to `on_drop`.
- A `send` that raises is logged and the next batch goes on: no item is stranded behind it.
- `drain` returns once every item put before it was sent (or given up on by `send`);
  `cancel` stops the sender and returns the items it had not taken yet.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


class LingerBatcher(Generic[T]):
    def __init__(
        self,
        send: Callable[[list[T]], Awaitable[None]],
        *,
        max_batch: int,
        max_queue: int,
        linger_s: float,
        on_drop: Callable[[T], None],
        name: str,
    ) -> None:
        """`send`: delivers one batch (its own retries and failures are its business);
        `name`: what the items are, for logs."""
        self._send = send
        self._max_batch = max_batch
        self._max_queue = max_queue
        self._linger_s = linger_s
        self._on_drop = on_drop
        self._name = name
        self._queue: deque[T] = deque()
        self._in_call = 0
        self._sender: asyncio.Task[None] | None = None

    @property
    def queued(self) -> int:
        """Items waiting for a call."""
        return len(self._queue)

    @property
    def in_call(self) -> int:
        """Items of the call in flight."""
        return self._in_call

    def put(self, item: T) -> None:
        if len(self._queue) >= self._max_queue:
            self._on_drop(self._queue.popleft())
        self._queue.append(item)
        if self._sender is None or self._sender.done():
            self._sender = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        queue = self._queue
        while queue:
            if self._linger_s > 0 and len(queue) < self._max_batch:
                await asyncio.sleep(self._linger_s)
            batch = [queue.popleft() for _ in range(min(len(queue), self._max_batch))]
            self._in_call = len(batch)
            try:
                await self._send(batch)
            except Exception:  # a bug, a closed channel: never strand the rest behind it
                log.exception(
                    "sending a batch failed", extra={"items": self._name, "n": len(batch)}
                )
            finally:
                self._in_call = 0

    async def drain(self) -> None:
        """Wait until the queue is sent (a cancelled drain leaves the sender running)."""
        while self._sender is not None and not self._sender.done():
            await asyncio.wait([self._sender])

    def cancel(self) -> list[T]:
        """Stop sending (the call in flight is cancelled); the items not yet taken."""
        if self._sender is not None:
            self._sender.cancel()
        left = list(self._queue)
        self._queue.clear()
        return left
