"""The publisher against an in-process gRPC KvRegistryService that records what it gets."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures

import grpc
import pytest

from llmmesh.emulator.events import AllBlocksCleared, BlocksStored, KvEvent, StoredBlock
from llmmesh.emulator.kv_cache import PagedKvCache
from llmmesh.emulator.publisher import KvEventPublisher, event_to_proto
from llmmesh.generated.kvregistry.v1 import kvregistry_pb2, kvregistry_pb2_grpc
from llmmesh.kvblocks import BlockConfig

CFG = BlockConfig(block_size=4, hash_seed=3)


class FakeRegistry(kvregistry_pb2_grpc.KvRegistryServiceServicer):
    """Accepts gap-free streams; a `cleared` event restarts the stream at its sequence."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: list[kvregistry_pb2.PublishEventsRequest] = []
        self.next_sequence = 0
        self.held: set[int] = set()
        self.fail = False
        self.supersede = False  # refuses the epoch, as a registry keeping a later lifetime
        self.force_resync = 0
        self.gate = threading.Event()  # cleared: calls block until it is set again
        self.gate.set()

    def PublishEvents(
        self, request: kvregistry_pb2.PublishEventsRequest, context: grpc.ServicerContext
    ) -> kvregistry_pb2.PublishEventsResponse:
        self.gate.wait()
        with self.lock:
            if self.fail:
                context.abort(grpc.StatusCode.UNAVAILABLE, "registry down")
            self.requests.append(request)
            if self.supersede:
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, "a later lifetime is kept")
            if not request.events and request.HasField("next_sequence"):  # a heartbeat
                return kvregistry_pb2.PublishEventsResponse(
                    next_sequence=self.next_sequence,
                    resync_required=request.next_sequence != self.next_sequence,
                )
            if self.force_resync:
                self.force_resync -= 1
                return kvregistry_pb2.PublishEventsResponse(
                    next_sequence=self.next_sequence, resync_required=True
                )
            for ev in request.events:
                kind = ev.WhichOneof("kind")
                if kind == "cleared":
                    self.held.clear()
                    self.next_sequence = ev.sequence
                if ev.sequence != self.next_sequence:
                    return kvregistry_pb2.PublishEventsResponse(
                        next_sequence=self.next_sequence, resync_required=True
                    )
                self.next_sequence += 1
                if kind == "stored":
                    self.held.update(b.block_hash for b in ev.stored.blocks)
                elif kind == "removed":
                    self.held.difference_update(ev.removed.block_hashes)
            return kvregistry_pb2.PublishEventsResponse(next_sequence=self.next_sequence)

    def Lookup(
        self, request: kvregistry_pb2.LookupRequest, context: grpc.ServicerContext
    ) -> kvregistry_pb2.LookupResponse:
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "not used by the publisher")

    def forget(self) -> None:
        """As a restarted registry: nothing held, the stream's next sequence unknown (0)."""
        with self.lock:
            self.held.clear()
            self.next_sequence = 0

    def kinds(self) -> list[str]:
        with self.lock:
            return [str(e.WhichOneof("kind")) for r in self.requests for e in r.events]


@pytest.fixture
def registry() -> Iterator[tuple[FakeRegistry, str]]:
    reg = FakeRegistry()  # type: ignore[abstract]  # serves PublishEvents and Lookup only
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    kvregistry_pb2_grpc.add_KvRegistryServiceServicer_to_server(reg, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield reg, f"127.0.0.1:{port}"
    server.stop(grace=None)


def wait_for(cond: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


class Harness:
    """A cache whose events go through a publisher, with the cache lock the engine would hold."""

    def __init__(self, target: str, **kw: float) -> None:
        self.cache = PagedKvCache(64, CFG)
        self.lock = threading.Lock()
        self.pub = KvEventPublisher(
            target,
            replica_id="replica-0",
            epoch="epoch-1",
            block_config=CFG,
            snapshot=self.snapshot,
            **kw,  # type: ignore[arg-type]
        )

    def snapshot(self) -> list[KvEvent]:
        with self.lock:
            return self.cache.snapshot()

    def admit(self, sid: str, prompt: list[int]) -> None:
        with self.lock:
            self.cache.try_admit(sid, prompt, 0)
            events = self.cache.drain_events()
        self.pub.publish(events)


def test_event_to_proto() -> None:
    ev = KvEvent(3, BlocksStored(None, (StoredBlock(9, (1, 2, 3, 4)),)))
    msg = event_to_proto(ev)
    assert msg.sequence == 3
    assert not msg.stored.HasField("parent_hash")
    assert list(msg.stored.blocks[0].token_ids) == [1, 2, 3, 4]
    msg = event_to_proto(KvEvent(4, BlocksStored(9, (StoredBlock(10, (5, 6, 7, 8)),))))
    assert msg.stored.parent_hash == 9
    assert event_to_proto(KvEvent(5, AllBlocksCleared())).WhichOneof("kind") == "cleared"


def test_an_idle_stream_heartbeats_and_resyncs_a_registry_that_forgot_it(
    registry: tuple[FakeRegistry, str],
) -> None:
    reg, target = registry
    h = Harness(target, heartbeat_s=0.05)
    h.pub.start()
    try:
        h.admit("a", list(range(9)))
        wait_for(lambda: len(reg.held) == 2)
        wait_for(lambda: h.pub.heartbeats >= 2)  # idle, in step: no snapshot asked
        snapshots = h.pub.snapshots
        reg.forget()
        wait_for(lambda: len(reg.held) == 2)  # no new event: a heartbeat brought the snapshot
        assert h.pub.snapshots == snapshots + 1
    finally:
        h.pub.stop()


@contextlib.contextmanager
def in_step(reg: FakeRegistry, target: str) -> Iterator[Harness]:
    """A publisher heartbeating every 50 ms (backing off at most as long) whose registry holds
    its first prompt's two blocks; stopped on exit."""
    h = Harness(target, heartbeat_s=0.05, max_backoff_s=0.05)
    h.pub.start()
    try:
        h.admit("a", list(range(9)))
        wait_for(lambda: len(reg.held) == 2)
        yield h
    finally:
        h.pub.stop()


def test_a_failed_heartbeat_takes_no_snapshot(registry: tuple[FakeRegistry, str]) -> None:
    reg, target = registry
    with in_step(reg, target) as h:
        snapshots = h.pub.snapshots
        with reg.lock:
            reg.fail = True
        wait_for(lambda: h.pub.failures >= 2)  # heartbeats to a registry that is down
        with reg.lock:
            reg.fail = False
        beats = h.pub.heartbeats
        wait_for(lambda: h.pub.heartbeats >= beats + 2)  # answered, in step
        assert h.pub.snapshots == snapshots  # it lost nothing: nothing to resend


def test_a_refused_epoch_gets_heartbeats_only_until_it_is_taken(
    registry: tuple[FakeRegistry, str],
) -> None:
    """A registry keeping a later lifetime of the replica id refuses this one: it was sent a
    full snapshot (taken under the engine's lock) after every refusal, which it parsed and
    refused again, for as long as the refusal lasted."""
    reg, target = registry
    with in_step(reg, target) as h:
        snapshots = h.pub.snapshots
        with reg.lock:
            reg.supersede = True
            refused_from = len(reg.requests)
        h.admit("b", list(range(100, 109)))
        wait_for(lambda: h.pub.failures >= 4)
        with reg.lock:
            during = reg.requests[refused_from + 1 :]  # after the first refused batch
            reg.supersede = False
        assert during
        assert all(not r.events and r.HasField("next_sequence") for r in during)
        assert h.pub.snapshots == snapshots
        wait_for(lambda: len(reg.held) == 4)  # taken: the snapshot has both prompts
        assert h.pub.snapshots == snapshots + 1


def test_without_a_heartbeat_an_idle_stream_sends_nothing(
    registry: tuple[FakeRegistry, str],
) -> None:
    reg, target = registry
    h = Harness(target)
    h.pub.start()
    try:
        h.admit("a", list(range(9)))
        wait_for(lambda: len(reg.held) == 2)
        calls = len(reg.requests)
        time.sleep(0.3)  # many batch intervals with nothing to send (observing an absence)
        assert len(reg.requests) == calls
        assert h.pub.heartbeats == 0
    finally:
        h.pub.stop()


def test_starts_with_a_snapshot_then_streams(registry: tuple[FakeRegistry, str]) -> None:
    reg, target = registry
    h = Harness(target)
    h.pub.start()
    try:
        wait_for(lambda: reg.kinds()[:1] == ["cleared"])
        h.admit("a", list(range(9)))
        h.admit("b", list(range(100, 105)))
        wait_for(lambda: len(reg.held) == 3)
    finally:
        h.pub.stop()
    req = reg.requests[0]
    assert (req.replica_id, req.epoch, req.block_size, req.hash_seed) == (
        "replica-0",
        "epoch-1",
        4,
        3,
    )
    assert reg.kinds() == ["cleared", "stored", "stored"]
    assert reg.next_sequence == h.cache.next_sequence


def test_resync_required_triggers_a_snapshot(registry: tuple[FakeRegistry, str]) -> None:
    reg, target = registry
    h = Harness(target)
    h.pub.start()
    try:
        wait_for(lambda: reg.next_sequence == 1)
        reg.force_resync = 1
        h.admit("a", list(range(9)))  # rejected with resync_required
        wait_for(lambda: h.pub.snapshots == 2 and len(reg.held) == 2)
        h.admit("b", list(range(50, 55)))
        wait_for(lambda: len(reg.held) == 3)
    finally:
        h.pub.stop()
    assert reg.next_sequence == h.cache.next_sequence


def test_unreachable_registry_then_recovery(registry: tuple[FakeRegistry, str]) -> None:
    reg, target = registry
    reg.fail = True
    h = Harness(target, max_backoff_s=0.05)
    h.pub.start()
    try:
        h.admit("a", list(range(9)))
        wait_for(lambda: h.pub.failures >= 2)
        reg.fail = False
        wait_for(lambda: len(reg.held) == 2)
        h.admit("b", list(range(50, 55)))
        wait_for(lambda: len(reg.held) == 3)
    finally:
        h.pub.stop()
    assert reg.next_sequence == h.cache.next_sequence


def test_overflow_drops_events_and_resyncs(registry: tuple[FakeRegistry, str]) -> None:
    reg, target = registry
    h = Harness(target, queue_size=2, max_batch=1)
    h.pub.start()
    try:
        wait_for(lambda: reg.next_sequence == 1)
        reg.gate.clear()  # the registry stalls: the publisher thread is stuck in a call
        h.admit("s0", [0] * 4 + [0])
        wait_for(lambda: h.pub.queued == 0)  # s0's event is in flight
        for i in range(1, 6):
            h.admit(f"s{i}", [i] * 4 + [0])
        assert h.pub.dropped_events > 0
        reg.gate.set()
        wait_for(lambda: len(reg.held) == 6)
    finally:
        h.pub.stop()
    assert h.pub.snapshots == 2
    assert reg.next_sequence == h.cache.next_sequence


def test_stop_flushes_queued_events(registry: tuple[FakeRegistry, str]) -> None:
    reg, target = registry
    h = Harness(target, interval_s=30.0, max_batch=1000)
    h.pub.start()
    wait_for(lambda: reg.next_sequence == 1)
    h.admit("a", list(range(9)))
    h.pub.stop()  # does not wait 30 s for the batch to fill
    assert len(reg.held) == 2


def test_publish_never_blocks_when_registry_hangs() -> None:
    # Nothing listens on this address: calls fail, publish() still returns at once.
    h = Harness("127.0.0.1:1", rpc_timeout_s=0.2, max_backoff_s=0.05)
    h.pub.start()
    try:
        t = time.monotonic()
        for i in range(200):
            h.admit(f"s{i}", [i % 7] * 5)
        assert time.monotonic() - t < 2.0
    finally:
        h.pub.stop(timeout_s=2.0)


def test_stop_is_bounded_when_a_call_hangs(registry: tuple[FakeRegistry, str]) -> None:
    reg, target = registry
    reg.gate.clear()  # the registry accepts calls but never answers them
    h = Harness(target, rpc_timeout_s=3600.0)
    h.pub.start()
    try:
        wait_for(lambda: h.pub.snapshots == 1)  # the first snapshot is being sent
        h.admit("a", list(range(9)))
        # The flush gives up at the deadline and closing the channel ends the hung call: the
        # thread is gone when stop() returns, not an hour later.
        assert h.pub.stop(timeout_s=0.2) is True
        assert h.pub._thread is not None
        assert not h.pub._thread.is_alive()
    finally:
        reg.gate.set()


def test_stop_sends_no_snapshot(registry: tuple[FakeRegistry, str]) -> None:
    reg, target = registry
    h = Harness(target, interval_s=30.0)
    h.admit("a", list(range(9)))
    h.pub.start()  # the first thing due is a snapshot
    assert h.pub.stop() is True
    assert h.pub.snapshots in (0, 1)  # taken only if the thread got there before stop()
    assert len(reg.requests) == h.pub.snapshots
