"""The orchestrator's Prometheus metrics and the only functions that update them.

Components call `record_*`; none touches a metric object. Names come from
`llmmesh.common.metric_names`.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import Counter, Gauge, Histogram

from llmmesh.common import metric_names as names
from llmmesh.common.telemetry import remove_series

_QUEUE_DEPTH = Gauge(names.ORCH_QUEUE_DEPTH, "Requests waiting for admission.", ["model"])
# By the granted replica's pool too: the autoscaler judges each pool by its own wait.
_QUEUE_WAIT = Histogram(
    names.ORCH_QUEUE_WAIT,
    "Time from Admit to lease.",
    ["model", "pool"],
    buckets=(0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30),
)
_DECISIONS = Counter(names.ORCH_DECISIONS, "Leases granted.", ["model", "replica", "pool"])
_REJECTIONS = Counter(names.ORCH_REJECTIONS, "Admissions refused.", ["model", "reason"])
_IN_FLIGHT = Gauge(names.ORCH_REPLICA_IN_FLIGHT, "Live leases per replica.", ["replica", "pool"])
_HEALTHY = Gauge(names.ORCH_REPLICA_HEALTHY, "1 if the replica is ready.", ["replica", "pool"])
_PREFIX_HIT = Counter(
    names.ORCH_PREFIX_HIT_BLOCKS,
    "Prompt blocks kv_registry said the chosen replica holds (live leases' prompts not counted).",
    ["replica"],
)
_PROMPT_BLOCKS = Counter(names.ORCH_PROMPT_BLOCKS, "Full prompt blocks routed.", ["replica"])
_POOL_QUEUE_DEPTH = Gauge(
    names.ORCH_POOL_QUEUE_DEPTH,
    "Requests waiting for admission, by the pool (and model version) they would run in.",
    ["pool", "model_version"],
)
_POOL_READY = Gauge(
    names.ORCH_POOL_READY,
    "Replicas the orchestrator routes to (ready, not ejected, not draining).",
    ["pool", "model_version"],
)
_KV_UPDATES_DROPPED = Counter(
    names.ORCH_KV_UPDATES_DROPPED,
    "Approximate-mode kv_registry updates dropped unsent because the update queue was full.",
)
_KV_LOOKUPS = Counter(
    names.ORCH_KV_LOOKUPS,
    "Prefix lookups, by where they were answered: the orchestrator's copy of kv_registry's exact "
    "index (mirror) or kv_registry (registry); config_mismatch: the caller's block hashes were "
    "computed with another KV block config (routed cache-blind unless the prompt came too).",
    ["via"],
)
_KV_LOOKUPS_VIA = {
    via: _KV_LOOKUPS.labels(via) for via in ("mirror", "registry", "config_mismatch")
}
_KV_MIRROR_SYNCED = Gauge(
    names.ORCH_KV_MIRROR_SYNCED,
    "1 while the copy of kv_registry's exact index is in sync (WatchExact).",
)
_KV_MIRROR_BLOCKS = Gauge(
    names.ORCH_KV_MIRROR_BLOCKS, "Block hashes in the copy of kv_registry's exact index."
)
_SOJOURN = Histogram(
    names.ORCH_SOJOURN,
    "How long Admits waited between their sending and their handler's start (less their "
    "caller's baseline: llmmesh/common/sojourn.py).",
    buckets=(0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2, 5),
)
_SHED_LEVEL = Gauge(
    names.ORCH_SHED_LEVEL,
    "Admit shedding level, 0-1: batch refused in proportion up to 1/3, then standard, then "
    "interactive (services/orchestrator/shedding.py).",
)
_EJECTIONS = Counter(
    names.ORCH_EJECTIONS, "Replicas ejected after repeated errors.", ["replica", "pool"]
)


# Labelled children by (metric, label values): `labels()` costs a lock and a tuple build per
# call; the per-decision updates below look their children up here instead. A child is removed
# from its metric only with its replica (`record_replica_forgotten`), and from here with it, so a
# cached child is the exported one.
_CHILDREN: dict[tuple[object, tuple[str, ...]], Any] = {}

# A counter series that appears with its first increment loses that increment to PromQL's
# `rate()` (it has no earlier sample to rise from). Every (model, replica) pair the orchestrator
# knows of therefore exports its decision count, and every (model, pool) pair its queue wait,
# from 0: a model's series for all known replicas and their pools are created at its first
# grant, a replica's (and its pool's) for all granted models when it becomes known.
_KNOWN_REPLICAS: dict[str, str] = {}
_GRANTED_MODELS: set[str] = set()


def _child(metric: Counter | Gauge | Histogram, *labels: str) -> Any:
    key = (metric, labels)
    child = _CHILDREN.get(key)
    if child is None:
        child = _CHILDREN[key] = metric.labels(*labels)
    return child


def record_replica_known(replica: str, pool: str) -> None:
    """A replica entered the set: it reports unhealthy with no leases until probed."""
    _HEALTHY.labels(replica, pool).set(0)
    _IN_FLIGHT.labels(replica, pool).set(0)
    _KNOWN_REPLICAS[replica] = pool
    for model in _GRANTED_MODELS:
        _child(_DECISIONS, model, replica, pool)
        _child(_QUEUE_WAIT, model, pool)


def record_replica_forgotten(replica: str, pool: str) -> None:
    """A replica left the set with no lease left: its series go (replica ids come and go with
    pods: kept, they would only grow); it gets new ones if it comes back."""
    _KNOWN_REPLICAS.pop(replica, None)
    per_replica: list[tuple[Counter | Gauge, tuple[str, ...]]] = [
        (_IN_FLIGHT, (replica, pool)),
        (_HEALTHY, (replica, pool)),
        (_EJECTIONS, (replica, pool)),
        (_PREFIX_HIT, (replica,)),
        (_PROMPT_BLOCKS, (replica,)),
        *((_DECISIONS, (model, replica, pool)) for model in _GRANTED_MODELS),
    ]
    for metric, labels in per_replica:
        _CHILDREN.pop((metric, labels), None)
    remove_series(per_replica)


def record_in_flight(replica: str, pool: str, in_flight: int) -> None:
    _child(_IN_FLIGHT, replica, pool).set(in_flight)


def record_healthy(replica: str, pool: str, healthy: bool) -> None:
    if _KNOWN_REPLICAS.get(replica) == pool:  # a probe may end after its replica was forgotten
        _child(_HEALTHY, replica, pool).set(1 if healthy else 0)


def record_ejection(replica: str, pool: str) -> None:
    if _KNOWN_REPLICAS.get(replica) == pool:
        _child(_EJECTIONS, replica, pool).inc()


def record_pool_ready(pool: str, model_version: str, ready: int) -> None:
    _POOL_READY.labels(pool, model_version).set(ready)
    # A known pool's queue depth is a series (0) before anything queues: dashboards and the
    # autoscaler's PromQL source read 0, not "no data".
    _POOL_QUEUE_DEPTH.labels(pool, model_version)


def record_enqueued(model: str, pool_key: tuple[str, str]) -> None:
    _QUEUE_DEPTH.labels(model).inc()
    _POOL_QUEUE_DEPTH.labels(*pool_key).inc()


def record_dequeued(model: str, pool_key: tuple[str, str]) -> None:
    _QUEUE_DEPTH.labels(model).dec()
    _POOL_QUEUE_DEPTH.labels(*pool_key).dec()


def record_rejection(model: str, reason: str) -> None:
    _REJECTIONS.labels(model, reason).inc()


def record_grant(
    model: str,
    replica: str,
    pool: str,
    queue_s: float,
    prompt_blocks: int,
    hit_blocks: int,
) -> None:
    if model not in _GRANTED_MODELS:
        _GRANTED_MODELS.add(model)
        for known, known_pool in _KNOWN_REPLICAS.items():
            _child(_DECISIONS, model, known, known_pool)
            _child(_QUEUE_WAIT, model, known_pool)
    _child(_DECISIONS, model, replica, pool).inc()
    _child(_QUEUE_WAIT, model, pool).observe(queue_s)
    if prompt_blocks:
        _child(_PROMPT_BLOCKS, replica).inc(prompt_blocks)
        _child(_PREFIX_HIT, replica).inc(hit_blocks)


def record_kv_update_dropped() -> None:
    _KV_UPDATES_DROPPED.inc()


def record_sojourn(sojourn_s: float) -> None:
    _SOJOURN.observe(sojourn_s)


def record_shed_level(level: float) -> None:
    _SHED_LEVEL.set(level)


def record_kv_lookup(via: str) -> None:
    _KV_LOOKUPS_VIA[via].inc()


def set_kv_mirror(synced: bool, blocks: int) -> None:
    _KV_MIRROR_SYNCED.set(1 if synced else 0)
    _KV_MIRROR_BLOCKS.set(blocks)
