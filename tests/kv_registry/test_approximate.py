"""Approximate mode: routing decisions as predicted entries (TTL, capacity-bounded LRU),
corrected by the engine's reported reuse; exact data takes precedence; restart story."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from llmmesh.common.errors import InvalidArgument
from llmmesh.common.metric_names import (
    KV_CONFIRMED_BLOCKS,
    KV_PREDICTED_BLOCKS,
    KV_REPORTED_PROMPT_BLOCKS,
    KV_REPORTED_REUSED_BLOCKS,
)
from llmmesh.kvblocks import BlockConfig, block_hashes
from services.kv_registry.contracts import Cleared, Source, Stored
from services.kv_registry.core import KvRegistry
from services.kv_registry.metrics import NO_METRICS, PrometheusMetrics, RegistryMetrics
from services.kv_registry.settings import KvRegistrySettings
from tests.kv_registry.support import ManualClock as Clock
from tests.kv_registry.support import make_registry

CFG = BlockConfig(block_size=4, hash_seed=3)


def chain(start: int, blocks: int) -> list[int]:
    return block_hashes(list(range(start, start + 4 * blocks)), CFG)


A, B, C = chain(0, 4), chain(1000, 4), chain(2000, 4)


def make(
    clock: Clock | None = None,
    capacity: int = 1000,
    ttl: float = 60.0,
    metrics: RegistryMetrics = NO_METRICS,
) -> KvRegistry:
    settings = KvRegistrySettings(
        max_entries=100_000,
        max_events_per_request=1000,
        predicted_ttl_s=ttl,
        predicted_capacity=capacity,
        predicted_shrink=0.25,
    )
    return make_registry(CFG, settings, clock=clock, metrics=metrics)


def matched(reg: KvRegistry, hashes: list[int]) -> dict[str, tuple[int, Source]]:
    return {m.replica_id: (m.matched_blocks, m.source) for m in reg.lookup_hashes(hashes).matches}


def test_recorded_routing_is_a_predicted_match() -> None:
    reg = make()
    first = reg.record_routing("p0", A)
    assert (first.prompt_blocks, first.predicted_blocks, first.source, first.recorded_blocks) == (
        4,
        0,
        Source.PREDICTED,
        4,
    )
    assert matched(reg, A) == {"p0": (4, Source.PREDICTED)}
    assert matched(reg, A[:2] + B[2:]) == {"p0": (2, Source.PREDICTED)}
    assert reg.record_routing("p0", A).predicted_blocks == 4  # the prior belief, for the report
    assert reg.entries == 4


# (capacity before, prompts routed before the report, predicted, reported)
#   -> (capacity after, dropped, A's matched blocks after)
CORRECTIONS = [
    ("exact prediction", 100, [B, C], 4, 4, 100, 0, 4),
    ("full miss shrinks by 25%", 12, [B, C], 3, 0, 9, 3, 4),
    ("half miss shrinks by 12.5%", 16, [B, C], 2, 1, 14, 0, 4),
    ("under-prediction grows", 8, [B], 0, 3, 11, 0, 4),
    ("growth stops at the configured capacity", 1000, [B], 0, 3, 1000, 0, 4),
    ("predictions beyond the reuse cap do not count", 100, [B, C], 9, 3, 100, 0, 4),
]


@pytest.mark.parametrize(
    ("capacity", "before", "predicted", "reported", "cap_after", "dropped", "a_after"),
    [c[1:] for c in CORRECTIONS],
    ids=[c[0] for c in CORRECTIONS],
)
def test_report_corrects_the_model(
    capacity: int,
    before: list[list[int]],
    predicted: int,
    reported: int,
    cap_after: int,
    dropped: int,
    a_after: int,
) -> None:
    reg = make()
    reg.record_routing("p0", B)  # creates the replica
    reg.predicted.replicas["p0"].capacity = capacity
    for prompt in before[1:]:
        reg.record_routing("p0", prompt)
    reg.record_routing("p0", A)
    # A is 4 full blocks of exactly 16 tokens: the engine can reuse at most 3
    res = reg.report_reuse("p0", A, reported, prompt_tokens=16, predicted_blocks=predicted)
    assert res.reusable_blocks == 3
    assert (res.predicted_blocks, res.reported_reused_blocks) == (
        min(predicted, 3),
        min(reported, 3),
    )
    assert (res.predicted_capacity, res.dropped_blocks) == (cap_after, dropped)
    assert reg.predicted_capacity("p0") == cap_after
    assert reg.block_count("p0") <= cap_after
    # the engine holds the reported prompt now: it is never what the correction drops
    assert matched(reg, A).get("p0", (0, Source.PREDICTED))[0] == a_after


def test_shrinking_drops_the_least_recently_routed_entries() -> None:
    reg = make(capacity=12)
    for prompt in (B, C, A):
        reg.record_routing("p0", prompt)
    res = reg.report_reuse("p0", A, 0, predicted_blocks=4)  # full miss: 12 -> 9
    assert (res.predicted_capacity, res.dropped_blocks) == (9, 3)
    assert matched(reg, B) == {"p0": (1, Source.PREDICTED)}  # B's leaf blocks went first
    assert matched(reg, C) == {"p0": (4, Source.PREDICTED)}
    assert matched(reg, A) == {"p0": (4, Source.PREDICTED)}


@pytest.mark.parametrize("distinct_prompts", [1, 3])
def test_an_engine_that_never_reuses_stops_being_mispredicted(distinct_prompts: int) -> None:
    reg = make(capacity=64)
    predictions = []
    for i in range(40):
        prompt = chain(10_000 + i % distinct_prompts * 100, 4)
        before = reg.record_routing("p0", prompt).predicted_blocks
        reg.report_reuse("p0", prompt, 0, predicted_blocks=before)
        predictions.append(before)
    assert predictions[:2] == [0, 4] if distinct_prompts == 1 else [0, 0]
    assert predictions[-10:] == [0] * 10  # converged: no more false hits
    assert reg.predicted_capacity("p0") < 4 * distinct_prompts


def test_without_a_given_prediction_the_current_belief_counts() -> None:
    reg = make()
    reg.record_routing("p-belief", A)
    res = reg.report_reuse("p-belief", A, 4)
    assert (res.predicted_blocks, res.reported_reused_blocks) == (4, 4)
    assert reg.report_reuse("unknown-replica", A, 2).predicted_blocks == 0
    assert matched(reg, A)["unknown-replica"] == (4, Source.PREDICTED)  # learnt from the report


def test_a_reuse_report_after_its_replicas_drop_does_not_bring_it_back() -> None:
    # A lease outlived its replica's removal: its report comes after DropReplica.
    reg = make()
    reg.record_routing("gone", A)
    assert reg.drop_replica("gone")
    res = reg.report_reuse("gone", A, 4)
    assert (res.predicted_capacity, res.dropped_blocks) == (0, 0)
    assert "gone" not in reg.replica_ids()
    assert "gone" not in matched(reg, A)
    assert not reg.drop_replica("never-seen")  # e.g. this registry restarted since
    reg.report_reuse("never-seen", A, 4)
    assert "never-seen" not in reg.replica_ids()
    reg.record_routing("gone", B)  # routed to again (the id came back): known again
    assert "gone" in reg.replica_ids()
    reg.report_reuse("gone", A, 4)
    assert matched(reg, A)["gone"] == (4, Source.PREDICTED)


def test_ttl_expiry() -> None:
    clock = Clock()
    reg = make(clock, ttl=10)
    reg.record_routing("p0", A)
    reg.record_routing("p1", A, ttl_s=100)
    clock.now += 9
    assert matched(reg, A) == {"p0": (4, Source.PREDICTED), "p1": (4, Source.PREDICTED)}
    clock.now += 2
    assert matched(reg, A) == {"p1": (4, Source.PREDICTED)}  # expired entries never answer
    assert reg.entries == 8  # ... and are removed by the next maintenance step
    reg.maintain(1000)
    assert reg.entries == 4
    assert reg.block_count("p0") == 0


def test_a_prefix_routed_later_outlives_its_extensions() -> None:
    clock = Clock()
    reg = make(clock)
    reg.record_routing("p0", A, ttl_s=5)
    clock.now += 3
    reg.record_routing("p0", A[:2], ttl_s=50)
    clock.now += 10
    assert matched(reg, A) == {"p0": (2, Source.PREDICTED)}
    assert reg.record_routing("p0", A, ttl_s=5).predicted_blocks == 2


def test_capacity_is_an_lru_over_routings() -> None:
    reg = make(capacity=10)
    reg.record_routing("p0", A)
    reg.record_routing("p0", B)
    reg.record_routing("p0", C)  # 12 entries > 10: A's two leaf blocks go
    assert reg.block_count("p0") == 10
    assert matched(reg, A) == {"p0": (2, Source.PREDICTED)}
    reg.record_routing("p0", A)  # A is the most recent again; B's leaves go now
    assert matched(reg, A) == {"p0": (4, Source.PREDICTED)}
    assert matched(reg, B) == {"p0": (2, Source.PREDICTED)}


def test_a_prompt_larger_than_the_capacity_keeps_its_prefix() -> None:
    reg = make(capacity=3)
    assert reg.record_routing("p0", A).recorded_blocks == 3
    assert matched(reg, A) == {"p0": (3, Source.PREDICTED)}


def test_exact_data_takes_precedence() -> None:
    reg = make()
    reg.record_routing("r0", A)
    reg.record_routing("r0", B)
    assert reg.source("r0") is Source.PREDICTED
    reg.ingest("r0", "e", CFG, [Cleared(0), Stored(1, tuple(A[:1]))])  # it publishes events
    assert reg.source("r0") is Source.EXACT
    assert matched(reg, A) == {"r0": (1, Source.EXACT)}
    assert matched(reg, B) == {}  # predictions are gone
    res = reg.record_routing("r0", A)
    assert (res.predicted_blocks, res.source, res.recorded_blocks) == (1, Source.EXACT, 0)
    assert matched(reg, A) == {"r0": (1, Source.EXACT)}  # ... and later ones are ignored
    rep = reg.report_reuse("r0", A, 3, predicted_blocks=1)
    assert (rep.source, rep.predicted_capacity, rep.dropped_blocks) == (Source.EXACT, 0, 0)
    assert matched(reg, A) == {"r0": (1, Source.EXACT)}


def test_a_report_without_hashes_counts_from_the_prompts_length() -> None:
    # What the orchestrator sends for an exact replica: the same figures as with the hashes.
    prom = CollectorRegistry()
    reg = make(metrics=PrometheusMetrics(prom))
    reg.ingest("r0", "e", CFG, [Cleared(0), Stored(1, tuple(A[:2]))])
    kw = {"prompt_tokens": 17, "predicted_blocks": 2}
    with_hashes = reg.report_reuse("r0", A, 3, **kw)
    without = reg.report_reuse("r0", (), 3, **kw)
    assert without == with_hashes
    assert (without.reusable_blocks, without.predicted_blocks, without.source) == (
        4,
        2,
        Source.EXACT,
    )
    labels = {"replica": "r0", "source": "exact"}
    assert prom.get_sample_value(KV_REPORTED_PROMPT_BLOCKS, labels) == 8
    # An approximate replica's capacity is corrected all the same; nothing is refreshed.
    reg.record_routing("p0", A)
    reg.predicted.replicas["p0"].capacity = 12
    res = reg.report_reuse("p0", (), 0, **kw)
    assert (res.reusable_blocks, res.predicted_capacity) == (4, 9)  # 12 x (1 - 0.25 x 2/2)
    assert matched(reg, A) == {"r0": (2, Source.EXACT), "p0": (4, Source.PREDICTED)}


def test_lookups_mix_exact_and_predicted_replicas() -> None:
    reg = make()
    reg.ingest("exact", "e", CFG, [Stored(0, tuple(A[:2]))])
    reg.record_routing("approx", A)
    res = reg.lookup_hashes(A)
    assert [(m.replica_id, m.matched_blocks, m.source) for m in res.matches] == [
        ("approx", 4, Source.PREDICTED),
        ("exact", 2, Source.EXACT),
    ]


def test_restart_serves_predictions_until_the_snapshot() -> None:
    """A new registry: engines reconnect mid-stream (gap), predictions answer meanwhile."""
    reg = make()
    reg.record_routing("r0", A)
    res = reg.ingest("r0", "epoch-1", CFG, [Stored(812, tuple(B))])
    assert res.resync_required
    assert matched(reg, A) == {"r0": (4, Source.PREDICTED)}
    assert reg.record_routing("r0", C).source is Source.PREDICTED  # still approximate
    res = reg.ingest("r0", "epoch-1", CFG, [Cleared(813), Stored(814, tuple(A[:3]))])
    assert not res.resync_required
    assert matched(reg, A) == {"r0": (3, Source.EXACT)}
    assert matched(reg, C) == {}


def test_engine_restart_forgets_exact_data_and_accepts_predictions_until_synced() -> None:
    reg = make()
    reg.ingest("r0", "epoch-1", CFG, [Stored(0, tuple(A))])
    assert reg.ingest("r0", "epoch-2", CFG, [Stored(5, tuple(B))]).resync_required
    assert matched(reg, A) == {}
    assert reg.record_routing("r0", C).source is Source.PREDICTED
    assert matched(reg, C) == {"r0": (4, Source.PREDICTED)}


def test_drop_predicted_replica() -> None:
    reg = make()
    reg.record_routing("p0", A)
    assert reg.drop_replica("p0")
    assert matched(reg, A) == {}
    assert (reg.entries, reg.unique_blocks) == (0, 0)


def test_predicted_entries_count_toward_the_global_bound() -> None:
    reg = make_registry(CFG, KvRegistrySettings(max_entries=6, max_events_per_request=10))
    reg.ingest("exact", "e", CFG, [Stored(0, tuple(A))])
    reg.record_routing("approx", B)
    assert reg.entries == 6
    assert reg.block_count("exact") + reg.block_count("approx") == 6


def test_hit_rate_metrics() -> None:
    prom = CollectorRegistry()
    reg = make(metrics=PrometheusMetrics(prom))
    names = [
        KV_REPORTED_PROMPT_BLOCKS,
        KV_PREDICTED_BLOCKS,
        KV_REPORTED_REUSED_BLOCKS,
        KV_CONFIRMED_BLOCKS,
    ]
    reg.record_routing("p0", A)
    reg.report_reuse("p0", A, 1, prompt_tokens=17, predicted_blocks=3)
    reg.report_reuse("p0", B, 4, prompt_tokens=17, predicted_blocks=0)
    labels = {"replica": "p0", "source": "predicted"}
    assert [prom.get_sample_value(n, labels) for n in names] == [8, 3, 5, 1]


def test_a_dropped_replicas_series_go_and_a_late_report_brings_none_back() -> None:
    prom = CollectorRegistry()
    reg = make(metrics=PrometheusMetrics(prom))
    reg.record_routing("p0", A)
    reg.report_reuse("p0", A, 1, prompt_tokens=17, predicted_blocks=3)

    def series() -> set[str]:
        return {
            s.name
            for family in prom.collect()
            for s in family.samples
            if s.labels.get("replica") == "p0"
        }

    assert {KV_REPORTED_PROMPT_BLOCKS, KV_PREDICTED_BLOCKS} <= series()
    reg.drop_replica("p0")
    assert series() == set()
    reg.report_reuse("p0", A, 1, prompt_tokens=17, predicted_blocks=3)
    assert series() == set()


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda r: r.record_routing("", A), "replica_id"),
        (lambda r: r.record_routing("p0", A, ttl_s=0), "ttl_s"),
        (lambda r: r.record_routing("p0", A, ttl_s=float("nan")), "ttl_s"),
        (lambda r: r.report_reuse("", A, 1), "replica_id"),
        (lambda r: r.report_reuse("p0", A, -1), "reported_reused_blocks"),
        # without the prompt, its length and the prediction are what the report is counted from
        (lambda r: r.report_reuse("p0", (), 1, predicted_blocks=1), "block_hashes"),
        (lambda r: r.report_reuse("p0", (), 1, prompt_tokens=8), "block_hashes"),
    ],
)
def test_invalid_arguments(call: object, field: str) -> None:
    reg = make()
    with pytest.raises(InvalidArgument) as err:
        call(reg)  # type: ignore[operator]
    assert err.value.field == field


def test_a_report_of_a_prompt_shorter_than_a_block_needs_no_prediction() -> None:
    """Sent whole (token ids), it hashes to no block: nothing could be reused, and the report
    is counted, not refused for a missing `predicted_blocks`."""
    reg = make()
    short = reg.hash_tokens([1, 2, 3])
    assert short == ()
    res = reg.report_reuse("p0", short, 0, prompt_tokens=3)
    assert (res.reusable_blocks, res.predicted_blocks) == (0, 0)
    with pytest.raises(InvalidArgument, match="predicted_blocks"):
        reg.report_reuse("p0", (), 0, prompt_tokens=40)  # blocks it does not name
    with pytest.raises(InvalidArgument, match="prompt_tokens"):
        reg.report_reuse("p0", (), 0)
