"""Exact mode: event streams, gaps and resync, epochs, drops, lazy cleanup, bounds; and the
bitmask index against the straightforward implementation (tests/kv_registry/naive.py) as an
oracle."""

from __future__ import annotations

from collections.abc import Sequence

import grpc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmmesh.kvblocks import BlockConfig, block_hashes, epoch_precedes, new_epoch
from services.kv_registry import bitmask, exact
from services.kv_registry.contracts import Cleared, Event, Removed, Source, Stored
from services.kv_registry.core import KvRegistry
from services.kv_registry.errors import SupersededEpoch
from services.kv_registry.settings import KvRegistrySettings
from tests.kv_registry.naive import NaiveKvRegistry
from tests.kv_registry.support import ManualClock, make_registry

CFG = BlockConfig(block_size=4, hash_seed=7)
H = block_hashes(list(range(1000, 1000 + 4 * 8)), CFG)  # one 8-block chain


def make(max_entries: int = 10_000) -> KvRegistry:
    return make_registry(
        CFG, KvRegistrySettings(max_entries=max_entries, max_events_per_request=10_000)
    )


def matched(reg: KvRegistry, hashes: Sequence[int] = H) -> dict[str, int]:
    return {m.replica_id: m.matched_blocks for m in reg.lookup_hashes(hashes).matches}


def drain(reg: KvRegistry) -> None:
    while reg.maintain(64):
        pass


# -- sequence numbers: (batches of events) -> (next_sequence, resync_required) after each batch,
#    and the blocks matched at the end ------------------------------------------------------
S = Stored
R = Removed
C = Cleared

STREAMS: list[tuple[str, list[list[Event]], list[tuple[int, bool]], int]] = [
    ("in order", [[S(0, (H[0],)), S(1, (H[1],))], [S(2, (H[2],))]], [(2, False), (3, False)], 3),
    ("duplicate batch", [[S(0, (H[0],))], [S(0, (H[0],))]], [(1, False), (1, False)], 1),
    (
        "gap then ignored until snapshot",
        [[S(0, (H[0],))], [S(5, (H[1],))], [S(6, (H[2],))], [C(9), S(10, tuple(H[:4]))]],
        [(1, False), (1, True), (1, True), (11, False)],
        4,
    ),
    ("snapshot may start anywhere", [[C(41), S(42, tuple(H))]], [(43, False)], 8),
    ("first batch with a gap (registry restarted)", [[S(7, (H[0],))]], [(0, True)], 0),
    (
        "removed within the stream",
        [[S(0, tuple(H[:4])), R(1, (H[2],))]],
        [(2, False)],
        2,
    ),
    (
        "cleared mid-stream",
        [[S(0, tuple(H[:4])), C(1), S(2, (H[0],))]],
        [(3, False)],
        1,
    ),
    (
        "stale snapshot head (below next) is a duplicate",
        [[S(0, (H[0],)), S(1, (H[1],))], [C(1)]],
        [(2, False), (2, False)],
        2,
    ),
    (
        # An older snapshot delivered late while a gap waits for a new one: applied, it would
        # roll the account back to what the engine held then.
        "stale snapshot during a resync is not applied",
        [[S(0, (H[0],)), S(1, (H[1],))], [S(5, (H[2],))], [C(1), S(2, (H[3],))]],
        [(2, False), (2, True), (2, True)],
        2,
    ),
]


@pytest.mark.parametrize(
    ("batches", "results", "blocks"), [s[1:] for s in STREAMS], ids=[s[0] for s in STREAMS]
)
def test_event_streams(
    batches: list[list[Event]], results: list[tuple[int, bool]], blocks: int
) -> None:
    reg = make()
    got = []
    for batch in batches:
        res = reg.ingest("r0", "e", CFG, batch)
        got.append((res.next_sequence, res.resync_required))
    assert got == results
    assert matched(reg).get("r0", 0) == blocks


def test_lookups_keep_answering_during_resync() -> None:
    reg = make()
    reg.ingest("r0", "e", CFG, [S(0, tuple(H[:3]))])
    assert reg.ingest("r0", "e", CFG, [S(3, (H[3],))]).resync_required
    assert matched(reg) == {"r0": 3}  # last good state, not blocked, not emptied


@pytest.mark.parametrize("size", [3, 40])  # inline sweep and lazy sweep (limit patched to 8)
def test_new_epoch_discards_previous_lifetime(size: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bitmask, "_INLINE_SWEEP", 8)
    hashes = block_hashes(list(range(4 * size)), CFG)
    reg = make()
    reg.ingest("r0", "epoch-1", CFG, [S(0, tuple(hashes))])
    res = reg.ingest("r0", "epoch-2", CFG, [S(0, (hashes[0],))])
    assert (res.next_sequence, res.resync_required) == (1, False)
    assert matched(reg, hashes) == {"r0": 1}
    assert reg.entries == 1
    drain(reg)
    assert reg.garbage_entries == 0
    assert reg.unique_blocks == 1


# Engine lifetimes that carry their start (the emulator's and the simulator's epochs).
E1, E2 = new_epoch(1_000_000_000), new_epoch(2_000_000_000)


def test_an_earlier_lifetimes_late_batch_is_refused_and_wipes_nothing() -> None:
    """A replaced engine's last batch (its shutdown flush, or a call still in flight) reaching
    the registry after its successor's snapshot: taken as a new lifetime, it wiped the
    successor's account and set its stream back to sequence 0, so the successor was asked for a
    snapshot at its next event."""
    reg = make()
    reg.ingest("r0", E1, CFG, [C(0), S(1, tuple(H[:2]))])
    reg.ingest("r0", E2, CFG, [C(0), S(1, tuple(H))])
    with pytest.raises(SupersededEpoch) as refused:
        reg.ingest("r0", E1, CFG, [S(2, (H[2],))])
    assert refused.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert refused.value.field == "epoch"
    with pytest.raises(SupersededEpoch):
        reg.ingest("r0", E1, CFG, [], next_sequence=3)  # its heartbeat, likewise
    assert matched(reg) == {"r0": 8}
    res = reg.ingest("r0", E2, CFG, [R(2, (H[7],))])
    assert (res.next_sequence, res.resync_required) == (3, False)
    assert matched(reg) == {"r0": 7}


def test_a_later_lifetime_replaces_and_unordered_epochs_replace_as_before() -> None:
    reg = make()
    reg.ingest("r0", E1, CFG, [C(0), S(1, tuple(H))])
    reg.ingest("r0", E2, CFG, [C(0), S(1, (H[0],))])
    assert matched(reg) == {"r0": 1}
    # An epoch without its start (another publisher's) does not order: it replaces.
    reg.ingest("r0", "plain", CFG, [C(0), S(1, tuple(H[:3]))])
    assert matched(reg) == {"r0": 3}
    reg.ingest("r0", E1, CFG, [C(0), S(1, tuple(H[:2]))])
    assert matched(reg) == {"r0": 2}


def test_a_refused_lifetime_keeps_nothing_alive_and_a_dropped_replica_takes_any() -> None:
    """The kept lifetime's engine died: its successor's epoch sorts before it (its host's clock
    ran behind). The successor's refused calls do not count as the replica heard, so the kept
    lifetime goes silent and the successor is taken once it has been for a quarter of
    exact_silence_s; after a drop any lifetime is taken at once."""
    clock = ManualClock(0.0)
    reg = make_registry(
        CFG, KvRegistrySettings(exact_silence_s=60.0, max_events_per_request=10_000), clock=clock
    )
    reg.ingest("r0", E2, CFG, [C(0), S(1, tuple(H))])
    for t in (5.0, 10.0, 14.0):
        clock.now = t
        with pytest.raises(SupersededEpoch):
            reg.ingest("r0", E1, CFG, [], next_sequence=0)
    clock.now = 16.0  # E2 silent 16 s, whatever E1 sent meanwhile
    res = reg.ingest("r0", E1, CFG, [C(0), S(1, (H[0],))])
    assert (res.next_sequence, res.resync_required) == (2, False)
    assert matched(reg) == {"r0": 1}
    reg.ingest("r0", E2, CFG, [C(0), S(1, tuple(H))])  # a later start replaces at once
    assert reg.drop_replica("r0")
    res = reg.ingest("r0", E1, CFG, [C(0), S(1, tuple(H[:2]))])
    assert (res.next_sequence, res.resync_required) == (2, False)
    assert matched(reg) == {"r0": 2}


def test_a_kept_lifetime_silent_for_a_quarter_of_the_bound_holds_off_no_earlier_one() -> None:
    """Its engine died, and the next one's start reads earlier (the wall clock stepped back):
    with no other replica publishing, the silence drop never ran (it takes a registry nobody
    reached for a stall), so the new engine was refused for good while lookups kept answering
    the dead one's blocks."""
    clock = ManualClock(0.0)
    reg = make_registry(
        CFG, KvRegistrySettings(exact_silence_s=60.0, max_events_per_request=10_000), clock=clock
    )
    reg.ingest("r0", E2, CFG, [C(0), S(1, tuple(H))])
    clock.now = 14.0
    with pytest.raises(SupersededEpoch):
        reg.ingest("r0", E1, CFG, [], next_sequence=0)
    clock.now = 15.0  # the kept lifetime silent 15 s: a quarter of exact_silence_s
    res = reg.ingest("r0", E1, CFG, [C(0), S(1, (H[0],))])
    assert (res.next_sequence, res.resync_required) == (2, False)
    assert matched(reg) == {"r0": 1}


def test_epochs_order_by_their_start_only() -> None:
    assert epoch_precedes(E1, E2)
    assert not epoch_precedes(E2, E1)
    assert not epoch_precedes(E1, E1)
    assert not epoch_precedes(new_epoch(1_000_000_000), E1)  # the same start: no order
    assert not epoch_precedes("plain", E2)
    assert not epoch_precedes(E1, "plain")


@pytest.mark.parametrize("size", [3, 40])
def test_drop_replica(size: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bitmask, "_INLINE_SWEEP", 8)
    hashes = block_hashes(list(range(4 * size)), CFG)
    reg = make()
    reg.ingest("r0", "e", CFG, [S(0, tuple(hashes))])
    reg.ingest("r1", "e", CFG, [S(0, tuple(hashes[:2]))])
    assert reg.drop_replica("r0")
    assert not reg.drop_replica("r0")
    assert matched(reg, hashes) == {"r1": 2}
    assert reg.block_count("r0") == 0
    assert reg.entries == 2
    drain(reg)
    assert (reg.garbage_entries, reg.unique_blocks) == (0, 2)
    # the engine keeps publishing: its stream now has a gap, so it is asked for a snapshot
    assert reg.ingest("r0", "e", CFG, [S(1, (hashes[0],))]).resync_required


def test_clearing_a_large_replica_is_lazy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bitmask, "_INLINE_SWEEP", 16)
    hashes = block_hashes(list(range(4 * 1000)), CFG)  # more than one amortized step
    reg = make()
    reg.ingest("r0", "e", CFG, [S(0, tuple(hashes))])
    reg.ingest("r1", "e", CFG, [S(0, tuple(hashes[:5]))])
    reg.ingest("r0", "e", CFG, [C(1)])  # the head of a snapshot
    assert reg.entries == 5
    assert reg.garbage_entries > 0  # swept later, not in this call
    assert matched(reg, hashes) == {"r1": 5}  # r0 is invisible at once
    reg.ingest("r0", "e", CFG, [S(2, tuple(hashes[:3]))])  # the snapshot arrives meanwhile
    assert matched(reg, hashes) == {"r1": 5, "r0": 3}
    drain(reg)
    assert reg.garbage_entries == 0
    assert reg.unique_blocks == 5
    assert reg.entries == 8


def test_removed_blocks_are_compacted_out_of_the_log(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(exact, "_COMPACT_SLACK", 4)
    monkeypatch.setattr(exact, "_SEGMENT", 8)
    reg = make()
    seq = 0
    prev: tuple[int, ...] = ()
    for i in range(50):  # an engine at capacity: every new chain evicts the previous one
        hashes = tuple(block_hashes(list(range(i * 100, i * 100 + 12)), CFG))
        events: list[Event] = [S(seq, hashes)]
        if prev:
            events.append(R(seq + 1, prev))
        reg.ingest("r0", "e", CFG, events)
        seq += len(events)
        prev = hashes
    drain(reg)
    assert reg.block_count("r0") == 3
    assert reg.unique_blocks <= 3 + 2 * 3 + 4  # stale entries are bounded, not accumulated
    rep = reg.exact.replicas["r0"]
    assert rep.log_len <= 2 * rep.count + 4


def test_bound_drops_oldest_blocks_of_the_fullest_replica() -> None:
    reg = make(max_entries=6)
    a = block_hashes(list(range(20)), CFG)  # 5 blocks
    b = block_hashes(list(range(500, 508)), CFG)  # 2 blocks
    reg.ingest("big", "e", CFG, [S(0, tuple(a))])
    reg.ingest("small", "e", CFG, [S(0, tuple(b))])
    assert reg.entries == 6
    assert (reg.block_count("big"), reg.block_count("small")) == (4, 2)
    assert matched(reg, a) == {}  # big lost its oldest (first) block
    assert matched(reg, b) == {"small": 2}


def test_matches_say_exact() -> None:
    reg = make()
    reg.ingest("r0", "e", CFG, [S(0, tuple(H))])
    assert [m.source for m in reg.lookup_hashes(H).matches] == [Source.EXACT]
    assert reg.source("r0") is Source.EXACT


# -- differential: random event streams, the old implementation as the oracle ---------------
CHAINS = [block_hashes(list(range(k * 97, k * 97 + 4 * 6)), CFG) for k in range(3)]
ALL = [h for c in CHAINS for h in c]

event_st = st.one_of(
    st.builds(lambda hs: ("stored", tuple(hs)), st.lists(st.sampled_from(ALL), max_size=6)),
    st.builds(lambda hs: ("removed", tuple(hs)), st.lists(st.sampled_from(ALL), max_size=6)),
    st.just(("cleared", ())),
)
op_st = st.one_of(
    st.tuples(
        st.just("ingest"),
        st.sampled_from(["r0", "r1", "r2"]),
        st.sampled_from(["e1", "e2"]),
        st.integers(-2, 3),  # sequence offset from what the replica expects (gaps, duplicates)
        st.lists(event_st, max_size=4),
    ),
    st.tuples(st.just("drop"), st.sampled_from(["r0", "r1", "r2"])),
    st.tuples(st.just("maintain"), st.integers(1, 8)),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(op_st, max_size=25))
def test_same_answers_as_the_previous_implementation(ops: list[tuple[object, ...]]) -> None:
    saved = (bitmask._INLINE_SWEEP, exact._SEGMENT, exact._COMPACT_SLACK)
    bitmask._INLINE_SWEEP, exact._SEGMENT, exact._COMPACT_SLACK = 2, 3, 1
    try:
        new = make()
        old = NaiveKvRegistry(CFG, max_entries=10_000, max_events_per_request=10_000)
        expected_next: dict[tuple[str, str], int] = {}
        for op in ops:
            if op[0] == "ingest":
                _, rid, epoch, offset, specs = op
                assert isinstance(rid, str)
                assert isinstance(epoch, str)
                assert isinstance(offset, int)
                assert isinstance(specs, list)
                start = max(0, expected_next.get((rid, epoch), 0) + offset)
                events: list[Event] = []
                for i, (kind, hs) in enumerate(specs):
                    seq = start + i
                    events.append(
                        Stored(seq, hs)
                        if kind == "stored"
                        else Removed(seq, hs)
                        if kind == "removed"
                        else Cleared(seq)
                    )
                a = new.ingest(rid, epoch, CFG, events)
                b = old.ingest(rid, epoch, CFG, events)
                assert a == b
                expected_next[(rid, epoch)] = a.next_sequence
            elif op[0] == "drop":
                rid = op[1]
                assert isinstance(rid, str)
                new_dropped = new.drop_replica(rid)
                old_dropped = old.drop_replica(rid)
                assert new_dropped == old_dropped
            else:
                budget = op[1]
                assert isinstance(budget, int)
                new.maintain(budget)
            for chain in CHAINS:
                for length in (1, 3, 6):
                    assert new.lookup_hashes(chain[:length]) == old.lookup_hashes(chain[:length])
            assert new.entries == old.entries
            for rid in ("r0", "r1", "r2"):
                assert new.block_count(rid) == old.block_count(rid)
        drain(new)
        assert new.garbage_entries == 0
        store = new.exact.store
        held = {
            h for h in ALL if any(store.index.get(h, 0) & r.held for r in store.by_held.values())
        }
        assert held == set(old._holders)
        assert new.predicted.entries == new.predicted.unique_blocks == 0
    finally:
        bitmask._INLINE_SWEEP, exact._SEGMENT, exact._COMPACT_SLACK = saved
