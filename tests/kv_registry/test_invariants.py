"""Random mixes of exact and approximate operations keep both indexes' bookkeeping consistent,
and lookups equal a brute-force recomputation from the per-replica state."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmmesh.kvblocks import BlockConfig, block_hashes
from services.kv_registry import bitmask, exact
from services.kv_registry.bitmask import BitmaskIndex, Slot
from services.kv_registry.contracts import Cleared, Event, Removed, Source, Stored
from services.kv_registry.core import KvRegistry
from services.kv_registry.settings import KvRegistrySettings
from tests.kv_registry.support import ManualClock, held_by, make_registry

CFG = BlockConfig(block_size=2, hash_seed=1)
CHAINS = [block_hashes(list(range(k * 50, k * 50 + 12)), CFG) for k in range(4)]  # 6 blocks
ALL = [h for c in CHAINS for h in c]
REPLICAS = ["a", "b", "c"]
R = TypeVar("R", bound=Slot)
SMALL = KvRegistrySettings(max_entries=100, max_events_per_request=10)


def check_store(store: BitmaskIndex[R], replicas: Mapping[str, R]) -> None:
    live = 0
    for rep in replicas.values():
        assert store.by_held[rep.held] is rep
        live |= rep.held
        assert rep.count == len(held_by(store, rep)), rep.id
    assert store.live == live
    assert store.entries == sum(r.count for r in replicas.values())


def check(reg: KvRegistry, clock: ManualClock) -> None:
    ex, pr = reg.exact, reg.predicted
    check_store(ex.store, ex.replicas)
    check_store(pr.store, pr.replicas)
    for rep in ex.replicas.values():
        log = [h for seg in rep.log for h in seg]
        assert len(log) == len(set(log)) == rep.log_len  # each hash logged once
        assert {h for h, mask in ex.store.index.items() if mask & rep.logged} == set(log)
        assert held_by(ex.store, rep) <= set(log)
        if rep.exact:
            assert rep.id not in pr.replicas  # an exact replica has no predictions
        else:
            assert rep.count == rep.log_len == 0  # one that is not exact holds nothing here
    for prep in pr.replicas.values():
        assert set(prep.pred) == held_by(pr.store, prep)
    assert set(ex.replicas) | set(pr.replicas) <= set(reg.replica_ids())
    assert reg.entries == ex.entries + pr.entries
    for chain in CHAINS:
        for length in (1, 3, 6):
            prompt = chain[:length]
            want: dict[str, tuple[int, Source]] = {}
            for rid in reg.replica_ids():
                e_rep, p_rep = ex.replicas.get(rid), pr.replicas.get(rid)
                k = 0
                for h in prompt:
                    held_exact = e_rep is not None and ex.store.index.get(h, 0) & e_rep.held
                    held_predicted = (
                        p_rep is not None
                        and pr.store.index.get(h, 0) & p_rep.held
                        and p_rep.pred[h] > clock.now
                    )
                    if not (held_exact or held_predicted):
                        break
                    k += 1
                if k:
                    want[rid] = (k, Source.EXACT if ex.is_exact(rid) else Source.PREDICTED)
            got = {
                m.replica_id: (m.matched_blocks, m.source)
                for m in reg.lookup_hashes(prompt).matches
            }
            assert got == want, (prompt, got, want)


hashes_st = st.lists(st.sampled_from(ALL), max_size=5).map(tuple)
op_st = st.one_of(
    st.tuples(
        st.just("ingest"),
        st.sampled_from(REPLICAS),
        st.sampled_from(["e1", "e2"]),  # a new epoch makes an exact replica predicted again
        st.integers(-1, 2),
        st.lists(
            st.one_of(
                st.tuples(st.just("stored"), hashes_st),
                st.tuples(st.just("removed"), hashes_st),
                st.tuples(st.just("cleared"), st.just(())),
            ),
            max_size=3,
        ),
    ),
    st.tuples(
        st.just("record"),
        st.sampled_from(REPLICAS),
        st.sampled_from(range(len(CHAINS))),
        st.integers(1, 6),
        st.sampled_from([None, 5.0, 20.0]),
    ),
    st.tuples(
        st.just("report"),
        st.sampled_from(REPLICAS),
        st.sampled_from(range(len(CHAINS))),
        st.integers(0, 6),
        st.integers(0, 6),
    ),
    st.tuples(st.just("tick"), st.sampled_from([1.0, 4.0, 12.0])),
    st.tuples(st.just("drop"), st.sampled_from(REPLICAS)),
    st.tuples(st.just("maintain"), st.integers(1, 6)),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(op_st, max_size=30), st.integers(3, 12))
def test_bookkeeping_and_lookups_stay_consistent(
    ops: list[tuple[object, ...]], capacity: int
) -> None:
    saved = (bitmask._INLINE_SWEEP, exact._SEGMENT, exact._COMPACT_SLACK)
    bitmask._INLINE_SWEEP, exact._SEGMENT, exact._COMPACT_SLACK = 2, 3, 1
    try:
        clock = ManualClock(0.0)
        limits = KvRegistrySettings(
            max_entries=25,
            max_events_per_request=100,
            predicted_ttl_s=10.0,
            predicted_capacity=capacity,
        )
        reg = make_registry(CFG, limits, clock=clock)
        expected: dict[str, int] = {}
        for op in ops:
            kind = op[0]
            if kind == "ingest":
                _, rid, epoch, offset, specs = op
                assert isinstance(rid, str)
                assert isinstance(epoch, str)
                assert isinstance(offset, int)
                assert isinstance(specs, list)
                seq = max(0, expected.get(rid, 0) + offset)
                events: list[Event] = []
                for i, (what, hs) in enumerate(specs):
                    events.append(
                        Stored(seq + i, hs)
                        if what == "stored"
                        else Removed(seq + i, hs)
                        if what == "removed"
                        else Cleared(seq + i)
                    )
                expected[rid] = reg.ingest(rid, epoch, CFG, events).next_sequence
            elif kind == "record":
                _, rid, c, n, ttl = op
                assert isinstance(rid, str)
                assert isinstance(c, int)
                assert isinstance(n, int)
                assert ttl is None or isinstance(ttl, float)
                reg.record_routing(rid, CHAINS[c][:n], ttl_s=ttl)
            elif kind == "report":
                _, rid, c, reported, predicted = op
                assert isinstance(rid, str)
                assert isinstance(c, int)
                assert isinstance(reported, int)
                assert isinstance(predicted, int)
                reg.report_reuse(rid, CHAINS[c], reported, predicted_blocks=predicted)
            elif kind == "tick":
                assert isinstance(op[1], float)
                clock.now += op[1]
            elif kind == "drop":
                assert isinstance(op[1], str)
                reg.drop_replica(op[1])
                expected.pop(op[1], None)
            else:
                assert isinstance(op[1], int)
                reg.maintain(op[1])
            check(reg, clock)
            assert reg.entries + reg.garbage_entries <= 25
        while reg.maintain(4):
            pass
        check(reg, clock)
        assert reg.garbage_entries == 0
        for store in (reg.exact.store, reg.predicted.store):
            live_bits = store.live | (store.live << 1)
            assert all(mask & ~live_bits == 0 for mask in store.index.values())  # nothing stale
        for rep in reg.predicted.replicas.values():
            assert rep.count <= rep.capacity
    finally:
        bitmask._INLINE_SWEEP, exact._SEGMENT, exact._COMPACT_SLACK = saved


def test_check_catches_a_corrupted_index() -> None:
    clock = ManualClock(0.0)
    reg = make_registry(CFG, SMALL, clock=clock)
    reg.record_routing("a", CHAINS[0])
    check(reg, clock)
    store = reg.predicted.store
    store.index[CHAINS[1][0]] = reg.predicted.replicas["a"].held  # a block "a" never got
    with pytest.raises(AssertionError):
        check(reg, clock)


def test_check_catches_predictions_left_on_an_exact_replica() -> None:
    clock = ManualClock(0.0)
    reg = make_registry(CFG, SMALL, clock=clock)
    reg.record_routing("a", CHAINS[0])
    reg.ingest("a", "e", CFG, [Stored(0, (CHAINS[1][0],))])
    check(reg, clock)
    reg.predicted.record("a", CHAINS[2], 5.0)  # bypasses the registry's mode check
    with pytest.raises(AssertionError):
        check(reg, clock)
