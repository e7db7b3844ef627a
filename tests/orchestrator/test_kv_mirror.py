"""The orchestrator's copy of kv_registry's exact index: each change kind, lookups, coverage, the
bound, and parity with the registry itself (its snapshot and change stream applied to a copy
answer every lookup as the registry's exact index does, whatever events, restarts, drops and
bound evictions came before)."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmmesh.generated.kvregistry.v1 import kvregistry_pb2 as pb
from llmmesh.kvblocks import BlockConfig
from services.kv_registry.contracts import (
    Cleared,
    Event,
    Removed,
    Source,
    Stored,
)
from services.kv_registry.core import KvRegistry
from services.kv_registry.servicer import Watcher, broadcast, update_messages
from services.kv_registry.settings import KvRegistrySettings
from services.orchestrator.kv_mirror import ExactMirror, MirrorFull
from services.orchestrator.prefix import apply_update
from tests.kv_registry.support import held_by, make_registry

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


def leading_blocks(holdings: dict[str, set[int]], hashes: list[int]) -> dict[str, int]:
    """The lookup's definition, block by block: per replica holding the first block, how many
    leading blocks it holds."""
    out = {}
    for rid, held in holdings.items():
        n = 0
        while n < len(hashes) and hashes[n] in held:
            n += 1
        if n:
            out[rid] = n
    return out


CHAIN = 40  # blocks 0..CHAIN - 1 of one chain
run_st = st.tuples(st.integers(0, CHAIN - 1), st.integers(0, CHAIN - 1)).map(
    lambda ends: range(min(ends), max(ends) + 1)
)


@given(
    st.dictionaries(
        st.sampled_from([f"r{i}" for i in range(70)]),  # more replicas than a machine word
        run_st,
        max_size=70,
    ),
    run_st,
)
def test_lookup_is_the_leading_blocks_each_replica_holds(
    runs: dict[str, range], prompt: range
) -> None:
    """Each replica holds a run of the chain (engines' events keep it so: kv_mirror's
    "Lookups"), the prompt is a run too: the bisection gives the block-by-block answer."""
    m = ExactMirror(10_000)
    for rid, run in runs.items():
        m.stored(rid, run)
    holdings = {rid: set(run) for rid, run in runs.items()}
    assert m.lookup(list(prompt)) == leading_blocks(holdings, list(prompt))


@given(
    st.dictionaries(
        st.sampled_from([f"r{i}" for i in range(70)]),
        st.sets(st.integers(0, 40), max_size=30),
        max_size=70,
    ),
    st.lists(st.integers(0, 40), max_size=60),
)
def test_a_hole_credits_at_least_the_leading_run_and_ends_on_a_held_block(
    holdings: dict[str, set[int]], hashes: list[int]
) -> None:
    """Holdings no engine makes (holes anywhere): each replica holding the first block is
    credited at least its leading run, and its credited match ends on a block it holds."""
    m = ExactMirror(10_000)
    for rid, held in holdings.items():
        m.stored(rid, held)
    got = m.lookup(hashes)
    leading = leading_blocks(holdings, hashes)
    assert got.keys() == leading.keys()
    for rid, n in got.items():
        assert leading[rid] <= n <= len(hashes)
        assert hashes[n - 1] in holdings[rid]


def test_a_gap_the_bisection_does_not_read_is_passed_over() -> None:
    """As where the registry's bound dropped block 2 from a run the engine still holds."""
    m = ExactMirror(100)
    m.stored("a", [1, 3, 4])
    assert m.lookup([1, 2, 3, 4]) == {"a": 4}  # reads blocks 1, 3 and 4 only
    assert m.lookup([1, 2]) == {"a": 1}


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
REPLICAS = ("r0", "r1", "r2")
BLOCKS = 6  # a small hash domain: replicas' blocks overlap often
# Every run of consecutive blocks: each lookup's answer is checked for every possible prompt.
PROMPTS = [list(range(a, b)) for a in range(1, BLOCKS + 1) for b in range(a + 1, BLOCKS + 2)]
# Events as an engine publishes them, on the chain of blocks 1..BLOCKS (block i's parent is
# i - 1): a store extends what the engine holds (from a block it holds already, with `again`),
# an eviction takes blocks from the end, leaf first (kv_mirror's "Lookups").
count_st = st.integers(1, 3)
event_st: st.SearchStrategy[tuple[str, int, bool]] = st.one_of(
    st.tuples(st.just("stored"), count_st, st.booleans()),
    st.tuples(st.just("removed"), count_st, st.just(False)),
    st.tuples(st.just("cleared"), st.just(0), st.just(False)),
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
    # a new watch starts; its snapshot advances a replica per `snap` step, as the servicer's
    st.tuples(st.just("watch"), st.just(""), st.just([]), st.just(False)),
    st.tuples(st.just("snap"), st.just(""), st.just([]), st.just(False)),
)


class Engine:
    """What one replica's engine holds: blocks 1..top of the chain."""

    def __init__(self) -> None:
        self.top = 0

    def event(self, seq: int, kind: str, n: int, again: bool) -> Event:
        if kind == "stored":
            top = min(BLOCKS, self.top + n)
            first = max(1, self.top) if again or top == self.top else self.top + 1
            self.top = top
            return Stored(seq, tuple(range(first, top + 1)))
        if kind == "removed":
            bottom = max(0, self.top - n)
            gone = tuple(range(self.top, bottom, -1))  # leaf first
            self.top = bottom
            # An engine holding nothing evicts nothing; its event is a clear (no change).
            return Removed(seq, gone) if gone else Cleared(seq)
        self.top = 0
        return Cleared(seq)


class Engines:
    """Every replica's engine, publishing its events to `reg` in sequence."""

    def __init__(self, reg: KvRegistry, replicas: Sequence[str]) -> None:
        self.reg = reg
        self.engines = {rid: Engine() for rid in replicas}
        self.epochs = dict.fromkeys(replicas, 0)
        self.seqs = dict.fromkeys(replicas, 0)

    def publish(
        self, rid: str, events: Sequence[tuple[str, int, bool]], skip: bool = False
    ) -> None:
        """`events` in one batch; `skip` leaves a sequence gap before it (resync)."""
        seq = self.seqs[rid] + (1 if skip else 0)
        engine = self.engines[rid]
        batch = [engine.event(seq + i, *event) for i, event in enumerate(events)]
        self.seqs[rid] = seq + len(batch)
        self.reg.ingest(rid, f"e{self.epochs[rid]}", CFG, batch)

    def restart(self, rid: str) -> None:
        """A new engine: its cache starts empty, its events a new epoch."""
        self.engines[rid] = Engine()
        self.epochs[rid] += 1
        self.seqs[rid] = 0


def listed(reg: KvRegistry, replica_id: str) -> set[int]:
    """The blocks the registry's exact index lists for the replica."""
    return held_by(reg.exact.store, reg.exact.replicas[replica_id])


def is_run(held: set[int], prompt: list[int]) -> bool:
    """The prompt's blocks in `held` are consecutive in it (or none)."""
    at = [i for i, h in enumerate(prompt) if h in held]
    return not at or at[-1] - at[0] == len(at) - 1


def exact_answer(reg: KvRegistry, prompt: list[int]) -> dict[str, int]:
    res = reg.lookup_hashes(prompt)
    return {m.replica_id: m.matched_blocks for m in res.matches if m.source is Source.EXACT}


class Watch:
    """A watch as the servicer runs it, its messages kept as the orchestrator would get them:
    the snapshot's (one replica per step), then the queued changes."""

    def __init__(self, reg: KvRegistry) -> None:
        self.watcher = Watcher(reg.exact_replicas(), 10**9)
        self.sent: list[pb.ExactIndexUpdate] = []

    def step(self, reg: KvRegistry) -> None:
        if self.watcher.pending:
            rid = min(self.watcher.pending)
            snapshot = reg.exact_snapshot(rid)
            self.watcher.pending.discard(rid)
            self.sent += [m for m, _ in update_messages(snapshot)]

    def copy(self) -> ExactMirror | None:
        """What the orchestrator holds once the snapshot is done and the backlog applied."""
        if self.watcher.pending:
            return None
        m = ExactMirror(1000)
        for update in [*self.sent, pb.ExactIndexUpdate(synced=True), *self.watcher.backlog]:
            apply_update(m, pb.ExactIndexUpdate.FromString(update.SerializeToString()))
        return m


@settings(max_examples=300, deadline=None)
@given(st.lists(op_st, min_size=4, max_size=40))
def test_the_copy_answers_as_the_registry(
    ops: list[tuple[str, str, list[tuple[str, int, bool]], bool]],
) -> None:
    """Copies built by watches started at any point (snapshot one replica at a time while the
    registry keeps changing, then the queued changes, through protobuf) and one watch from the
    start match the registry's exact matches on every prompt after every step. A small entry
    bound makes the registry evict exact entries too."""
    reg = make_registry(CFG, KvRegistrySettings(max_entries=6, predicted_capacity=3))
    watches = [Watch(reg)]
    reg.on_exact_changes(lambda changes: broadcast([w.watcher for w in watches], changes))
    engines = Engines(reg, REPLICAS)
    for op, rid, events, skip in ops:
        if op == "publish":
            engines.publish(rid, events, skip)
        elif op == "restart":
            engines.restart(rid)
        elif op == "drop":
            reg.drop_replica(rid)
        elif op == "route":
            reg.record_routing(rid, PROMPTS[BLOCKS - 1])  # all blocks
        elif op == "watch":
            watches.append(Watch(reg))
        else:
            for w in watches:
                w.step(reg)
        exact = {r for r in REPLICAS if reg.source(r) is Source.EXACT}
        held = {r: listed(reg, r) for r in exact}
        answers = [
            (prompt, exact_answer(reg, prompt), all(is_run(held[r], prompt) for r in exact))
            for prompt in PROMPTS
        ]
        for w in watches:
            copy = w.copy()
            if copy is None:
                continue
            assert copy.exact == exact
            for prompt, want, runs in answers:
                got = copy.lookup(prompt)
                if runs:
                    assert got == want
                    continue
                # The bound dropped a block from within a run (kv_mirror's "Lookups").
                assert got.keys() == want.keys()
                for r, n in got.items():
                    assert want[r] <= n
                    assert prompt[n - 1] in held[r]


def test_a_block_the_registry_bound_dropped_from_a_run_is_passed_over() -> None:
    """The registry's bound drops a replica's earliest-logged block; a block stored again after
    the bound dropped it is logged last, so the next drop can be within a run the engine still
    holds: the registry's walk stops there, the copy credits what is listed beyond it."""
    reg = make_registry(CFG, KvRegistrySettings(max_entries=6, predicted_capacity=3))
    watch = Watch(reg)
    reg.on_exact_changes(lambda changes: broadcast([watch.watcher], changes))
    engines = Engines(reg, ("r0", "r1"))
    engines.publish("r0", [("stored", 3, False), ("stored", 3, False)])  # r0 holds 1..6
    engines.publish("r1", [("stored", 1, False)])  # the bound drops r0's block 1
    engines.publish("r0", [("removed", 3, False), ("removed", 3, False)])  # evicts 6..1
    engines.publish("r0", [("stored", 3, False), ("stored", 1, False)])  # computes 1..4 again
    engines.publish("r1", [("stored", 2, False)])  # the bound drops r0's block 2, logged first
    assert engines.engines["r0"].top == 4
    assert listed(reg, "r0") == {1, 3, 4}
    copy = watch.copy()
    assert copy is not None
    assert exact_answer(reg, [1, 2, 3, 4])["r0"] == 1
    assert copy.lookup([1, 2, 3, 4])["r0"] == 4  # what r0's engine holds
