"""The registry's metrics through the injected recorder: a `PrometheusMetrics` on a private
Prometheus registry, so every value is absolute."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry

from llmmesh.common import metric_names as names
from llmmesh.kvblocks import BlockConfig, block_hashes
from services.kv_registry.contracts import Cleared, Stored
from services.kv_registry.core import KvRegistry
from services.kv_registry.metrics import PrometheusMetrics
from services.kv_registry.settings import KvRegistrySettings
from tests.kv_registry.support import ManualClock, make_registry

CFG = BlockConfig(block_size=4, hash_seed=5)
A = block_hashes(list(range(16)), CFG)  # 4 blocks
B = block_hashes(list(range(500, 516)), CFG)


class Setup:
    def __init__(
        self,
        max_entries: int = 1000,
        capacity: int = 100,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.prom = CollectorRegistry()
        self.metrics = PrometheusMetrics(self.prom)
        self.clock = ManualClock()
        settings = KvRegistrySettings(
            max_entries=max_entries,
            max_events_per_request=100,
            predicted_ttl_s=10.0,
            predicted_capacity=capacity,
        )
        self.reg: KvRegistry = make_registry(
            CFG, settings, clock=clock or self.clock, metrics=self.metrics
        )

    def value(self, name: str, **labels: str) -> float | None:
        return self.prom.get_sample_value(name, labels)


def test_exact_replica_series() -> None:
    s = Setup()
    s.reg.ingest("r0", "e1", CFG, [Stored(0, tuple(A)), Stored(1, tuple(B[:1])), Cleared(2)])
    s.reg.ingest("r0", "e1", CFG, [Stored(3, tuple(A[:2]))])
    assert s.value(names.KV_EVENTS, replica="r0", kind="stored") == 3
    assert s.value(names.KV_EVENTS, replica="r0", kind="cleared") == 1
    assert s.value(names.KV_EVENTS, replica="r0", kind="removed") == 0
    assert s.value(names.KV_BLOCKS, replica="r0") == 2
    assert s.value(names.KV_REPLICA_EXACT, replica="r0") == 1
    assert s.value(names.KV_PREDICTED_CAPACITY, replica="r0") == 0
    assert s.value(names.KV_RESYNCS, replica="r0") is None  # no series before a first resync
    s.reg.ingest("r0", "e1", CFG, [Stored(9, tuple(B))])  # gap
    assert s.value(names.KV_RESYNCS, replica="r0") == 1
    s.reg.ingest("r0", "e2", CFG, [Stored(4, tuple(B))])  # engine restart, mid-stream
    assert s.value(names.KV_REPLICA_EXACT, replica="r0") == 0
    assert s.value(names.KV_PREDICTED_CAPACITY, replica="r0") == 100
    assert s.value(names.KV_BLOCKS, replica="r0") == 0
    assert s.value(names.KV_RESYNCS, replica="r0") == 2


def test_predicted_replica_series_and_evictions() -> None:
    s = Setup(capacity=6)
    s.reg.record_routing("p0", A)
    s.reg.record_routing("p0", B)  # 8 entries > 6: two go
    assert s.value(names.KV_ROUTINGS, replica="p0", source="predicted") == 2
    assert s.value(names.KV_BLOCKS, replica="p0") == 6
    assert s.value(names.KV_EVICTIONS, reason="capacity") == 2
    s.reg.report_reuse("p0", B, 0, predicted_blocks=4)  # full miss: capacity 6 -> 4
    assert s.value(names.KV_PREDICTED_CAPACITY, replica="p0") == 4
    assert s.value(names.KV_EVICTIONS, reason="correction") == 2
    assert s.value(names.KV_BLOCKS, replica="p0") == 4
    s.clock.now += 11
    s.reg.maintain(100)
    assert s.value(names.KV_EVICTIONS, reason="ttl") == 4
    # Nothing routed to it for longer than its predictions live: forgotten, its series too.
    assert s.value(names.KV_BLOCKS, replica="p0") is None
    s.reg.ingest("p0", "e", CFG, [Stored(0, tuple(A[:1]))])  # it publishes: exact now
    assert s.value(names.KV_REPLICA_EXACT, replica="p0") == 1
    s.reg.record_routing("p0", A)
    assert s.value(names.KV_ROUTINGS, replica="p0", source="exact") == 1
    assert s.reg.drop_replica("p0")
    # Its series go with it (replica ids come and go with pods).
    assert s.value(names.KV_BLOCKS, replica="p0") is None
    assert s.value(names.KV_REPLICA_EXACT, replica="p0") is None
    assert s.value(names.KV_ROUTINGS, replica="p0", source="exact") is None


def test_bound_evictions() -> None:
    s = Setup(max_entries=6)
    s.reg.ingest("r0", "e", CFG, [Stored(0, tuple(A))])
    s.reg.record_routing("p0", B)
    assert s.value(names.KV_EVICTIONS, reason="bound") == 2
    assert s.reg.entries == 6


def test_lookups_are_timed_on_the_injected_clock() -> None:
    ticks = iter([5.0, 5.25, 7.0, 7.5])  # a lookup reads the clock before and after
    s = Setup(clock=lambda: next(ticks))
    s.reg.lookup_hashes(A)
    s.reg.lookup(list(range(16)))
    assert s.value(names.KV_LOOKUPS) == 2
    assert s.value(names.KV_LOOKUP_SECONDS + "_sum") == 0.75
    assert s.value(names.KV_LOOKUP_SECONDS + "_count") == 2


def test_size_gauges_read_the_watched_registry() -> None:
    s = Setup()
    s.metrics.watch(s.reg)
    assert s.value(names.KV_ENTRIES) == 0
    s.reg.ingest("r0", "e", CFG, [Stored(0, tuple(A))])
    s.reg.record_routing("p0", A[:2])
    assert s.value(names.KV_ENTRIES) == 6
    assert s.value(names.KV_UNIQUE_BLOCKS) == 6  # keys summed over both indexes
    assert s.value(names.KV_GARBAGE_ENTRIES) == 0


def test_two_recorders_do_not_share_series() -> None:
    first, second = Setup(), Setup()
    first.reg.record_routing("p0", A)
    assert first.value(names.KV_BLOCKS, replica="p0") == 4
    assert second.value(names.KV_BLOCKS, replica="p0") is None
