"""Table-driven tests, one table per plugin."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import pytest

from services.orchestrator.scheduling.contracts import ReplicaLoad, ReplicaView, RequestView
from services.orchestrator.scheduling.plugins import (
    circuit,
    estimated_wait,
    healthy,
    hot_spot,
    kv_utilization,
    kv_watermark,
    max_score,
    model_version,
    pool,
    prefix_overlap,
    queue_depth,
    round_robin,
    weighted_random,
)


def rep(rid: str, **kw: Any) -> ReplicaView:
    base: dict[str, Any] = {
        "id": rid,
        "pool": "default",
        "model_version": "v1",
        "models": ("tensorrt_llm",),
        "ready": True,
        "ejected": False,
        "in_flight": 0,
        "cap": 8,
    }
    base.update(kw)
    return ReplicaView(**base)


def reqv(**kw: Any) -> RequestView:
    base: dict[str, Any] = {
        "model": "tensorrt_llm",
        "model_version": "",
        "prompt_tokens": 128,
        "max_tokens": 16,
    }
    base.update(kw)
    return RequestView(**base)


def ids(replicas: Sequence[ReplicaView]) -> list[str]:
    return [r.id for r in replicas]


def pid(replica: ReplicaView | None) -> str:
    assert replica is not None
    return replica.id


@pytest.mark.parametrize(
    ("replicas", "kept"),
    [([rep("a"), rep("b", ready=False)], ["a"]), ([rep("a", ready=False)], [])],
)
def test_healthy_filter(replicas: list[ReplicaView], kept: list[str]) -> None:
    assert ids(healthy.HealthyFilter(healthy.Params()).filter(reqv(), replicas)) == kept


@pytest.mark.parametrize(
    ("request_", "kept"),
    [
        (reqv(), ["a", "b"]),
        (reqv(model_version="v2"), ["b"]),
        (reqv(model="other"), []),
    ],
)
def test_model_version_filter(request_: RequestView, kept: list[str]) -> None:
    replicas = [rep("a"), rep("b", model_version="v2")]
    assert (
        ids(model_version.ModelVersionFilter(model_version.Params()).filter(request_, replicas))
        == kept
    )


SHORT_LONG = frozenset({"short", "long"})


@pytest.mark.parametrize(
    ("pools", "replicas", "params", "kept"),
    [
        (None, [rep("s", pool="short"), rep("l", pool="long")], {}, ["s", "l"]),
        (("short", "long"), [rep("s", pool="short"), rep("l", pool="long")], {}, ["s"]),
        (("long",), [rep("s", pool="short"), rep("l", pool="long")], {}, ["l"]),
        (("short", "long"), [rep("l", pool="long")], {}, ["l"]),  # short pool gone: fall back
        (("short", "long"), [rep("s", pool="short"), rep("x", pool="other")], {}, ["s", "x"]),
        # short pool busy (2/2), long idle (0/8): it lends
        (
            ("short", "long"),
            [rep("s", pool="short", in_flight=2, cap=2), rep("l", pool="long")],
            {},
            ["s", "l"],
        ),
        # ... unless lending is off, or the long pool is busy itself
        (
            ("short", "long"),
            [rep("s", pool="short", in_flight=2, cap=2), rep("l", pool="long")],
            {"lend_below_utilization": 0.0},
            ["s"],
        ),
        (
            ("short", "long"),
            [rep("s", pool="short", in_flight=2, cap=2), rep("l", pool="long", in_flight=4)],
            {},
            ["s"],
        ),
    ],
)
def test_pool_filter(
    pools: tuple[str, ...] | None,
    replicas: list[ReplicaView],
    params: dict[str, float],
    kept: list[str],
) -> None:
    f = pool.PoolFilter(pool.Params(**params))
    assert ids(f.filter(reqv(pools=pools, known_pools=SHORT_LONG), replicas)) == kept


@pytest.mark.parametrize(("util", "kept"), [(None, True), (0.5, True), (0.9, True), (0.91, False)])
def test_kv_watermark_filter(util: float | None, kept: bool) -> None:
    f = kv_watermark.KvWatermarkFilter(kv_watermark.Params(max_kv_utilization=0.9))
    assert bool(f.filter(reqv(), [rep("a", kv_utilization=util)])) is kept


@pytest.mark.parametrize(
    ("util", "scale", "kept"),
    [
        # Leases that ended since the sample freed blocks: a full-looking sample is let through.
        (0.95, 0.5, True),
        (0.95, 0.99, False),
        # Leases granted since the sample do not push a replica over: their scale counts whole
        # prompts, blind to shared prefix blocks (the scorers and the lease cap see them).
        (0.5, 3.0, True),
        (0.91, 1.0, False),
    ],
)
def test_kv_watermark_carries_the_sample_forward_only_downwards(
    util: float, scale: float, kept: bool
) -> None:
    f = kv_watermark.KvWatermarkFilter(kv_watermark.Params(max_kv_utilization=0.9))
    r = rep("a", kv_utilization=util, load=ReplicaLoad(kv_scale=scale))
    assert bool(f.filter(reqv(), [r])) is kept


def test_circuit_breaker_filter() -> None:
    f = circuit.CircuitBreakerFilter(circuit.Params())
    assert ids(f.filter(reqv(), [rep("a"), rep("b", ejected=True)])) == ["a"]


@pytest.mark.parametrize(
    ("prompt_blocks", "matched", "scores"),
    [(4, {"a": 4, "b": 1}, [1.0, 0.25]), (4, {}, [0.0, 0.0]), (0, {"a": 3}, [0.0, 0.0])],
)
def test_prefix_overlap_scorer(
    prompt_blocks: int, matched: dict[str, int], scores: list[float]
) -> None:
    s = prefix_overlap.PrefixOverlapScorer(prefix_overlap.Params())
    got = s.score(reqv(prefix_blocks=matched, prompt_blocks=prompt_blocks), [rep("a"), rep("b")])
    assert list(got) == scores


@pytest.mark.parametrize(
    ("replica", "saturation", "score"),
    [
        (rep("a", in_flight=0), None, 1.0),
        (rep("a", in_flight=4), None, 0.5),  # cap 8
        (rep("a", in_flight=1, engine_active=3, engine_waiting=1), None, 0.5),  # engine sees more
        (rep("a", in_flight=20), None, 0.0),
        (rep("a", in_flight=2), 4, 0.5),
    ],
)
def test_queue_depth_scorer(replica: ReplicaView, saturation: int | None, score: float) -> None:
    s = queue_depth.QueueDepthScorer(queue_depth.Params(saturation=saturation))
    assert list(s.score(reqv(), [replica])) == [score]


@pytest.mark.parametrize(("util", "score"), [(None, 0.5), (0.0, 1.0), (0.75, 0.25)])
def test_kv_utilization_scorer(util: float | None, score: float) -> None:
    s = kv_utilization.KvUtilizationScorer(kv_utilization.Params())
    assert list(s.score(reqv(), [rep("a", kv_utilization=util)])) == [score]


def test_estimated_wait_prefers_cached_and_idle_replicas() -> None:
    s = estimated_wait.EstimatedWaitScorer(estimated_wait.Params(ttft_slo_ms=200))
    request = reqv(prompt_tokens=4096, prompt_blocks=128, prefix_blocks={"cached": 128})
    idle, cached, queued = (
        rep("idle"),
        rep("cached"),
        rep("queued", engine_active=64, engine_waiting=10),
    )
    t_idle, t_cached, t_queued = (s.predicted_ttft_s(request, r) for r in (idle, cached, queued))
    assert t_cached < t_idle < t_queued
    scores = s.score(request, [idle, cached, queued])
    assert scores[1] > scores[0] > scores[2]
    assert all(0.0 <= x <= 1.0 for x in scores)


@pytest.mark.parametrize(
    ("loads", "tolerance", "scores"),
    [([0, 0], 4, [1.0, 1.0]), ([0, 2], 4, [1.0, 0.5]), ([3, 11], 4, [1.0, 0.0])],
)
def test_hot_spot_guard(loads: list[int], tolerance: int, scores: list[float]) -> None:
    s = hot_spot.HotSpotGuard(hot_spot.Params(tolerance=tolerance))
    assert list(s.score(reqv(), [rep(str(i), in_flight=n) for i, n in enumerate(loads)])) == scores


def test_max_score_picker_breaks_ties_randomly() -> None:
    p = max_score.MaxScorePicker(max_score.Params())
    replicas = [rep("a"), rep("b"), rep("c")]
    assert p.pick(reqv(), replicas, [0.1, 0.9, 0.2], random.Random(0)) == replicas[1]
    picks = {
        pid(p.pick(reqv(), replicas, [1.0, 1.0, 0.0], random.Random(seed))) for seed in range(20)
    }
    assert picks == {"a", "b"}
    assert p.pick(reqv(), [], [], random.Random(0)) is None


def test_weighted_random_picker_follows_scores() -> None:
    p = weighted_random.WeightedRandomPicker(weighted_random.Params(floor=0.1))
    replicas = [rep("a"), rep("b")]
    rng = random.Random(1)
    picks = [pid(p.pick(reqv(), replicas, [3.0, 0.0], rng)) for _ in range(400)]
    assert 360 < picks.count("a") < 400
    assert "b" in picks


def test_round_robin_picker_cycles_in_id_order() -> None:
    p = round_robin.RoundRobinPicker(round_robin.Params())
    replicas = [rep("b"), rep("a"), rep("c")]
    rng = random.Random(0)
    assert [pid(p.pick(reqv(), replicas, [0, 0, 0], rng)) for _ in range(4)] == ["a", "b", "c", "a"]
