from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from llmmesh.kvblocks import BlockConfig, block_hashes
from services.kv_registry.contracts import Cleared, Removed, Stored
from services.kv_registry.core import KvRegistry, level_plan
from services.kv_registry.errors import BatchTooLarge, BlockConfigMismatch
from services.kv_registry.settings import KvRegistrySettings
from tests.kv_registry.support import ManualClock, make_registry

CFG = BlockConfig(block_size=4, hash_seed=7)
PROMPT = list(range(100, 118))  # 4 full blocks + 2 tokens
HASHES = block_hashes(PROMPT, CFG)


def make(max_entries: int = 1000, max_events: int = 100) -> KvRegistry:
    return make_registry(
        CFG, KvRegistrySettings(max_entries=max_entries, max_events_per_request=max_events)
    )


def test_partial_block_is_not_indexed() -> None:
    assert len(HASHES) == 4


@pytest.mark.parametrize(
    ("stored_blocks", "expected"),
    [
        (4, 4),
        (2, 2),
        (0, 0),
    ],
)
def test_lookup_counts_leading_blocks(stored_blocks: int, expected: int) -> None:
    reg = make()
    if stored_blocks:
        reg.ingest("r0", "e", CFG, [Stored(0, tuple(HASHES[:stored_blocks]))])
    res = reg.lookup(PROMPT)
    assert res.prompt_blocks == 4
    got = {m.replica_id: m.matched_blocks for m in res.matches}
    assert got.get("r0", 0) == expected


def test_match_stops_at_first_missing_block() -> None:
    reg = make()
    reg.ingest("r0", "e", CFG, [Stored(0, (HASHES[0], HASHES[2], HASHES[3]))])
    assert [(m.replica_id, m.matched_blocks) for m in reg.lookup(PROMPT).matches] == [("r0", 1)]


def test_matches_are_ordered_by_length() -> None:
    reg = make()
    reg.ingest("short", "e", CFG, [Stored(0, tuple(HASHES[:1]))])
    reg.ingest("long", "e", CFG, [Stored(0, tuple(HASHES[:3]))])
    assert [(m.replica_id, m.matched_blocks) for m in reg.lookup(PROMPT).matches] == [
        ("long", 3),
        ("short", 1),
    ]


def test_removed_and_cleared() -> None:
    reg = make()
    reg.ingest("r0", "e", CFG, [Stored(0, tuple(HASHES)), Removed(1, (HASHES[1],))])
    assert reg.lookup(PROMPT).matches[0].matched_blocks == 1
    reg.ingest("r0", "e", CFG, [Cleared(2)])
    assert reg.lookup(PROMPT).matches == ()
    assert reg.entries == 0


def test_gap_requires_resync_until_snapshot() -> None:
    reg = make()
    assert not reg.ingest("r0", "e", CFG, [Stored(0, (HASHES[0],))]).resync_required
    res = reg.ingest("r0", "e", CFG, [Stored(5, (HASHES[1],))])
    assert res.resync_required
    assert reg.lookup(PROMPT).matches[0].matched_blocks == 1  # gap event not applied
    res = reg.ingest("r0", "e", CFG, [Cleared(9), Stored(10, tuple(HASHES))])
    assert not res.resync_required
    assert res.next_sequence == 11
    assert reg.lookup(PROMPT).matches[0].matched_blocks == 4


def test_a_heartbeat_the_index_does_not_expect_asks_for_a_snapshot() -> None:
    reg = make()
    reg.ingest("r0", "e", CFG, [Stored(0, (HASHES[0],)), Stored(1, (HASHES[1],))])
    assert not reg.ingest("r0", "e", CFG, [], next_sequence=2).resync_required  # in step
    # A registry that restarted while the engine was idle: it has never heard of it.
    fresh = make()
    res = fresh.ingest("r0", "e", CFG, [], next_sequence=2)
    assert (res.resync_required, res.next_sequence) == (True, 0)
    assert fresh.lookup(PROMPT).matches == ()
    res = fresh.ingest("r0", "e", CFG, [Cleared(2), Stored(3, tuple(HASHES[:2]))])
    assert not res.resync_required
    assert fresh.lookup(PROMPT).matches[0].matched_blocks == 2
    assert not fresh.ingest("r0", "e", CFG, [], next_sequence=4).resync_required
    # A registry that missed events (it is behind the engine) asks too.
    assert reg.ingest("r0", "e", CFG, [], next_sequence=5).resync_required


def test_duplicate_events_are_ignored() -> None:
    reg = make()
    reg.ingest("r0", "e", CFG, [Stored(0, (HASHES[0],)), Removed(1, (HASHES[0],))])
    res = reg.ingest("r0", "e", CFG, [Stored(0, (HASHES[0],))])
    assert res.next_sequence == 2
    assert reg.lookup(PROMPT).matches == ()


def test_new_epoch_discards_previous_state() -> None:
    reg = make()
    reg.ingest("r0", "epoch-1", CFG, [Stored(0, tuple(HASHES))])
    reg.ingest("r0", "epoch-2", CFG, [Stored(0, (HASHES[0],))])
    assert reg.lookup(PROMPT).matches[0].matched_blocks == 1
    assert reg.entries == 1


def test_block_config_mismatch_is_rejected() -> None:
    reg = make()
    with pytest.raises(BlockConfigMismatch, match="block_size"):
        reg.ingest("r0", "e", BlockConfig(8, 7), [])


def test_batch_bound() -> None:
    reg = make(max_entries=10, max_events=1)
    with pytest.raises(BatchTooLarge):
        reg.ingest("r0", "e", CFG, [Cleared(0), Cleared(1)])


def test_a_batch_of_few_events_carrying_too_many_blocks_is_refused_whole() -> None:
    """One event may carry any number of hashes: the bound is on the blocks a batch carries
    (applied without yielding, it would hold every lookup meanwhile)."""
    settings = KvRegistrySettings(max_blocks_per_request=8)
    reg = make_registry(CFG, settings)
    reg.ingest("r0", "e", CFG, [Stored(0, tuple(range(1, 9)))])  # 8: within the bound
    with pytest.raises(BatchTooLarge, match="max_blocks_per_request"):
        reg.ingest("r0", "e", CFG, [Stored(1, (20, 21)), Removed(2, tuple(range(1, 8)))])
    assert reg.block_count("r0") == 8  # nothing of the refused batch applied


def test_entry_bound_drops_oldest_of_fullest_replica() -> None:
    reg = make(max_entries=3)
    reg.ingest("r0", "e", CFG, [Stored(0, tuple(HASHES))])
    assert reg.entries == 3
    assert reg.block_count("r0") == 3
    # the oldest (first) block went: the prefix no longer matches from block 0
    assert reg.lookup(PROMPT).matches == ()


def test_an_exact_replica_silent_for_the_bound_is_dropped() -> None:
    clock = ManualClock(0.0)
    reg = make_registry(CFG, KvRegistrySettings(exact_silence_s=60.0), clock=clock)
    reg.ingest("gone", "e", CFG, [Stored(0, tuple(HASHES))])
    reg.ingest("alive", "e", CFG, [Stored(0, tuple(HASHES))])
    clock.now = 40.0
    reg.ingest("alive", "e", CFG, [], next_sequence=1)  # a heartbeat
    clock.now = 61.0
    reg.maintain(100)
    assert sorted(reg.replica_ids()) == ["alive"]
    assert [m.replica_id for m in reg.lookup(PROMPT).matches] == ["alive"]
    reg.report_reuse("gone", HASHES, 4)  # a late report does not bring it back
    assert sorted(reg.replica_ids()) == ["alive"]
    clock.now = 100.0
    reg.maintain(100)
    assert sorted(reg.replica_ids()) == ["alive"]  # silent 60 s: not beyond the bound
    clock.now = 107.0
    reg.maintain(100)
    # Silent 67 s, but no replica was heard within the bound: as when this process stalled.
    assert sorted(reg.replica_ids()) == ["alive"]
    res = reg.ingest("gone", "e", CFG, [], next_sequence=1)  # it was alive after all
    assert res.resync_required
    clock.now = 114.0
    reg.maintain(100)
    assert list(reg.replica_ids()) == ["gone"]  # "alive" silent 74 s while "gone" was heard


def test_every_replica_silent_while_this_registry_runs_is_dropped() -> None:
    """No engine heard for the bound is a stall of this process only while its checks came
    late: checks on time that find every engine silent for a further bound drop them all (a
    one-engine pool, or every engine gone, is not listed for ever)."""
    clock = ManualClock(0.0)
    reg = make_registry(CFG, KvRegistrySettings(exact_silence_s=60.0), clock=clock)
    reg.ingest("r0", "e", CFG, [Stored(0, tuple(HASHES))])
    for t in range(1, 200):  # maintenance on time, every second
        clock.now = float(t)
        reg.maintain(100)
        if t <= 120:
            assert list(reg.replica_ids()) == ["r0"], t
    assert list(reg.replica_ids()) == []


def test_a_stalled_registry_keeps_the_replicas_it_did_not_hear_meanwhile() -> None:
    clock = ManualClock(0.0)
    reg = make_registry(CFG, KvRegistrySettings(exact_silence_s=60.0), clock=clock)
    reg.ingest("r0", "e", CFG, [Stored(0, tuple(HASHES))])
    clock.now = 10.0
    reg.maintain(100)
    clock.now = 500.0  # no check ran for 490 s: this process was away
    reg.maintain(100)
    assert list(reg.replica_ids()) == ["r0"]
    clock.now = 501.0
    reg.ingest("r0", "e", CFG, [], next_sequence=1)  # its queued heartbeat
    for t in range(502, 700, 6):  # checks on time, a heartbeat every 30 s
        clock.now = float(t)
        if (t - 502) % 30 == 0:
            reg.ingest("r0", "e", CFG, [], next_sequence=1)
        reg.maintain(100)
    assert list(reg.replica_ids()) == ["r0"]


def test_a_predicted_replica_nothing_routes_to_is_forgotten_once_its_predictions_expire() -> None:
    clock = ManualClock(0.0)
    reg = make_registry(CFG, KvRegistrySettings(predicted_ttl_s=600.0), clock=clock)
    reg.record_routing("gone", HASHES)  # its DropReplica never came
    reg.record_routing("used", HASHES)
    reg.record_routing("long", HASHES, ttl_s=2000.0)
    clock.now = 500.0
    reg.report_reuse("used", HASHES, 4)  # a report keeps it too
    clock.now = 601.0
    reg.maintain(100)
    assert sorted(reg.replica_ids()) == ["long", "used"]
    reg.report_reuse("long", HASHES, 4)  # refreshed with its own TTL (2000 s), to 2601
    clock.now = 1101.0
    reg.maintain(100)
    assert sorted(reg.replica_ids()) == ["long"]
    reg.record_routing("used", HASHES)  # routed to again: back (not kept out as dropped)
    assert sorted(reg.replica_ids()) == ["long", "used"]
    clock.now = 2500.0
    reg.maintain(100)
    assert "long" in reg.replica_ids()
    clock.now = 2602.0
    reg.maintain(100)
    assert "long" not in reg.replica_ids()


def test_drop_replica() -> None:
    reg = make()
    reg.ingest("r0", "e", CFG, [Stored(0, tuple(HASHES))])
    assert reg.drop_replica("r0")
    assert reg.lookup(PROMPT).matches == ()
    assert not reg.drop_replica("r0")


def one_at_a_time(counts: list[tuple[str, int]], over: int) -> dict[str, int]:
    """The reference: a block from whichever replica holds the most (ties: first listed)."""
    left = dict(counts)
    for _ in range(over):
        top = max(left, key=lambda r: left[r])  # max keeps the first of equal keys
        if left[top] == 0:
            break
        left[top] -= 1
    return left


@given(
    st.lists(st.integers(0, 40), min_size=1, max_size=8),
    st.integers(0, 400),
)
def test_the_level_plan_leaves_what_evicting_one_at_a_time_would(
    blocks: list[int], over: int
) -> None:
    counts = [(f"r{i}", n) for i, n in enumerate(blocks)]
    left = dict(counts)
    for rid, n in level_plan(counts, over):
        assert 0 < n <= left[rid]
        left[rid] -= n
    assert left == one_at_a_time(counts, over)
