"""kv_registry metrics: the recorder interface the indexes write to, a no-op recorder, and the
Prometheus one (names from `llmmesh.common.metric_names`, listed in docs/conventions.md).

The indexes hold a `RegistryMetrics` and never create metric objects; the service edge builds a
`PrometheusMetrics` on the process registry and `watch`es the registry's sizes. Per-replica
series are bound once per replica (`replica`), so a write updates a bound child, never a label
lookup.

Hit rates for Grafana, over any window (`source` is exact or predicted, the replica's mode when
the report came in):
- predicted hit rate: predicted_blocks_total / reported_prompt_blocks_total
- reported (engine) hit rate: reported_reused_blocks_total / reported_prompt_blocks_total
- precision of predictions: confirmed_blocks_total / predicted_blocks_total
- recall: confirmed_blocks_total / reported_reused_blocks_total
"""

from __future__ import annotations

import enum
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from llmmesh.common import metric_names as names
from llmmesh.common.telemetry import remove_series
from services.kv_registry.contracts import Source


class EvictionReason(enum.StrEnum):
    """Why the registry itself dropped entries (the `reason` label)."""

    BOUND = "bound"  # max_entries
    CAPACITY = "capacity"  # a predicted replica's LRU capacity
    TTL = "ttl"
    CORRECTION = "correction"  # ReportReuse shrank a predicted replica's capacity


class ReplicaMetrics(Protocol):
    """One replica's series."""

    def blocks(self, count: int) -> None: ...
    def events(self, stored: int, removed: int, cleared: int) -> None: ...
    def resync(self) -> None: ...
    def mode(self, source: Source, predicted_capacity: int) -> None: ...
    def predicted_capacity(self, capacity: int) -> None: ...
    def forgotten(self) -> None:
        """The replica was dropped: it holds nothing and is not exact."""
        ...


class RegistryMetrics(Protocol):
    def replica(self, replica_id: str) -> ReplicaMetrics: ...
    def evicted(self, reason: EvictionReason, n: int) -> None: ...
    def lookup(self, seconds: float) -> None: ...
    def routing(self, replica_id: str, source: Source) -> None: ...
    def reuse(
        self,
        replica_id: str,
        source: Source,
        reusable: int,
        predicted: int,
        reported: int,
        confirmed: int,
    ) -> None: ...


class IndexSizes(Protocol):
    """What the size gauges read at scrape time."""

    @property
    def entries(self) -> int: ...
    @property
    def unique_blocks(self) -> int: ...
    @property
    def garbage_entries(self) -> int: ...


class NoMetrics:
    """Records nothing (tests, benchmarks of the bare index). Also its own replica recorder."""

    def replica(self, replica_id: str) -> NoMetrics:
        return self

    def evicted(self, reason: EvictionReason, n: int) -> None:
        pass

    def lookup(self, seconds: float) -> None:
        pass

    def routing(self, replica_id: str, source: Source) -> None:
        pass

    def reuse(
        self,
        replica_id: str,
        source: Source,
        reusable: int,
        predicted: int,
        reported: int,
        confirmed: int,
    ) -> None:
        pass

    def blocks(self, count: int) -> None:
        pass

    def events(self, stored: int, removed: int, cleared: int) -> None:
        pass

    def resync(self) -> None:
        pass

    def mode(self, source: Source, predicted_capacity: int) -> None:
        pass

    def predicted_capacity(self, capacity: int) -> None:
        pass

    def forgotten(self) -> None:
        pass


NO_METRICS = NoMetrics()


class _PrometheusReplica:
    __slots__ = (
        "_blocks",
        "_capacity",
        "_cleared",
        "_exact",
        "_id",
        "_m",
        "_removed",
        "_resyncs",
        "_stored",
    )

    def __init__(self, replica_id: str, m: PrometheusMetrics) -> None:
        self._id = replica_id
        self._m = m
        self._blocks = m.blocks.labels(replica_id)
        self._stored = m.events.labels(replica_id, "stored")
        self._removed = m.events.labels(replica_id, "removed")
        self._cleared = m.events.labels(replica_id, "cleared")
        self._exact = m.replica_exact.labels(replica_id)
        self._capacity = m.predicted_capacity.labels(replica_id)
        self._resyncs = m.resyncs  # labelled on first resync: no series for replicas without one

    def blocks(self, count: int) -> None:
        self._blocks.set(count)

    def events(self, stored: int, removed: int, cleared: int) -> None:
        if stored:
            self._stored.inc(stored)
        if removed:
            self._removed.inc(removed)
        if cleared:
            self._cleared.inc(cleared)

    def resync(self) -> None:
        self._resyncs.labels(self._id).inc()

    def mode(self, source: Source, predicted_capacity: int) -> None:
        self._exact.set(1 if source is Source.EXACT else 0)
        self._capacity.set(predicted_capacity)

    def predicted_capacity(self, capacity: int) -> None:
        self._capacity.set(capacity)

    def forgotten(self) -> None:
        self._m.forget(self._id)


class PrometheusMetrics:
    """The registry's metrics, registered in `registry` (the process registry in the service)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.blocks = Gauge(
            names.KV_BLOCKS,
            "Blocks indexed per replica (exact or predicted).",
            ["replica"],
            registry=registry,
        )
        self.replica_exact = Gauge(
            names.KV_REPLICA_EXACT,
            "1 when the replica's index comes from its KV events (exact), 0 when predicted.",
            ["replica"],
            registry=registry,
        )
        self.predicted_capacity = Gauge(
            names.KV_PREDICTED_CAPACITY,
            "Adaptive bound on a predicted replica's entries (corrected by ReportReuse).",
            ["replica"],
            registry=registry,
        )
        self.entries = Gauge(
            names.KV_ENTRIES, "Indexed (block, replica) pairs, all replicas.", registry=registry
        )
        self.unique_blocks = Gauge(
            names.KV_UNIQUE_BLOCKS,
            "Block hashes in the index (summed over the exact and the predicted index).",
            registry=registry,
        )
        self.garbage = Gauge(
            names.KV_GARBAGE_ENTRIES,
            "(block, replica) pairs of cleared or dropped replicas not yet removed (lazy cleanup).",
            registry=registry,
        )
        self.events = Counter(
            names.KV_EVENTS, "KV events applied.", ["replica", "kind"], registry=registry
        )
        self.lookups = Counter(names.KV_LOOKUPS, "Prefix lookups served.", registry=registry)
        self.resyncs = Counter(
            names.KV_RESYNCS, "Resyncs requested.", ["replica"], registry=registry
        )
        self.lookup_seconds = Histogram(
            names.KV_LOOKUP_SECONDS,
            "Lookup latency inside the registry core.",
            # Up past the alert's 50 ms (LlmmeshKvRegistryLookupSlow): a quantile above the top
            # bucket reads as that bucket's bound.
            buckets=(1e-5, 2.5e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 5e-3, 0.02, 0.05, 0.1, 0.25),
            registry=registry,
        )
        self.evictions = Counter(
            names.KV_EVICTIONS,
            "Entries dropped by the registry itself: bound (max_entries), capacity (per-replica "
            "predicted LRU), ttl, correction (ReportReuse shrank a predicted replica).",
            ["reason"],
            registry=registry,
        )
        self.routings = Counter(
            names.KV_ROUTINGS, "RecordRouting calls.", ["replica", "source"], registry=registry
        )
        self.reported_prompt_blocks = Counter(
            names.KV_REPORTED_PROMPT_BLOCKS,
            "Reusable prompt blocks of requests reported with ReportReuse.",
            ["replica", "source"],
            registry=registry,
        )
        self.predicted_blocks = Counter(
            names.KV_PREDICTED_BLOCKS,
            "Blocks the registry predicted the replica held, for reported requests.",
            ["replica", "source"],
            registry=registry,
        )
        self.reported_reused_blocks = Counter(
            names.KV_REPORTED_REUSED_BLOCKS,
            "Blocks the engine reported reused (kv_cache_reused_blocks), for reported requests.",
            ["replica", "source"],
            registry=registry,
        )
        self.confirmed_blocks = Counter(
            names.KV_CONFIRMED_BLOCKS,
            "Predicted blocks the engine did reuse: min(predicted, reported) per request.",
            ["replica", "source"],
            registry=registry,
        )
        self._replicas: dict[str, _PrometheusReplica] = {}

    def watch(self, sizes: IndexSizes) -> None:
        """The size gauges read `sizes` at scrape time."""
        self.entries.set_function(lambda: float(sizes.entries))
        self.unique_blocks.set_function(lambda: float(sizes.unique_blocks))
        self.garbage.set_function(lambda: float(sizes.garbage_entries))

    def replica(self, replica_id: str) -> _PrometheusReplica:
        found = self._replicas.get(replica_id)
        if found is None:
            found = self._replicas[replica_id] = _PrometheusReplica(replica_id, self)
        return found

    def forget(self, replica_id: str) -> None:
        """Remove a dropped replica's series (replica ids come and go with pods: kept, they
        would only grow); it gets new ones if it comes back."""
        self._replicas.pop(replica_id, None)
        one = (self.blocks, self.replica_exact, self.predicted_capacity, self.resyncs)
        by_source = (
            self.routings,
            self.reported_prompt_blocks,
            self.predicted_blocks,
            self.reported_reused_blocks,
            self.confirmed_blocks,
        )
        remove_series(
            [
                *((m, (replica_id,)) for m in one),
                *((self.events, (replica_id, k)) for k in ("stored", "removed", "cleared")),
                *((m, (replica_id, s.value)) for m in by_source for s in Source),
            ]
        )

    def evicted(self, reason: EvictionReason, n: int) -> None:
        self.evictions.labels(reason.value).inc(n)

    def lookup(self, seconds: float) -> None:
        self.lookups.inc()
        self.lookup_seconds.observe(seconds)

    def routing(self, replica_id: str, source: Source) -> None:
        self.routings.labels(replica_id, source.value).inc()

    def reuse(
        self,
        replica_id: str,
        source: Source,
        reusable: int,
        predicted: int,
        reported: int,
        confirmed: int,
    ) -> None:
        labels = (replica_id, source.value)
        self.reported_prompt_blocks.labels(*labels).inc(reusable)
        self.predicted_blocks.labels(*labels).inc(predicted)
        self.reported_reused_blocks.labels(*labels).inc(reported)
        self.confirmed_blocks.labels(*labels).inc(confirmed)
