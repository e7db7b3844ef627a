"""The gateway's metrics: latency series exported from 0 for every served model and known pool."""

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


def test_a_pool_learned_after_the_models_gets_their_series_at_zero() -> None:
    metrics.declare_models(["model-first"])
    assert ttft_count("model-first", "pool-later") is None
    metrics.record_pools_known(["pool-later"])
    assert ttft_count("model-first", "pool-later") == 0.0
    assert itl_count("model-first", "pool-later") == 0.0


def test_a_model_declared_after_the_pools_gets_their_series_at_zero() -> None:
    metrics.record_pools_known(["pool-first"])
    assert ttft_count("model-later", "pool-first") is None
    metrics.declare_models(["model-later"])
    assert ttft_count("model-later", "pool-first") == 0.0
    assert itl_count("model-later", "pool-first") == 0.0
