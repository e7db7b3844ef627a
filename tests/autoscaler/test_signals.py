"""Attribution of one round of raw readings to pools: configured and inferred models, token
rates split by admissions (evenly when nothing was admitted), unknown versus 0."""

from __future__ import annotations

import pytest

from llmmesh.common.topology import PoolKey
from services.autoscaler.signals import ModelSignals, Observation, assemble

SHORT, LONG = PoolKey("short", "v1"), PoolKey("long", "v1")


def test_assemble_configured_model_and_even_split() -> None:
    obs = Observation(
        admissions={},
        queue_depth={},
        models={"a": ModelSignals(ttft_p90_s=0.5, prompt_tokens_rate=10.0)},
    )
    got = assemble(obs, {SHORT: "a", LONG: "a", PoolKey("x", "v1"): "b"}, 0.0)
    assert got[SHORT].prompt_tokens_rate == pytest.approx(5.0)  # nothing admitted: even split
    assert got[SHORT].ttft_p90_s == 0.5
    assert got[PoolKey("x", "v1")].ttft_p90_s is None  # model b: no gateway data
    assert got[SHORT].arrival_rate == 0.0


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_latency_percentile_that_is_not_finite_is_unknown(bad: float) -> None:
    # A histogram with an `le="NaN"` bucket gives a NaN quantile: unknown, not a correction.
    latencies = ModelSignals(ttft_p90_s=bad, itl_p90_s=bad, queue_wait_p90_s=bad)
    obs = Observation(admissions={}, queue_depth={}, models={"a": latencies})
    got = assemble(obs, {SHORT: "a"}, 0.0)[SHORT]
    assert (got.ttft_p90_s, got.itl_p90_s, got.queue_wait_p90_s) == (None, None, None)


def test_orchestrator_series_named_by_the_triton_model_reach_the_served_models_pools() -> None:
    # Gateway series carry the served name (llama3-8b), the orchestrator's the Triton model's.
    obs = Observation(
        admissions={("tensorrt_llm", SHORT): 9.0, ("tensorrt_llm", LONG): 1.0},
        queue_depth={},
        models={
            "llama3-8b": ModelSignals(ttft_p90_s=0.5, prompt_tokens_rate=10_000.0),
            "tensorrt_llm": ModelSignals(queue_wait_p90_s=1.5),
        },
    )
    got = assemble(obs, {SHORT: "llama3-8b", LONG: "llama3-8b"}, 0.0)
    assert got[SHORT].prompt_tokens_rate == pytest.approx(9_000.0)  # by admissions, not evenly
    assert got[LONG].prompt_tokens_rate == pytest.approx(1_000.0)
    assert got[SHORT].queue_wait_p90_s == got[LONG].queue_wait_p90_s == 1.5
    assert got[SHORT].ttft_p90_s == 0.5


def test_token_rates_labelled_by_pool_are_each_pools_own() -> None:
    """A long-prompt pool and a short one of one model: each is planned for its own request
    shape, not the model's blend (9 in 10 requests short: the blend is 1250 tokens each)."""
    obs = Observation(
        admissions={("m", SHORT): 9.0, ("m", LONG): 1.0},
        queue_depth={},
        models={
            "m": ModelSignals(
                prompt_tokens_rate=12_500.0,
                completion_tokens_rate=2_000.0,
                prompt_tokens_by_pool={("short", ""): 4_500.0, ("long", "v1"): 8_000.0},
                completion_tokens_by_pool={("short", ""): 1_800.0, ("long", "v1"): 200.0},
            )
        },
    )
    got = assemble(obs, {SHORT: "m", LONG: "m", PoolKey("spare", "v1"): "m"}, 0.0)
    assert got[LONG].prompt_tokens_rate == 8_000.0  # 8000 per request at 1 req/s
    assert got[SHORT].prompt_tokens_rate == 4_500.0  # 500 per request at 9 req/s
    assert got[LONG].completion_tokens_rate == 200.0
    assert got[PoolKey("spare", "v1")].prompt_tokens_rate is None  # no series of its own


@pytest.mark.parametrize("read", [True, False])
def test_a_pool_without_engines_has_none_only_when_they_were_counted(read: bool) -> None:
    obs = Observation(queue_depth={SHORT: 2.0}, engines_read=read)
    got = assemble(obs, {SHORT: "a"}, 0.0)[SHORT]
    assert got.replicas_known == (0 if read else None)
    assert got.queue_depth == 2.0
