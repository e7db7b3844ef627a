"""The orchestrator's copy of kv_registry's exact index: each change kind, lookups, coverage, the
bound, and parity with the registry itself (its snapshot and change stream applied to a copy
answer every lookup as the registry's exact index does, whatever events, restarts, drops and
bound evictions came before)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmmesh.kvblocks import BlockConfig
from services.kv_registry.contracts import (
    ChangeKind,
    Cleared,
    Event,
    ExactChange,
    Removed,
    Source,
    Stored,
)
from services.kv_registry.core import KvRegistry
from services.kv_registry.settings import KvRegistrySettings
from services.orchestrator.kv_mirror import ExactMirror, MirrorFull
from tests.kv_registry.support import make_registry

CFG = BlockConfig(block_size=4, hash_seed=3)


def test_lookup_counts_leading_blocks_per_replica() -> None:
    m = ExactMirror(100)
    m.stored("a", [1, 2, 3])
    m.stored("b", [1, 2])
    m.stored("c", [2, 3])  # no first block: no match
    assert m.lookup([1, 2, 3, 4]) == {"a": 3, "b": 2}
    assert m.lookup([1, 9, 3]) == {"a": 1, "b": 1}
    assert m.lookup([7, 2]) == {}
    assert m.lookup([]) == {}


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda m: m.removed("a", [2]), {"a": 1, "b": 2}),
        (lambda m: m.removed("a", [9]), {"a": 3, "b": 2}),  # not held: no change
        (lambda m: m.stored("a", [1, 2]), {"a": 3, "b": 2}),  # held again: no change
        (lambda m: m.cleared("a"), {"b": 2}),
        (lambda m: m.gone("a"), {"b": 2}),
        (lambda m: m.gone("zz"), {"a": 3, "b": 2}),  # unknown: no change
    ],
)
def test_changes(change: object, expected: dict[str, int]) -> None:
    m = ExactMirror(100)
    m.stored("a", [1, 2, 3])
    m.stored("b", [1, 2])
    change(m)  # type: ignore[operator]
    assert m.lookup([1, 2, 3]) == expected


def test_exact_membership_and_coverage() -> None:
    m = ExactMirror(100)
    m.cleared("a")  # exact, holding nothing
    m.stored("b", [1])
    assert m.exact == {"a", "b"}
    assert not m.covers(["a"])  # not in sync yet
    m.synced = True
    assert m.covers(["a", "b"])
    assert m.covers([])
    assert not m.covers(["a", "c"])  # c may have predicted entries only the registry has
    m.gone("a")
    assert m.exact == {"b"}
    assert not m.covers(["a"])
    m.reset()
    assert not m.synced
    assert m.exact == frozenset()
    assert m.blocks == 0


def test_a_freed_slot_is_reused_clean() -> None:
    m = ExactMirror(100)
    m.stored("a", [1, 2])
    m.gone("a")
    m.stored("b", [5])
    assert m.lookup([1, 2]) == {}
    assert m.lookup([5]) == {"b": 1}
    assert m.blocks == 1


def test_bound() -> None:
    m = ExactMirror(3)
    m.stored("a", [1, 2, 3])
    m.stored("b", [1, 2, 3])  # same hashes: still 3 blocks
    with pytest.raises(MirrorFull):
        m.stored("a", [4])


# -- parity with the registry -----------------------------------------------------------------
def apply(m: ExactMirror, changes: list[ExactChange]) -> None:
    for c in changes:
        if c.kind is ChangeKind.STORED:
            m.stored(c.replica_id, c.block_hashes)
        elif c.kind is ChangeKind.REMOVED:
            m.removed(c.replica_id, c.block_hashes)
        elif c.kind is ChangeKind.CLEARED:
            m.cleared(c.replica_id)
        else:
            m.gone(c.replica_id)


REPLICAS = ("r0", "r1", "r2")
BLOCKS = 6  # a small hash domain: replicas' blocks overlap often
# Every run of consecutive blocks: each lookup's answer is checked for every possible prompt.
PROMPTS = [list(range(a, b)) for a in range(1, BLOCKS + 1) for b in range(a + 1, BLOCKS + 2)]
hashes_st = st.lists(st.integers(1, BLOCKS), min_size=1, max_size=4)
event_st: st.SearchStrategy[tuple[str, list[int]]] = st.one_of(
    st.tuples(st.just("stored"), hashes_st),
    st.tuples(st.just("removed"), hashes_st),
    st.tuples(st.just("cleared"), st.just([])),
)
# a batch of events from one replica; `skip` leaves a sequence gap (resync) before it
publish_st = st.tuples(
    st.just("publish"),
    st.sampled_from(REPLICAS),
    st.lists(event_st, min_size=1, max_size=4),
    st.booleans(),
)
op_st = st.one_of(
    publish_st,
    publish_st,
    publish_st,  # most steps publish
    st.tuples(st.just("restart"), st.sampled_from(REPLICAS), st.just([]), st.just(False)),
    st.tuples(st.just("drop"), st.sampled_from(REPLICAS), st.just([]), st.just(False)),
    st.tuples(st.just("route"), st.sampled_from(REPLICAS), st.just([]), st.just(False)),
    st.tuples(st.just("watch"), st.just(""), st.just([]), st.just(False)),
)


def to_event(seq: int, kind: str, hashes: list[int]) -> Event:
    if kind == "stored":
        return Stored(seq, tuple(hashes))
    if kind == "removed":
        return Removed(seq, tuple(hashes))
    return Cleared(seq)


def exact_answer(reg: KvRegistry, prompt: list[int]) -> dict[str, int]:
    res = reg.lookup_hashes(prompt)
    return {m.replica_id: m.matched_blocks for m in res.matches if m.source is Source.EXACT}


@settings(max_examples=300, deadline=None)
@given(st.lists(op_st, min_size=4, max_size=40))
def test_the_copy_answers_as_the_registry(
    ops: list[tuple[str, str, list[tuple[str, list[int]]], bool]],
) -> None:
    """A copy fed by the registry's change listener, re-made from a snapshot at each `watch`,
    matches the registry's exact matches on every prompt after every step. A small entry bound
    makes the registry evict exact entries too."""
    reg = make_registry(CFG, KvRegistrySettings(max_entries=6, predicted_capacity=3))
    mirror = ExactMirror(1000)
    pending: list[ExactChange] = []
    reg.on_exact_changes(pending.extend)
    epochs = dict.fromkeys(REPLICAS, 0)
    seqs = dict.fromkeys(REPLICAS, 0)
    for op, rid, events, skip in ops:
        if op == "publish":
            seq = seqs[rid] + (1 if skip else 0)
            batch = [to_event(seq + i, k, h) for i, (k, h) in enumerate(events)]
            seqs[rid] = seq + len(batch)
            reg.ingest(rid, f"e{epochs[rid]}", CFG, batch)
        elif op == "restart":
            epochs[rid] += 1
            seqs[rid] = 0
        elif op == "drop":
            reg.drop_replica(rid)
        elif op == "route":
            reg.record_routing(rid, PROMPTS[BLOCKS - 1])  # all blocks
        else:  # a new watch: a fresh copy from the snapshot
            mirror.reset()
            apply(mirror, list(reg.exact_snapshot()))
            pending.clear()
        apply(mirror, pending)
        pending.clear()
        for prompt in PROMPTS:
            assert mirror.lookup(prompt) == exact_answer(reg, prompt)
        exact = {r for r in REPLICAS if reg.source(r) is Source.EXACT}
        assert mirror.exact == exact
