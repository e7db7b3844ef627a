"""Random mixes of exact and approximate operations keep the core's bookkeeping consistent, and
lookups equal a brute-force recomputation from the per-replica state."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmmesh.kvblocks import BlockConfig, block_hashes
from services.kv_registry import core as core_module
from services.kv_registry.core import Cleared, Event, KvRegistry, Removed, Source, Stored

CFG = BlockConfig(block_size=2, hash_seed=1)
CHAINS = [block_hashes(list(range(k * 50, k * 50 + 12)), CFG) for k in range(4)]  # 6 blocks
ALL = [h for c in CHAINS for h in c]
REPLICAS = ["a", "b", "c"]


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def check(reg: KvRegistry, clock: Clock) -> None:
    idx = reg._index
    live = 0
    total = 0
    for rid, rep in reg._replicas.items():
        assert reg._by_held[rep.held] is rep
        live |= rep.held
        held = {h for h, mask in idx.items() if mask & rep.held}
        if rep.exact:
            log = [h for seg in rep.log for h in seg]
            assert len(log) == len(set(log)) == rep.log_len  # each hash logged once
            assert {h for h, mask in idx.items() if mask & rep.logged} == set(log)
            assert held <= set(log)
            assert not rep.pred
        else:
            assert set(rep.pred) == held
            assert not rep.log
            assert rep.log_len == 0
        assert rep.count == len(held), rid
        total += rep.count
    assert reg._live == live
    assert reg.entries == total
    for chain in CHAINS:
        for length in (1, 3, 6):
            prompt = chain[:length]
            want: dict[str, tuple[int, Source]] = {}
            for rid, rep in reg._replicas.items():
                k = 0
                for h in prompt:
                    if not idx.get(h, 0) & rep.held:
                        break
                    if not rep.exact and rep.pred[h] <= clock.now:
                        break
                    k += 1
                if k:
                    want[rid] = (k, rep.source)
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
    saved = (core_module._INLINE_SWEEP, core_module._SEGMENT, core_module._COMPACT_SLACK)
    core_module._INLINE_SWEEP, core_module._SEGMENT, core_module._COMPACT_SLACK = 2, 3, 1
    try:
        clock = Clock()
        reg = KvRegistry(
            CFG,
            max_entries=25,
            max_events_per_request=100,
            predicted_ttl_s=10.0,
            predicted_capacity=capacity,
            clock=clock,
        )
        expected: dict[str, int] = {}
        for op in ops:
            kind = op[0]
            if kind == "ingest":
                _, rid, offset, specs = op
                assert isinstance(rid, str)
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
                expected[rid] = reg.ingest(rid, "e", CFG, events).next_sequence
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
        live_bits = reg._live | (reg._live << 1)
        assert all(mask & ~live_bits == 0 for mask in reg._index.values())  # nothing stale
        for rep in reg._replicas.values():
            if not rep.exact:
                assert rep.count <= rep.capacity
    finally:
        core_module._INLINE_SWEEP, core_module._SEGMENT, core_module._COMPACT_SLACK = saved


def test_check_catches_a_corrupted_index() -> None:
    clock = Clock()
    reg = KvRegistry(CFG, max_entries=100, max_events_per_request=10, clock=clock)
    reg.record_routing("a", CHAINS[0])
    check(reg, clock)
    reg._index[CHAINS[1][0]] = reg._replicas["a"].held  # a block "a" never got
    with pytest.raises(AssertionError):
        check(reg, clock)
