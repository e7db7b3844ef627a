"""The gateway's metrics: latency series exported from 0 for every model served and pool known,
and none for a model no request used."""

from __future__ import annotations

from prometheus_client import REGISTRY

from llmmesh.common import metric_names as names
from services.gateway import metrics


def ttft_count(model: str, pool: str) -> float | None:
    labels = {"model": model, "pool": pool}
    return REGISTRY.get_sample_value(f"{names.GATEWAY_TTFT}_count", labels)


def itl_count(model: str, pool: str) -> float | None:
    labels = {"model": model, "pool": pool}
    return REGISTRY.get_sample_value(f"{names.GATEWAY_ITL}_count", labels)


def test_a_pool_learned_after_a_model_was_served_gets_its_series_at_zero() -> None:
    metrics.StreamMetrics("model-first", "pool-served", None)
    assert ttft_count("model-first", "pool-later") is None
    metrics.record_pools_known(["pool-later"])
    assert ttft_count("model-first", "pool-later") == 0.0
    assert itl_count("model-first", "pool-later") == 0.0


def test_a_model_served_after_the_pools_were_learned_gets_their_series_at_zero() -> None:
    metrics.record_pools_known(["pool-first", "pool-other"])
    assert ttft_count("model-later", "pool-other") is None  # no request for it yet: none
    metrics.StreamMetrics("model-later", "pool-first", None)
    assert ttft_count("model-later", "pool-first") == 0.0
    assert ttft_count("model-later", "pool-other") == 0.0
    assert itl_count("model-later", "pool-other") == 0.0
