"""Ships the engine's KV events to kv_registry `PublishEvents`.

The engine thread calls `publish()`, which only appends to a bounded in-memory queue and never
blocks on the network. A background thread sends batches of up to `max_batch` events (waiting at
most `interval_s` for a batch to fill) over a synchronous gRPC channel.

Recovery: the publisher sends a full snapshot (`cleared` + `stored` for every cached block, taken
from the engine under its lock and numbered in the same per-epoch sequence) instead of the queue
whenever the registry cannot have a gap-free stream:
- at start (the registry learns the new epoch from a clean slate),
- after the queue overflowed (events were dropped),
- after a failed call (registry unreachable; retried with exponential backoff),
- when the registry answers `resync_required`.
Queued events numbered before the snapshot are discarded; later ones follow it without a gap.
`stop()` flushes what is queued (one attempt per batch, no snapshot, no retry) within a deadline,
then closes the channel, which cancels a call still in flight, so it never outlasts its timeout.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Literal

import grpc

from llmmesh.emulator.events import AllBlocksCleared, BlocksRemoved, BlocksStored, KvEvent
from llmmesh.generated.kvregistry.v1 import kvregistry_pb2, kvregistry_pb2_grpc
from llmmesh.kvblocks import BlockConfig

log = logging.getLogger(__name__)

_CLOSE_GRACE_S = 1.0  # how long stop() waits for the thread after closing the channel


def event_to_proto(ev: KvEvent) -> kvregistry_pb2.KvEvent:
    msg = kvregistry_pb2.KvEvent(sequence=ev.sequence)
    data = ev.data
    if isinstance(data, BlocksStored):
        if data.parent_hash is not None:
            msg.stored.parent_hash = data.parent_hash
        msg.stored.blocks.extend(
            kvregistry_pb2.StoredBlock(block_hash=b.block_hash, token_ids=b.token_ids)
            for b in data.blocks
        )
    elif isinstance(data, BlocksRemoved):
        msg.removed.block_hashes.extend(data.block_hashes)
    else:
        assert isinstance(data, AllBlocksCleared)
        msg.cleared.SetInParent()
    return msg


class KvEventPublisher:
    def __init__(
        self,
        target: str,
        *,
        replica_id: str,
        epoch: str,
        block_config: BlockConfig,
        snapshot: Callable[[], list[KvEvent]],
        max_batch: int = 512,
        interval_s: float = 0.02,
        queue_size: int = 65536,
        rpc_timeout_s: float = 2.0,
        max_backoff_s: float = 5.0,
    ) -> None:
        self.target = target
        self.replica_id = replica_id
        self.epoch = epoch
        self.block_config = block_config
        self._snapshot = snapshot
        self._max_batch = max_batch
        self._interval_s = interval_s
        self._queue_size = queue_size
        self._rpc_timeout_s = rpc_timeout_s
        self._max_backoff_s = max_backoff_s
        self._queue: deque[KvEvent] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._flush_deadline = 0.0  # monotonic; set by stop()
        self._overflowed = False
        self._need_snapshot = True
        self._min_sequence = 0
        self._channel: grpc.Channel | None = None
        self._thread: threading.Thread | None = None
        # Counters, for tests and logs.
        self.sent_events = 0
        self.sent_batches = 0
        self.snapshots = 0
        self.failures = 0
        self.dropped_events = 0

    # ----------------------------------------------------------------- API
    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("publisher already started")
        self._channel = grpc.insecure_channel(self.target)
        self._thread = threading.Thread(target=self._run, name="kv-event-publisher", daemon=True)
        self._thread.start()

    def publish(self, events: Sequence[KvEvent]) -> None:
        """Queue events; never blocks on I/O. On overflow the events are dropped and the next
        send is a snapshot."""
        if not events:
            return
        with self._cond:
            if self._overflowed or len(self._queue) + len(events) > self._queue_size:
                if not self._overflowed:
                    log.warning("KV event queue overflowed; will resync with a snapshot")
                self._overflowed = True
                self.dropped_events += len(events) + len(self._queue)
                self._queue.clear()
            else:
                self._queue.extend(events)
            self._cond.notify_all()

    @property
    def queued(self) -> int:
        """Events waiting to be sent."""
        with self._cond:
            return len(self._queue)

    def stop(self, timeout_s: float = 5.0) -> bool:
        """Flush queued events for at most `timeout_s` (one attempt per batch; nothing is sent if
        a snapshot is due, since the queue alone would leave a gap), then close the channel, which
        cancels a call still in flight. True if the thread has ended."""
        with self._cond:
            self._stopping = True
            self._flush_deadline = time.monotonic() + max(0.0, timeout_s)
            self._cond.notify_all()
        thread = self._thread
        if thread is not None:
            thread.join(timeout_s)
        if self._channel is not None:
            self._channel.close()
        if thread is not None and thread.is_alive():
            # Closing the channel fails a call in flight at once; the thread then returns.
            thread.join(_CLOSE_GRACE_S)
        ended = thread is None or not thread.is_alive()
        if not ended:
            log.warning("KV event publisher thread did not stop within %.1fs", timeout_s)
        elif self.queued:
            log.info("KV event publisher stopped with %d events unsent", self.queued)
        return ended

    # ----------------------------------------------------------------- thread
    def _run(self) -> None:
        assert self._channel is not None
        stub = kvregistry_pb2_grpc.KvRegistryServiceStub(self._channel)
        backoff, bad_rounds = 0.1, 0
        while True:
            batches = self._next_batches()
            if batches is None:
                return
            outcome = "ok"
            for batch in batches:
                outcome = self._send(stub, batch)
                if outcome != "ok":
                    break
            if outcome == "ok":
                backoff, bad_rounds = 0.1, 0
                continue
            bad_rounds += 1
            with self._cond:
                if self._stopping:
                    return
                # A first resync request is answered at once; failures and repeats back off.
                if outcome == "failed" or bad_rounds > 1:
                    self._cond.wait(backoff)  # woken early only by stop()
                    backoff = min(backoff * 2, self._max_backoff_s)

    def _next_batches(self) -> list[list[KvEvent]] | None:
        """Wait for work; None when stopping with nothing left to do (or nothing that may be
        sent: a snapshot is not taken once stopping, nor anything sent past the deadline)."""
        with self._cond:
            if self._stopping and (
                self._need_snapshot or self._overflowed or time.monotonic() >= self._flush_deadline
            ):
                return None
            if self._overflowed:
                self._overflowed = False
                self._need_snapshot = True
            if not self._need_snapshot:
                self._wait_for_batch()
                if self._overflowed:
                    self._overflowed = False
                    self._need_snapshot = True
            if not self._need_snapshot:
                if not self._queue:
                    return None if self._stopping else []
                batch: list[KvEvent] = []
                while self._queue and len(batch) < self._max_batch:
                    ev = self._queue.popleft()
                    if ev.sequence >= self._min_sequence:
                        batch.append(ev)
                return [batch] if batch else []
            self._need_snapshot = False
        # Snapshot outside our lock: it takes the engine's lock.
        events = self._snapshot()
        self.snapshots += 1
        with self._cond:
            self._min_sequence = events[-1].sequence + 1
            while self._queue and self._queue[0].sequence < self._min_sequence:
                self._queue.popleft()
        return [events[i : i + self._max_batch] for i in range(0, len(events), self._max_batch)]

    def _wait_for_batch(self) -> None:
        """Block until a batch is full, `interval_s` passed since the queue became non-empty, or
        stop() was called. Caller holds the condition."""
        while not self._queue and not self._stopping and not self._overflowed:
            self._cond.wait()
        self._cond.wait_for(
            lambda: len(self._queue) >= self._max_batch or self._stopping or self._overflowed,
            timeout=self._interval_s,
        )

    def _send(
        self, stub: kvregistry_pb2_grpc.KvRegistryServiceStub, batch: list[KvEvent]
    ) -> Literal["ok", "resync", "failed"]:
        req = kvregistry_pb2.PublishEventsRequest(
            replica_id=self.replica_id,
            epoch=self.epoch,
            block_size=self.block_config.block_size,
            hash_seed=self.block_config.hash_seed,
            events=[event_to_proto(e) for e in batch],
        )
        timeout = self._rpc_timeout_s
        with self._cond:
            if self._stopping:  # the final flush never outlasts stop()'s deadline
                timeout = min(timeout, max(0.0, self._flush_deadline - time.monotonic()))
        if timeout <= 0:
            return "failed"
        try:
            resp = stub.PublishEvents(req, timeout=timeout)
        except grpc.RpcError as exc:
            self.failures += 1
            if self.failures == 1 or self.failures % 100 == 0:
                log.warning(
                    "PublishEvents to %s failed (%s); will resync", self.target, _describe(exc)
                )
            with self._cond:
                self._need_snapshot = True
            return "failed"
        self.sent_batches += 1
        self.sent_events += len(batch)
        if resp.resync_required:
            log.info("kv_registry asked for a resync (expects sequence %d)", resp.next_sequence)
            with self._cond:
                self._need_snapshot = True
            return "resync"
        return "ok"


def _describe(exc: grpc.RpcError) -> str:
    code = getattr(exc, "code", None)
    details = getattr(exc, "details", None)
    if callable(code) and callable(details):
        return f"{code()}: {details()}"
    return repr(exc)
