from __future__ import annotations

import pytest

from llmmesh.common.discovery import DnsTarget
from llmmesh.common.engine_metrics import EngineSample, parse_engine_metrics
from services.autoscaler.core import Autoscaler, recommend
from services.autoscaler.settings import AutoscalerSettings, ScrapeTarget

S = AutoscalerSettings(
    target_requests_per_replica=10, kv_high_watermark=0.8, min_replicas=1, max_replicas=4
)


def metrics(active: float, waiting: float, used: float, total: float) -> str:
    return f"""# HELP nv_trt_llm_request_metrics TRT LLM request metrics
# TYPE nv_trt_llm_request_metrics gauge
nv_trt_llm_request_metrics{{model="tensorrt_llm",request_type="active",version="1"}} {active}
nv_trt_llm_request_metrics{{model="tensorrt_llm",request_type="waiting",version="1"}} {waiting}
# HELP nv_trt_llm_kv_cache_block_metrics TRT LLM KV cache block metrics
# TYPE nv_trt_llm_kv_cache_block_metrics gauge
nv_trt_llm_kv_cache_block_metrics{{kv_cache_block_type="used",model="tensorrt_llm",version="1"}} {used}
nv_trt_llm_kv_cache_block_metrics{{kv_cache_block_type="max",model="tensorrt_llm",version="1"}} {total}
"""


def test_parse_engine_metrics() -> None:
    assert parse_engine_metrics(metrics(3, 2, 10, 100)) == EngineSample(3, 2, 10, 100)


@pytest.mark.parametrize("text", ["", "# nothing\n", metrics(float("nan"), 0, 1, 2)])
def test_parse_missing_or_nan_is_none(text: str) -> None:
    assert parse_engine_metrics(text) is None


@pytest.mark.parametrize(
    ("current", "samples", "desired", "reason_part"),
    [
        (2, [], 2, "holding"),
        (1, [EngineSample(25, 0, 1, 100)], 3, "load 25"),
        (3, [EngineSample(0, 0, 0, 100)], 1, "load 0"),
        (2, [EngineSample(100, 100, 0, 100)], 4, "clamped"),
        (2, [EngineSample(5, 0, 90, 100)], 3, "KV use 0.90"),
    ],
)
def test_recommend(
    current: int, samples: list[EngineSample], desired: int, reason_part: str
) -> None:
    rec = recommend("p", "v1", current, samples, S, 0.0)
    assert rec.desired == desired
    assert reason_part in rec.reason


async def test_unreachable_replica_never_scales_down() -> None:
    def fetch(url: str, host: str, timeout: float) -> str:
        raise ConnectionRefusedError(url)

    settings = AutoscalerSettings(
        targets=[
            ScrapeTarget(replica_id=f"r{i}", metrics_url=f"http://127.0.0.1:1/m{i}")
            for i in range(3)
        ],
        min_replicas=1,
    )
    recs = await Autoscaler(settings, fetch).evaluate()
    assert recs[("default", "v1")].desired == 3
    assert recs[("default", "v1")].signals.reporting == 0


async def test_dns_targets_are_scraped_with_the_service_host() -> None:
    seen: list[tuple[str, str]] = []

    def fetch(url: str, host: str, timeout: float) -> str:
        seen.append((url, host))
        return metrics(30, 0, 1, 100)

    settings = AutoscalerSettings(
        replica_dns=[
            DnsTarget(host="localhost", pool="short", model_version="v2", metrics_port=8002)
        ],
        target_requests_per_replica=10,
        max_replicas=8,
    )
    recs = await Autoscaler(settings, fetch).evaluate()
    assert ("http://127.0.0.1:8002/metrics", "localhost:8002") in seen
    assert recs[("short", "v2")].desired == 3
