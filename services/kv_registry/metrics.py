"""kv_registry Prometheus metrics (names listed in docs/conventions.md).

Hit rates for Grafana, over any window (`source` is exact or predicted, the replica's mode when
the report came in):
- predicted hit rate: predicted_blocks_total / reported_prompt_blocks_total
- reported (engine) hit rate: reported_reused_blocks_total / reported_prompt_blocks_total
- precision of predictions: confirmed_blocks_total / predicted_blocks_total
- recall: confirmed_blocks_total / reported_reused_blocks_total
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

BLOCKS = Gauge(
    "llmmesh_kv_registry_blocks", "Blocks indexed per replica (exact or predicted).", ["replica"]
)
REPLICA_EXACT = Gauge(
    "llmmesh_kv_registry_replica_exact",
    "1 when the replica's index comes from its KV events (exact), 0 when predicted.",
    ["replica"],
)
PREDICTED_CAPACITY = Gauge(
    "llmmesh_kv_registry_predicted_capacity",
    "Adaptive bound on a predicted replica's entries (corrected by ReportReuse).",
    ["replica"],
)
ENTRIES = Gauge("llmmesh_kv_registry_entries", "Indexed (block, replica) pairs, all replicas.")
UNIQUE_BLOCKS = Gauge("llmmesh_kv_registry_unique_blocks", "Distinct block hashes in the index.")
GARBAGE = Gauge(
    "llmmesh_kv_registry_garbage_entries",
    "(block, replica) pairs of cleared or dropped replicas not yet removed (lazy cleanup).",
)
EVENTS = Counter("llmmesh_kv_registry_events_total", "KV events applied.", ["replica", "kind"])
LOOKUPS = Counter("llmmesh_kv_registry_lookups_total", "Prefix lookups served.")
RESYNCS = Counter("llmmesh_kv_registry_resyncs_total", "Resyncs requested.", ["replica"])
LOOKUP_SECONDS = Histogram(
    "llmmesh_kv_registry_lookup_seconds",
    "Lookup latency inside the registry core.",
    buckets=(1e-5, 2.5e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 5e-3, 0.02),
)
EVICTIONS = Counter(
    "llmmesh_kv_registry_evictions_total",
    "Entries dropped by the registry itself: bound (max_entries), capacity (per-replica "
    "predicted LRU), ttl, correction (ReportReuse shrank a predicted replica).",
    ["reason"],
)
ROUTINGS = Counter(
    "llmmesh_kv_registry_routings_total", "RecordRouting calls.", ["replica", "source"]
)
REPORTED_PROMPT_BLOCKS = Counter(
    "llmmesh_kv_registry_reported_prompt_blocks_total",
    "Reusable prompt blocks of requests reported with ReportReuse.",
    ["replica", "source"],
)
PREDICTED_BLOCKS = Counter(
    "llmmesh_kv_registry_predicted_blocks_total",
    "Blocks the registry predicted the replica held, for reported requests.",
    ["replica", "source"],
)
REPORTED_REUSED_BLOCKS = Counter(
    "llmmesh_kv_registry_reported_reused_blocks_total",
    "Blocks the engine reported reused (kv_cache_reused_blocks), for reported requests.",
    ["replica", "source"],
)
CONFIRMED_BLOCKS = Counter(
    "llmmesh_kv_registry_confirmed_blocks_total",
    "Predicted blocks the engine did reuse: min(predicted, reported) per request.",
    ["replica", "source"],
)
