"""Ships the engine's KV events to every kv_registry replica's `PublishEvents`.

`RegistryFanout` (what the engine uses) holds one `KvEventPublisher` per registry replica: the
static addresses plus, with a DNS target, the pods behind it (re-resolved periodically; a new pod
gets a stream that starts with a snapshot, a vanished one's stream is stopped). Streams share
nothing but the engine's snapshot function, so a registry that is down, slow or restarting never
holds back the others: each has its own thread, channel, bounded queue, sequence and resync.

`KvEventPublisher` is one registry's stream. The engine thread calls `publish()`, which only
appends to a bounded in-memory queue and never blocks on the network. A background thread sends
batches of up to `max_batch` events (waiting at most `interval_s` for a batch to fill) over a
synchronous gRPC channel.

Sequence numbers are per stream: the engine numbers its events (and every snapshot it takes) in
one per-epoch sequence, and a stream sends a snapshot under the engine's numbers but the events
after it renumbered without gaps. So one stream's snapshot, which takes engine numbers the other
streams never see, does not look like a gap (and cause a resync) on the others' registries; with
a single registry the numbers are the engine's.

Recovery: the publisher sends a full snapshot (`cleared` + `stored` for every cached block, taken
from the engine under its lock and numbered in the same per-epoch sequence) instead of the queue
whenever the registry cannot have a gap-free stream:
- at start (the registry learns the new epoch from a clean slate),
- after the queue overflowed (events were dropped),
- after a failed call carrying events (registry unreachable; retried with exponential
  backoff; a failed heartbeat loses nothing and triggers none),
- when the registry answers `resync_required`, to events or to a heartbeat: a stream with nothing
  to send for `heartbeat_s` sends its next sequence alone, so a registry that restarted while
  the engine was idle asks for the snapshot then, not at the engine's next event.
A registry that refuses the engine's epoch (FAILED_PRECONDITION: it keeps a lifetime that
started later under this replica id, which publishes) gets no snapshot, which it would parse and
refuse: only heartbeats, backing off, until one is taken (then the snapshot it asks for).
Queued events numbered before the snapshot are discarded; later ones follow it without a gap.
While a snapshot is due, `publish()` queues nothing (the snapshot will cover it), so a registry
that is down costs no memory, and a lagging one is bounded by `queue_size`, then resynced.
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

from llmmesh.common import kv_registries
from llmmesh.common.kv_registries import RegistryEndpoint
from llmmesh.emulator.events import AllBlocksCleared, BlocksRemoved, BlocksStored, KvEvent
from llmmesh.emulator.settings import EmulatorSettings
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
        heartbeat_s: float | None = None,
        authority: str | None = None,
    ) -> None:
        self.target = target
        self.authority = authority
        self.replica_id = replica_id
        self.epoch = epoch
        self.block_config = block_config
        self._snapshot = snapshot
        self._max_batch = max_batch
        self._interval_s = interval_s
        self._queue_size = queue_size
        self._rpc_timeout_s = rpc_timeout_s
        self._max_backoff_s = max_backoff_s
        self._heartbeat_s = heartbeat_s  # None: no heartbeats
        self._queue: deque[KvEvent] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._flush_deadline = 0.0  # monotonic; set by stop()
        self._overflowed = False
        self._need_snapshot = True
        self._superseded = False  # the registry refuses this epoch: heartbeats only
        self._min_sequence = 0
        self._next_out = 0  # sequence of the next event this stream sends after its snapshot
        self._channel: grpc.Channel | None = None
        self._thread: threading.Thread | None = None
        # Counters, for tests and logs.
        self.sent_events = 0
        self.sent_batches = 0
        self.snapshots = 0
        self.heartbeats = 0
        self.failures = 0
        self.dropped_events = 0
        self.skipped_events = 0  # published while a snapshot was due (it covers them)

    # ----------------------------------------------------------------- API
    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("publisher already started")
        self._channel = grpc.insecure_channel(
            self.target, options=RegistryEndpoint(self.target, self.authority).channel_options()
        )
        self._thread = threading.Thread(
            target=self._run, name=f"kv-event-publisher-{self.target}", daemon=True
        )
        self._thread.start()

    def publish(self, events: Sequence[KvEvent]) -> None:
        """Queue events; never blocks on I/O. On overflow the events are dropped and the next
        send is a snapshot. While a snapshot is due nothing is queued: it will cover them."""
        if not events:
            return
        with self._cond:
            if self._need_snapshot:
                self.skipped_events += len(events)
            elif self._overflowed or len(self._queue) + len(events) > self._queue_size:
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
        failed_last = False
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
            if outcome == "resync" and failed_last:
                backoff, bad_rounds = 0.1, 0  # answered after failures: a first resync request
            failed_last = outcome == "failed"
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
            if self._superseded and not self._stopping:
                return [[]]  # a heartbeat: taken, it asks for the snapshot
            idle = False
            if not self._need_snapshot:
                idle = self._wait_for_batch()
                if self._overflowed:
                    self._overflowed = False
                    self._need_snapshot = True
            if not self._need_snapshot:
                if not self._queue:
                    if self._stopping:
                        return None
                    return [[]] if idle else []  # [[]]: a heartbeat
                batch: list[KvEvent] = []
                while self._queue and len(batch) < self._max_batch:
                    ev = self._queue.popleft()
                    if ev.sequence >= self._min_sequence:
                        # Gap-free on this stream, whatever numbers other streams' snapshots took.
                        batch.append(KvEvent(self._next_out, ev.data))
                        self._next_out += 1
                return [batch] if batch else []
            self._need_snapshot = False
        # Snapshot outside our lock: it takes the engine's lock.
        events = self._snapshot()
        self.snapshots += 1
        with self._cond:
            self._min_sequence = self._next_out = events[-1].sequence + 1
            while self._queue and self._queue[0].sequence < self._min_sequence:
                self._queue.popleft()
        return [events[i : i + self._max_batch] for i in range(0, len(events), self._max_batch)]

    def _wait_for_batch(self) -> bool:
        """Block until a batch is full, `interval_s` passed since the queue became non-empty, or
        stop() was called; True when `heartbeat_s` passed with nothing queued instead. Caller
        holds the condition."""
        deadline = None if self._heartbeat_s is None else time.monotonic() + self._heartbeat_s
        while not self._queue and not self._stopping and not self._overflowed:
            if deadline is None:
                self._cond.wait()
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                return True
            self._cond.wait(left)
        self._cond.wait_for(
            lambda: len(self._queue) >= self._max_batch or self._stopping or self._overflowed,
            timeout=self._interval_s,
        )
        return False

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
        if not batch:  # a heartbeat
            req.next_sequence = self._next_out
            self.heartbeats += 1
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
            superseded = _code(exc) == grpc.StatusCode.FAILED_PRECONDITION
            if (self.failures == 1 or self.failures % 100 == 0) or (
                superseded and not self._superseded
            ):
                log.warning(
                    "PublishEvents to %s failed (%s); will resync", self.target, _describe(exc)
                )
            with self._cond:
                if superseded:
                    self._superseded = True
                    self._need_snapshot = True  # nothing queued meanwhile: the snapshot covers it
                    self._queue.clear()
                elif batch:  # a failed heartbeat lost nothing: the next one's answer decides
                    self._need_snapshot = True
            return "failed"
        with self._cond:
            self._superseded = False
        self.sent_batches += 1
        self.sent_events += len(batch)
        if resp.resync_required:
            log.info(
                "kv_registry %s asked for a resync (expects sequence %d)",
                self.target,
                resp.next_sequence,
            )
            with self._cond:
                self._need_snapshot = True
            return "resync"
        return "ok"


class RegistryFanout:
    """The engine's KV events to every kv_registry replica: one `KvEventPublisher` per registry
    (static `endpoints`, plus the pods behind `dns` re-resolved every `dns_interval_s`), with the
    same API as one publisher. `publisher_kw` are the streams' `KvEventPublisher` arguments."""

    def __init__(
        self,
        endpoints: Sequence[RegistryEndpoint],
        *,
        replica_id: str,
        epoch: str,
        block_config: BlockConfig,
        snapshot: Callable[[], list[KvEvent]],
        dns: str | None = None,
        dns_interval_s: float = kv_registries.DNS_INTERVAL_S,
        **publisher_kw: float,
    ) -> None:
        if not endpoints and not dns:
            raise ValueError("no kv_registry to publish to")
        self.replica_id = replica_id
        self.epoch = epoch
        self.block_config = block_config
        self._snapshot = snapshot
        self._static = list(endpoints)
        self._dns = dns
        self._dns_interval_s = dns_interval_s
        self._kw = publisher_kw
        self._lock = threading.Lock()
        # Replaced (never mutated) under the lock, so publish() iterates a stable tuple.
        self._streams: tuple[KvEventPublisher, ...] = ()
        self._retired: list[KvEventPublisher] = []
        self._started = False
        self._stop = threading.Event()
        self._dns_thread: threading.Thread | None = None

    # ----------------------------------------------------------------- API
    @property
    def streams(self) -> dict[str, KvEventPublisher]:
        """Current stream per registry address."""
        return {p.target: p for p in self._streams}

    def start(self) -> None:
        with self._lock:
            if self._started:
                raise RuntimeError("publisher already started")
            self._started = True
        self._reconcile(self._static)
        if self._dns:
            self._dns_thread = threading.Thread(
                target=self._discover, name="kv-registry-dns", daemon=True
            )
            self._dns_thread.start()

    def publish(self, events: Sequence[KvEvent]) -> None:
        """Queue events on every stream; never blocks on I/O."""
        for stream in self._streams:
            stream.publish(events)

    def stop(self, timeout_s: float = 5.0) -> bool:
        """Stop every stream, in parallel, within `timeout_s` (see `KvEventPublisher.stop`)."""
        self._stop.set()
        with self._lock:
            streams = [*self._streams, *self._retired]
        results: list[bool] = []
        threads = [
            threading.Thread(target=lambda p=p: results.append(p.stop(timeout_s)), daemon=True)
            for p in streams
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout_s + _CLOSE_GRACE_S + 1.0)
        if self._dns_thread is not None:
            self._dns_thread.join(1.0)
        return len(results) == len(streams) and all(results)

    # Totals over the current streams, for logs and tests.
    @property
    def queued(self) -> int:
        return sum(p.queued for p in self._streams)

    @property
    def sent_events(self) -> int:
        return sum(p.sent_events for p in self._streams)

    @property
    def snapshots(self) -> int:
        return sum(p.snapshots for p in self._streams)

    @property
    def failures(self) -> int:
        return sum(p.failures for p in self._streams)

    # ----------------------------------------------------------------- internals
    def _discover(self) -> None:
        while not self._stop.is_set():
            assert self._dns is not None
            found = kv_registries.resolve_dns_sync(self._dns)
            if found is not None and not self._stop.is_set():
                self._reconcile(kv_registries.merge(self._static, found))
            self._stop.wait(self._dns_interval_s)

    def _reconcile(self, endpoints: Sequence[RegistryEndpoint]) -> None:
        """Streams for exactly `endpoints`: new ones start (with a snapshot), gone ones stop."""
        with self._lock:
            if self._stop.is_set():
                return
            current = {p.target: p for p in self._streams}
            wanted = {e.address: e for e in endpoints}
            added = [
                KvEventPublisher(
                    e.address,
                    replica_id=self.replica_id,
                    epoch=self.epoch,
                    block_config=self.block_config,
                    snapshot=self._snapshot,
                    authority=e.authority,
                    **self._kw,  # type: ignore[arg-type]
                )
                for a, e in wanted.items()
                if a not in current
            ]
            gone = [p for a, p in current.items() if a not in wanted]
            for p in added:
                p.start()
            self._streams = (*(p for a, p in current.items() if a in wanted), *added)
            alive = [p for p in self._retired if p._thread is not None and p._thread.is_alive()]
            self._retired = [*alive, *gone]
        for p in added:
            log.info("publishing KV events to kv_registry %s", p.target)
        for p in gone:
            log.info("kv_registry %s is gone; stopping its stream", p.target)
            threading.Thread(target=p.stop, args=(1.0,), daemon=True).start()


def registry_fanout(
    settings: EmulatorSettings,
    *,
    epoch: str,
    block_config: BlockConfig,
    snapshot: Callable[[], list[KvEvent]],
) -> RegistryFanout | None:
    """The engine's publisher as its settings configure it; None when no registry is named."""
    if not settings.publishes_kv_events:
        return None
    return RegistryFanout(
        settings.kv_registry_endpoints(),
        replica_id=settings.replica_id,
        epoch=epoch,
        block_config=block_config,
        snapshot=snapshot,
        dns=settings.kv_registry_dns,
        dns_interval_s=settings.kv_registry_dns_interval_s,
        max_batch=settings.publish_max_batch,
        interval_s=settings.publish_interval_ms / 1000,
        queue_size=settings.publish_queue_size,
        rpc_timeout_s=settings.publish_timeout_s,
        heartbeat_s=settings.publish_heartbeat_s,
    )


def _code(exc: grpc.RpcError) -> grpc.StatusCode | None:
    code = getattr(exc, "code", None)
    return code() if callable(code) else None


def _describe(exc: grpc.RpcError) -> str:
    code = _code(exc)
    details = getattr(exc, "details", None)
    if code is not None and callable(details):
        return f"{code}: {details()}"
    return repr(exc)
