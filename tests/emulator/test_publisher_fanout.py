"""RegistryFanout: one engine's KV events to several registries (in-process fake registries that
accept only gap-free streams). One registry down, failing or restarting never holds back the
others, and its own stream resyncs when it is back."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest

from llmmesh.common.kv_registries import RegistryEndpoint
from llmmesh.emulator.events import KvEvent
from llmmesh.emulator.kv_cache import PagedKvCache
from llmmesh.emulator.publisher import RegistryFanout, registry_fanout
from llmmesh.emulator.settings import EmulatorSettings
from llmmesh.generated.kvregistry.v1 import kvregistry_pb2_grpc
from tests.emulator.test_publisher import CFG, FakeRegistry, wait_for


class Served:
    """A fake registry on a port that survives a restart (a new, empty registry there)."""

    def __init__(self) -> None:
        self.reg = FakeRegistry()  # type: ignore[abstract]
        self.port = 0
        self.server: grpc.Server | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        kvregistry_pb2_grpc.add_KvRegistryServiceServicer_to_server(self.reg, self.server)
        self.port = self.server.add_insecure_port(f"127.0.0.1:{self.port}")
        self.server.start()

    def kill(self) -> None:
        if self.server is not None:
            self.server.stop(grace=None)
            self.server = None

    def restart(self) -> None:
        """A new process on the same address: it knows nothing of the stream so far."""
        self.kill()
        self.reg = FakeRegistry()  # type: ignore[abstract]
        self.start()


@pytest.fixture
def two() -> Iterator[tuple[Served, Served]]:
    a, b = Served(), Served()
    a.start()
    b.start()
    yield a, b
    a.kill()
    b.kill()


class Engine:
    """A cache whose events go to a fan-out, with the lock the engine would hold."""

    def __init__(self, *addresses: str, **kw: float) -> None:
        self.cache = PagedKvCache(64, CFG)
        self.lock = threading.Lock()
        self.pub = RegistryFanout(
            [RegistryEndpoint(a) for a in addresses],
            replica_id="replica-0",
            epoch="epoch-1",
            block_config=CFG,
            snapshot=self.snapshot,
            **kw,  # type: ignore[arg-type]
        )
        self.n = 0

    def snapshot(self) -> list[KvEvent]:
        with self.lock:
            return self.cache.snapshot()

    def admit(self, count: int = 1) -> None:
        for _ in range(count):
            i = self.n
            self.n += 1
            with self.lock:
                self.cache.try_admit(f"s{i}", [i] * 4 + [i + 1] * 4 + [0], 0)
                self.cache.release(f"s{i}")
                events = self.cache.drain_events()
            self.pub.publish(events)

    def held(self) -> set[int]:
        with self.lock:
            return {h for h in self.cache._by_hash}


def in_sync(engine: Engine, served: Served) -> bool:
    with served.reg.lock:
        return served.reg.held == engine.held()


def test_one_registry_down_the_other_gets_every_event(two: tuple[Served, Served]) -> None:
    a, b = two
    a.kill()  # down from the start: nothing listens on its address
    e = Engine(a.address, b.address, rpc_timeout_s=0.2, max_backoff_s=0.05)
    e.pub.start()
    try:
        t = time.monotonic()
        for _ in range(20):
            e.admit(5)
            time.sleep(0.01)
        assert time.monotonic() - t < 2.0  # publishing never waited on the dead registry
        wait_for(lambda: in_sync(e, b))
        streams = e.pub.streams
        assert streams[b.address].snapshots == 1  # one gap-free stream: never resynced
        assert streams[b.address].failures == 0
        assert streams[a.address].failures >= 1
        assert streams[a.address].queued == 0  # a down registry queues nothing
        assert streams[a.address].skipped_events > 0
        with b.reg.lock:
            sequences = [ev.sequence for r in b.reg.requests for ev in r.events]
        assert sequences == list(range(sequences[0], sequences[0] + len(sequences)))
    finally:
        assert e.pub.stop(timeout_s=1.0)


def test_a_restarted_registry_resyncs_without_disturbing_the_other(
    two: tuple[Served, Served],
) -> None:
    a, b = two
    e = Engine(a.address, b.address, max_backoff_s=0.05)
    e.pub.start()
    try:
        e.admit(10)
        wait_for(lambda: in_sync(e, a) and in_sync(e, b))
        a.kill()
        e.admit(10)  # a is down meanwhile; b keeps receiving
        wait_for(lambda: in_sync(e, b))
        a.restart()  # empty: the next events are a gap for it -> resync_required -> snapshot
        e.admit(10)
        wait_for(lambda: in_sync(e, a) and in_sync(e, b))
        e.admit(5)
        wait_for(lambda: in_sync(e, a) and in_sync(e, b))
        streams = e.pub.streams
        assert streams[a.address].snapshots >= 2  # its own resync
        # a's snapshots took engine sequence numbers b never saw: no gap, no resync for b.
        assert streams[b.address].snapshots == 1
        with b.reg.lock:
            sequences = [ev.sequence for r in b.reg.requests for ev in r.events]
        # Gap-free from its first snapshot (which may start after a's: engine numbering).
        assert sequences == list(range(sequences[0], sequences[0] + len(sequences)))
    finally:
        assert e.pub.stop(timeout_s=1.0)


def test_one_resync_request_does_not_ping_pong(two: tuple[Served, Served]) -> None:
    a, b = two
    e = Engine(a.address, b.address)
    e.pub.start()
    try:
        e.admit(3)
        wait_for(lambda: in_sync(e, a) and in_sync(e, b))
        a.reg.force_resync = 1
        e.admit(3)
        wait_for(lambda: in_sync(e, a) and in_sync(e, b))
        for _ in range(5):
            e.admit(2)
        wait_for(lambda: in_sync(e, a) and in_sync(e, b))
        time.sleep(0.1)
        assert e.pub.streams[a.address].snapshots == 2
        assert e.pub.streams[b.address].snapshots == 1
    finally:
        assert e.pub.stop(timeout_s=1.0)


def test_dns_target_adds_a_stream_per_resolved_pod(two: tuple[Served, Served]) -> None:
    a, b = two
    e = Engine(b.address)
    e.pub = RegistryFanout(
        [RegistryEndpoint(b.address)],
        replica_id="replica-0",
        epoch="epoch-1",
        block_config=CFG,
        snapshot=e.snapshot,
        dns=f"localhost:{a.port}",
        dns_interval_s=0.05,
    )
    e.pub.start()
    try:
        wait_for(lambda: len(e.pub.streams) == 2)
        assert e.pub.streams[a.address].authority == f"localhost:{a.port}"
        e.admit(4)
        wait_for(lambda: in_sync(e, a) and in_sync(e, b))
    finally:
        assert e.pub.stop(timeout_s=1.0)


def test_settings_configure_the_fanout() -> None:
    def fanout(**kw: object) -> RegistryFanout | None:
        return registry_fanout(
            EmulatorSettings.model_validate({"replica_id": "r", **kw}),
            epoch="e",
            block_config=CFG,
            snapshot=list,
        )

    assert fanout() is None
    single = fanout(kv_registry_address="h:1")
    assert single is not None
    assert [x.address for x in single._static] == ["h:1"]
    many = fanout(kv_registry_address="h:1", kv_registry_addresses=["h:2", "h:1"])
    assert many is not None
    assert [x.address for x in many._static] == ["h:1", "h:2"]
    dns = fanout(kv_registry_dns="kv.ns.svc:50053")
    assert dns is not None
    assert dns._dns == "kv.ns.svc:50053"
    with pytest.raises(ValueError, match="host:port"):
        EmulatorSettings(kv_registry_addresses=["nope"])
