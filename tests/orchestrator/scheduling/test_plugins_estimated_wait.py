"""The estimated-wait scorer on the live load accounting, table-driven: which replica each load
picture sends a request to, and when prefix affinity lets go."""

from __future__ import annotations

import dataclasses

import pytest

from llmmesh.accelerators import StepShape, decode_batch_shape, prefill_shape
from services.orchestrator.scheduling.contracts import ReplicaLoad, ReplicaView, RequestView
from services.orchestrator.scheduling.plugins.estimated_wait import EstimatedWaitScorer, Params
from services.orchestrator.scheduling.work import WorkModel

WORK = WorkModel.named("llama-3.1-8b-h100-bf16")
PROMPT = 4096
BLOCKS = PROMPT // 32
# Prefill time a fully cached prompt saves.
SAVED = WORK.prefill_work_s(PROMPT, 0) - WORK.prefill_work_s(1, PROMPT - 1)


def rep(rid: str, *, in_flight: int = 0, **load: float) -> ReplicaView:
    return ReplicaView(
        id=rid,
        pool="",
        model_version="1",
        models=("m",),
        ready=True,
        ejected=False,
        in_flight=in_flight,
        cap=256,
        load=ReplicaLoad(
            prefill_tokens=int(load.get("prefill_tokens", 0)),
            prefill_s=load.get("prefill_s", 0.0),
            decode_seqs=int(load.get("decode_seqs", 0)),
            decode_tokens=int(load.get("decode_tokens", 0)),
        ),
    )


def req(cached_on: dict[str, int] | None = None, max_tokens: int = 64) -> RequestView:
    return RequestView(
        model="m",
        model_version="",
        prompt_tokens=PROMPT,
        max_tokens=max_tokens,
        prefix_blocks=cached_on or {},
        prompt_blocks=BLOCKS,
    )


def winner(scorer: EstimatedWaitScorer, request: RequestView, replicas: list[ReplicaView]) -> str:
    scores = scorer.score(request, replicas)
    assert all(0.0 <= s <= 1.0 for s in scores)
    assert max(scores) == 1.0  # the fastest candidate scores 1
    return replicas[scores.index(max(scores))].id


AWARE = EstimatedWaitScorer(Params())
BLIND = EstimatedWaitScorer(Params(prefix_aware=False))


@pytest.mark.parametrize(
    ("scorer", "request_", "replicas", "expected"),
    [
        # Load only: the smaller prefill backlog wins.
        (AWARE, req(), [rep("a", prefill_s=0.3), rep("b", prefill_s=0.1)], "b"),
        # Equal backlog: the lighter decode batch wins (its steps are shorter).
        (
            AWARE,
            req(),
            [
                rep("a", decode_seqs=60, decode_tokens=60 * 6000),
                rep("b", decode_seqs=4, decode_tokens=4 * 6000),
            ],
            "b",
        ),
        # A full batch makes the request wait for a slot: the replica with free slots wins
        # even with a longer backlog.
        (
            AWARE,
            req(),
            [
                rep("a", in_flight=80, decode_seqs=80, decode_tokens=80 * 2000),
                rep("b", prefill_s=0.05, decode_seqs=10, decode_tokens=10 * 2000),
            ],
            "b",
        ),
        # Prefix affinity holds while the cached prefill saved exceeds the extra backlog...
        (
            AWARE,
            req({"a": BLOCKS}),
            [rep("a", prefill_s=0.5 * SAVED), rep("b")],
            "a",
        ),
        # ...and lets go once the backlog on the cached replica costs more than it saves.
        (
            AWARE,
            req({"a": BLOCKS}),
            [rep("a", prefill_s=1.5 * SAVED), rep("b")],
            "b",
        ),
        # A partial match saves less, so it lets go earlier.
        (
            AWARE,
            req({"a": BLOCKS // 4}),
            [rep("a", prefill_s=0.5 * SAVED), rep("b")],
            "b",
        ),
        # Two replicas hold the prefix (a hot prefix that spread): the less loaded of them.
        (
            AWARE,
            req({"a": BLOCKS, "b": BLOCKS}),
            [rep("a", prefill_s=0.2), rep("b", prefill_s=0.1), rep("c")],
            "b",
        ),
        # Cache-blind (least-loaded): the cached prefix does not count.
        (
            BLIND,
            req({"a": BLOCKS}),
            [rep("a", prefill_s=0.5 * SAVED), rep("b")],
            "b",
        ),
    ],
)
def test_estimated_wait_picks(
    scorer: EstimatedWaitScorer,
    request_: RequestView,
    replicas: list[ReplicaView],
    expected: str,
) -> None:
    assert winner(scorer, request_, replicas) == expected


@pytest.mark.parametrize(
    ("backlog_s", "score_b"),
    [(0.0, 1.0), (0.25, 0.75), (0.5, 0.5), (2.0, 0.0)],
)
def test_score_falls_by_one_per_slo_of_extra_predicted_ttft(
    backlog_s: float, score_b: float
) -> None:
    s = EstimatedWaitScorer(Params(ttft_slo_ms=1000))
    scores = s.score(req(), [rep("a"), rep("b", prefill_s=backlog_s)])
    assert scores[0] == 1.0
    assert scores[1] == pytest.approx(score_b, abs=1e-6)


def test_without_a_ledger_the_engine_gauges_stand_in() -> None:
    s = EstimatedWaitScorer(Params())
    idle = dataclasses.replace(rep("i"), load=None)
    queued = dataclasses.replace(rep("q"), load=None, engine_active=64.0, engine_waiting=10.0)
    assert s.predicted_ttft_s(req(), idle) < s.predicted_ttft_s(req(), queued)


@pytest.mark.parametrize("scorer", [AWARE, BLIND])
def test_scores_equal_the_per_replica_prediction_whatever_replicas_share(
    scorer: EstimatedWaitScorer,
) -> None:
    # Each score must be the replica's own prediction.
    replicas = [
        rep("idle-a"),
        rep("idle-b"),
        rep("busy", in_flight=3, prefill_s=0.2, decode_seqs=3, decode_tokens=9000),
        rep("busy-same-load", in_flight=3, prefill_s=0.2, decode_seqs=3, decode_tokens=9000),
        rep("busy-more-leases", in_flight=70, prefill_s=0.2, decode_seqs=3, decode_tokens=9000),
        rep("cached"),
        # Same leases and cache as "idle-a", another load: predicted on its own.
        rep("backlog", prefill_s=0.1),
        dataclasses.replace(rep("no-ledger", in_flight=2), load=None, engine_active=2.0),
        # Same leases as "no-ledger", another engine gauge.
        dataclasses.replace(
            rep("no-ledger-waiting", in_flight=2), load=None, engine_active=2.0, engine_waiting=3.0
        ),
    ]
    request = req({"cached": BLOCKS, "busy-same-load": BLOCKS})
    times = [scorer.predicted_ttft_s(request, r) for r in replicas]
    best = min(times)
    expected = [1.0 - min(1.0, (t - best) / 1.0) for t in times]
    assert scorer.score(request, replicas) == pytest.approx(expected, abs=1e-12)
    if scorer is AWARE:
        assert times[5] < times[0]
        assert times[3] < times[2]
    assert times[4] > times[2]
    assert times[6] > times[0]
    assert times[8] > times[7]


def test_a_replica_unchanged_since_the_last_decision_is_answered_as_then() -> None:
    # A view is the same object while its replica is unchanged; its last prediction is reused
    # for the same prompt, cached and max tokens, and made anew when any of them differs.
    scorer = EstimatedWaitScorer(Params())
    busy = rep("a", in_flight=3, prefill_s=0.4, decode_seqs=3, decode_tokens=9000)
    idle = rep("b")
    full = rep("c", in_flight=80, decode_seqs=64, decode_tokens=64_000)  # waits for a slot
    replicas = [busy, idle, full]
    first = scorer.score(req(), replicas)
    assert scorer.score(req(), replicas) == first
    # The same replica, another snapshot (its backlog cleared): predicted again.
    cleared = rep("a", in_flight=3, decode_seqs=3, decode_tokens=9000)
    assert scorer.score(req(), [cleared, idle, full])[0] > first[0]
    # Another request: the cached prefix and the output length are its own.
    for request in (req({"a": BLOCKS}), req(max_tokens=4096)):
        fresh = EstimatedWaitScorer(Params()).score(request, replicas)
        assert fresh != first
        assert scorer.score(request, replicas) == fresh


def test_work_model_constants_match_the_cost_model() -> None:
    p = WORK.profile
    assert WORK.fixed_step_s == pytest.approx(p.overhead_s + p.memory_time_s(StepShape()))
    full = prefill_shape(WORK.max_num_tokens, 0)
    assert WORK.decode_slowdown(8, 8 * 2048) == pytest.approx(
        p.step_time_s(full + decode_batch_shape(2048, 8)) / p.step_time_s(full)
    )
    assert WORK.decode_slowdown(0, 0) == 1.0


@pytest.mark.parametrize("time_scale", [0.5, 4.0, 12.5])
def test_a_time_scale_stretches_every_modelled_time_and_not_the_slowdown(
    time_scale: float,
) -> None:
    slow = WorkModel.named("llama-3.1-8b-h100-bf16", time_scale=time_scale)
    assert slow.fixed_step_s == pytest.approx(WORK.fixed_step_s * time_scale)
    for uncached, cached in [(1, 0), (512, 0), (4096, 2048), (8192, 0)]:
        assert slow.prefill_work_s(uncached, cached) == pytest.approx(
            WORK.prefill_work_s(uncached, cached) * time_scale
        )
    assert slow.decode_step_s(16, 16 * 1024) == pytest.approx(
        WORK.decode_step_s(16, 16 * 1024) * time_scale
    )
    assert slow.decode_slowdown(16, 16 * 1024) == pytest.approx(WORK.decode_slowdown(16, 16 * 1024))


def test_a_time_scale_must_be_positive() -> None:
    with pytest.raises(ValueError, match="time_scale"):
        WorkModel.named("llama-3.1-8b-h100-bf16", time_scale=0.0)


@pytest.mark.parametrize("time_scale", [0.5, 9.6])
def test_a_slowed_engine_fleet_with_a_backlog_as_slowed_is_scored_alike(time_scale: float) -> None:
    # A fleet k times slower, whose backlogs are k times longer, is the same picture in slow
    # motion: predictions are k times longer and the SLO as stretched, so the scores are equal.
    replicas = [
        rep("idle"),
        rep("backlog", prefill_s=0.05),
        rep("decoding", in_flight=40, decode_seqs=40, decode_tokens=40 * 3000),
        rep("full", in_flight=80, prefill_s=0.02, decode_seqs=64, decode_tokens=64 * 2000),
        rep("cached", prefill_s=0.08),
    ]
    slowed = [
        dataclasses.replace(
            r, load=dataclasses.replace(r.load, prefill_s=r.load.prefill_s * time_scale)
        )
        for r in replicas
        if r.load is not None
    ]
    request = req({"cached": BLOCKS})
    for params in (Params(), Params(prefix_aware=False), Params(ttft_slo_ms=200)):
        fast = EstimatedWaitScorer(params)
        slow = EstimatedWaitScorer(params, time_scale=time_scale)
        assert slow.work.time_scale == time_scale
        assert slow.score(request, slowed) == pytest.approx(fast.score(request, replicas))
        for r, s in zip(replicas, slowed, strict=True):
            assert slow.predicted_ttft_s(request, s) == pytest.approx(
                fast.predicted_ttft_s(request, r) * time_scale
            )


def kv_rep(rid: str, free: int | None, return_per_s: float | None, prefill_s: float) -> ReplicaView:
    return dataclasses.replace(
        rep(rid, prefill_s=prefill_s),
        load=ReplicaLoad(prefill_s=prefill_s, kv_free_tokens=free, kv_return_per_s=return_per_s),
    )


ROOM = 10**6  # KV tokens free: any request fits


@pytest.mark.parametrize(
    ("request_", "replicas", "expected", "wait_on_a"),
    [
        # "a" has no prefill queued but its cache is reserved by running sequences: the request
        # (4096 + 64 tokens) waits for them to come back at 10,000/s there (0.416 s), longer
        # than b's 0.2 s backlog with room to spare.
        (req(), [kv_rep("a", 0, 10_000.0, 0.0), kv_rep("b", ROOM, 10_000.0, 0.2)], "b", 0.416),
        # The same shortage coming back ten times faster is shorter than b's backlog.
        (req(), [kv_rep("a", 0, 100_000.0, 0.0), kv_rep("b", ROOM, 10_000.0, 0.2)], "a", 0.0416),
        # The request starts when both its backlog is done and its reservation fits: the
        # longer of the two (0.416 s), not their sum.
        (req(), [kv_rep("a", 0, 10_000.0, 0.3), kv_rep("b", ROOM, 10_000.0, 0.35)], "b", 0.116),
        # Its prefix cached on "a": it reserves only the last token and its output there.
        (
            req({"a": BLOCKS}),
            [kv_rep("a", 0, 10_000.0, 0.0), kv_rep("b", ROOM, 10_000.0, 0.0)],
            "a",
            65 / 10_000,
        ),
        # Free room on both: the backlog decides.
        (req(), [kv_rep("a", ROOM, 10_000.0, 0.0), kv_rep("b", ROOM, 10_000.0, 0.2)], "a", 0.0),
        # Capacity or return rate unknown: no KV wait is predicted.
        (req(), [kv_rep("a", None, None, 0.0), kv_rep("b", ROOM, 10_000.0, 0.2)], "a", 0.0),
        (req(), [kv_rep("a", 0, None, 0.0), kv_rep("b", ROOM, 10_000.0, 0.2)], "a", 0.0),
    ],
)
def test_a_request_waits_for_its_kv_reservation_to_fit(
    request_: RequestView, replicas: list[ReplicaView], expected: str, wait_on_a: float
) -> None:
    scorer = EstimatedWaitScorer(Params())
    assert winner(scorer, request_, replicas) == expected
    a = replicas[0]
    assert a.load is not None
    no_kv = dataclasses.replace(a, load=ReplicaLoad(prefill_s=a.load.prefill_s))
    assert scorer.predicted_ttft_s(request_, a) - scorer.predicted_ttft_s(
        request_, no_kv
    ) == pytest.approx(wait_on_a)


def test_a_cache_blind_prediction_still_reserves_only_the_uncached_part() -> None:
    # least-work (prefix_aware false) prices the whole prefill, but the engine reserves no KV for
    # the blocks the replica holds: the request fits where its prefix is cached.
    a = kv_rep("a", 100, 10_000.0, 0.0)
    request = req({"a": BLOCKS})
    no_kv = dataclasses.replace(a, load=ReplicaLoad())
    assert BLIND.predicted_ttft_s(request, a) - BLIND.predicted_ttft_s(request, no_kv) == 0.0
    assert BLIND.predicted_ttft_s(req(), a) - BLIND.predicted_ttft_s(req(), no_kv) == (
        pytest.approx((4096 + 64 - 100) / 10_000)
    )


def test_a_cache_blind_score_follows_the_match_on_the_same_view() -> None:
    # The same replica view, prompt and max tokens, a different match: the cache-blind
    # prediction's KV reservation differs, so the remembered prediction is not answered again.
    scorer = EstimatedWaitScorer(Params(prefix_aware=False))
    a, b = kv_rep("a", 100, 10_000.0, 0.0), kv_rep("b", ROOM, 10_000.0, 0.1)
    assert winner(scorer, req(), [a, b]) == "b"  # a: 0.406 s until its reservation fits
    assert winner(scorer, req({"a": BLOCKS}), [a, b]) == "a"  # it fits on a now
