"""The exact and the predicted index behind their one interface, `PrefixIndex`: the same calls,
the same contract; they differ in what "oldest" means and in the match's source."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest

from llmmesh.kvblocks import BlockConfig, block_hashes
from services.kv_registry import bitmask
from services.kv_registry.contracts import PrefixIndex, Ranked, Source, Stored
from services.kv_registry.errors import BatchTooLarge
from services.kv_registry.exact import ExactIndex
from services.kv_registry.metrics import NO_METRICS
from services.kv_registry.predicted import PredictedIndex
from services.kv_registry.settings import KvRegistrySettings
from tests.kv_registry.support import ManualClock, make_registry

CFG = BlockConfig(block_size=4, hash_seed=9)
A = block_hashes(list(range(4 * 6)), CFG)  # 6 blocks
B = block_hashes(list(range(700, 700 + 4 * 6)), CFG)


@dataclass
class Case:
    index: PrefixIndex
    hold: Callable[[str, list[int]], None]  # the replica holds these blocks, oldest first
    source: Source
    after_evicting_one: int  # blocks of A still matched once the oldest entry is gone


def exact_case() -> Case:
    index = ExactIndex(NO_METRICS)

    def hold(replica_id: str, hashes: list[int]) -> None:
        seq = index.replicas[replica_id].next_sequence if replica_id in index.replicas else 0
        index.ingest(replica_id, "e", [Stored(seq, tuple(hashes))])

    return Case(index, hold, Source.EXACT, 0)  # first stored goes first: A's first block


def predicted_case() -> Case:
    index = PredictedIndex(
        ttl_s=60.0, capacity=100, shrink=0.25, clock=ManualClock(), metrics=NO_METRICS
    )

    def hold(replica_id: str, hashes: list[int]) -> None:
        index.record(replica_id, hashes, 60.0)

    # least recently routed goes first: a routing refreshes its leaf first, so A's last block
    return Case(index, hold, Source.PREDICTED, len(A) - 1)


CASES = pytest.mark.parametrize("make", [exact_case, predicted_case], ids=["exact", "predicted"])


def matches(index: PrefixIndex, hashes: list[int]) -> list[tuple[str, int, Source]]:
    ranked: list[Ranked] = []
    index.find_matches(hashes, ranked)
    return [(m.replica_id, m.matched_blocks, m.source) for _, _, m in sorted(ranked)]


@CASES
def test_matches_and_counts(make: Callable[[], Case]) -> None:
    case = make()
    case.hold("r0", A)
    case.hold("r1", A[:2])
    ix = case.index
    assert matches(ix, A) == [("r0", len(A), case.source), ("r1", 2, case.source)]
    assert matches(ix, B) == []
    assert ix.matched("r0", A[:3] + B[3:]) == 3
    assert ix.matched("unknown", A) == 0
    assert (ix.block_count("r0"), ix.block_count("r1"), ix.block_count("unknown")) == (6, 2, 0)
    assert (ix.entries, ix.unique_blocks, ix.garbage_entries) == (8, 6, 0)


@CASES
def test_evict_drops_the_oldest_entries(make: Callable[[], Case]) -> None:
    case = make()
    case.hold("r0", A)
    assert case.index.evict("r0", 1) == 1
    assert case.index.matched("r0", A) == case.after_evicting_one
    assert case.index.evict("r0", 100) == len(A) - 1  # no more than it holds
    assert case.index.evict("unknown", 1) == 0
    assert case.index.entries == 0


@CASES
@pytest.mark.parametrize("lazy", [False, True])
def test_drop_retires_then_sweeps(
    make: Callable[[], Case], lazy: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bitmask, "_INLINE_SWEEP", 2 if lazy else 100)
    case = make()
    case.hold("r0", A)
    case.hold("r1", A[:1])
    ix = case.index
    assert ix.drop("r0")
    assert not ix.drop("r0")
    assert matches(ix, A) == [("r1", 1, case.source)]  # gone at once, swept or not
    assert ix.entries == 1
    assert (ix.has_garbage, ix.garbage_entries) == ((True, 6) if lazy else (False, 0))
    while ix.sweep(2) == 2:
        pass
    assert (ix.has_garbage, ix.garbage_entries, ix.unique_blocks) == (False, 0, 1)


def test_limits_come_from_settings() -> None:
    settings = KvRegistrySettings(
        max_entries=7, max_events_per_request=2, predicted_ttl_s=5.0, predicted_capacity=3
    )
    clock = ManualClock()
    reg = make_registry(CFG, settings, clock=clock)
    assert reg.record_routing("p0", A).recorded_blocks == 3  # predicted_capacity
    assert reg.predicted_capacity("p0") == 3
    clock.now += 5.0
    assert reg.lookup_hashes(A).matches == ()  # predicted_ttl_s
    with pytest.raises(BatchTooLarge):  # max_events_per_request
        reg.ingest("r0", "e", CFG, [Stored(0, (A[0],)), Stored(1, (A[1],)), Stored(2, (A[2],))])
    reg.ingest("r0", "e", CFG, [Stored(0, tuple(A)), Stored(1, tuple(B))])
    assert reg.entries + reg.garbage_entries == 7  # max_entries
