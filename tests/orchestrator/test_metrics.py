"""The orchestrator's exported series: what Prometheus can compute a rate from."""

from __future__ import annotations

from prometheus_client import REGISTRY

from llmmesh.common import metric_names as names
from services.orchestrator import metrics

DECISIONS = names.ORCH_DECISIONS


def decisions(model: str, replica: str, pool: str) -> float | None:
    return REGISTRY.get_sample_value(DECISIONS, {"model": model, "replica": replica, "pool": pool})


def waits(model: str, pool: str) -> float | None:
    labels = {"model": model, "pool": pool}
    return REGISTRY.get_sample_value(f"{names.ORCH_QUEUE_WAIT}_count", labels)


def test_a_models_first_grant_exports_every_known_replica_from_zero() -> None:
    metrics.record_replica_known("zero-a", "zp")
    metrics.record_replica_known("zero-b", "zq")
    assert decisions("zero-model", "zero-a", "zp") is None  # no model granted yet: no series
    metrics.record_grant("zero-model", "zero-a", "zp", 0.0, 0, 0)
    assert decisions("zero-model", "zero-a", "zp") == 1.0
    # The replica not chosen has a series at 0, so its first grant is a visible increase.
    assert decisions("zero-model", "zero-b", "zq") == 0.0
    # So has its pool's queue wait.
    assert (waits("zero-model", "zp"), waits("zero-model", "zq")) == (1.0, 0.0)


def test_a_replica_known_after_a_grant_exports_the_granted_models_from_zero() -> None:
    metrics.record_grant("late-model", "late-a", "lp", 0.0, 0, 0)
    metrics.record_replica_known("late-b", "lp")
    assert decisions("late-model", "late-b", "lp") == 0.0
    assert decisions("late-model", "late-a", "lp") == 1.0
    metrics.record_replica_known("late-c", "lq")  # a pool no grant was in
    assert (waits("late-model", "lp"), waits("late-model", "lq")) == (1.0, 0.0)
