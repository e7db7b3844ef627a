from __future__ import annotations

from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmmesh.emulator.events import (
    AllBlocksCleared,
    BlocksRemoved,
    BlocksStored,
    KvEvent,
    StoredBlock,
)
from llmmesh.emulator.kv_cache import CacheCapacityError, PagedKvCache
from llmmesh.kvblocks import BlockConfig, block_hashes

CFG = BlockConfig(block_size=4, hash_seed=7)


def seq(start: int, n: int) -> list[int]:
    return list(range(start, start + n))


def replay(events: Sequence[KvEvent], into: set[int] | None = None) -> set[int]:
    """What a registry that applies the events in order believes the cache holds."""
    held = set() if into is None else into
    for ev in events:
        if isinstance(ev.data, AllBlocksCleared):
            held.clear()
        elif isinstance(ev.data, BlocksStored):
            held.update(b.block_hash for b in ev.data.blocks)
        else:
            held.difference_update(ev.data.block_hashes)
    return held


def stored_hashes(events: Sequence[KvEvent]) -> list[int]:
    return [b.block_hash for e in events if isinstance(e.data, BlocksStored) for b in e.data.blocks]


def removed_hashes(events: Sequence[KvEvent]) -> list[int]:
    return [h for e in events if isinstance(e.data, BlocksRemoved) for h in e.data.block_hashes]


@pytest.mark.parametrize(
    ("first", "second", "release_first", "reused"),
    [
        (seq(0, 10), seq(0, 10), True, 2),  # 2 full blocks + partial: both full blocks reused
        (seq(0, 10), seq(0, 10), False, 2),  # shared while the first is still running
        (seq(0, 8), seq(0, 8), True, 1),  # exact block multiple: the last block is recomputed
        (seq(0, 9), seq(0, 8), True, 1),
        (seq(0, 12), seq(0, 5) + [99] * 7, True, 1),  # diverges in block 1
        (seq(0, 12), [99, *seq(1, 11)], True, 0),  # diverges in block 0: nothing reused
        (seq(0, 4), seq(0, 4), True, 0),  # one full block, last token always recomputed
        (seq(0, 4), seq(0, 5), True, 1),
        (seq(0, 3), seq(0, 3), True, 0),  # no full block at all
    ],
)
def test_prefix_reuse_counts(
    first: list[int], second: list[int], release_first: bool, reused: int
) -> None:
    cache = PagedKvCache(16, CFG)
    a = cache.try_admit("a", first, 4)
    assert a is not None
    assert a.reused_blocks == 0
    if release_first:
        cache.release("a")
    assert len(cache.match_prefix(second)) == reused
    b = cache.try_admit("b", second, 4)
    assert b is not None
    assert b.reused_blocks == reused
    assert b.new_blocks == -(-len(second) // 4) - reused
    assert cache.reused_blocks_total == reused


def test_stored_hashes_are_the_registry_hashes() -> None:
    cache = PagedKvCache(16, CFG)
    prompt = seq(100, 10)
    cache.try_admit("a", prompt, 8)
    generated = seq(500, 8)
    for t in generated:
        cache.append_token("a", t)
    events = cache.drain_events()
    assert [e.sequence for e in events] == list(range(len(events)))
    assert stored_hashes(events) == block_hashes(prompt + generated, CFG)
    first = events[0].data
    assert isinstance(first, BlocksStored)
    assert first.parent_hash is None  # a prompt's first block
    assert first.blocks[0] == StoredBlock(block_hashes(prompt, CFG)[0], tuple(prompt[:4]))
    later = events[1].data
    assert isinstance(later, BlocksStored)
    assert later.parent_hash == block_hashes(prompt, CFG)[1]  # continues the chain


def test_full_duplicate_block_is_shared_not_stored_twice() -> None:
    cache = PagedKvCache(16, CFG)
    cache.try_admit("a", seq(0, 8), 4)
    cache.drain_events()
    b = cache.try_admit("b", seq(0, 8), 4)  # reuses block 0, recomputes block 1
    assert b is not None
    assert b.reused_blocks == 1
    assert cache.drain_events() == []  # block 1 already stored: no event, no second copy
    assert cache.num_used == 2  # both sequences share two blocks
    assert cache.num_cached == 2


@pytest.mark.parametrize(
    ("touch", "expected_evictions"),
    [
        ([], ["A", "B"]),  # least recently released first
        (["A"], ["B", "C"]),  # reusing A makes it most recent
        (["B", "A"], ["C", "B"]),
    ],
)
def test_lru_eviction_order(touch: list[str], expected_evictions: list[str]) -> None:
    cache = PagedKvCache(4, CFG)
    prompts = {"A": [1] * 4, "B": [2] * 4, "C": [3] * 4}
    hashes = {k: block_hashes(p, CFG)[0] for k, p in prompts.items()}
    for k, p in prompts.items():  # one cached, unreferenced block each; one block left empty
        assert cache.try_admit(k, p, 1) is not None
        cache.release(k)
    for k in touch:  # a longer prompt reuses the block, then releases it again
        r = cache.try_admit(f"touch-{k}", [*prompts[k], 0], 1)
        assert r is not None
        assert r.reused_blocks == 1
        cache.release(f"touch-{k}")
    cache.drain_events()
    d = cache.try_admit("D", [4] * 4, 8)  # 12 tokens: 3 blocks; the empty block goes first
    assert d is not None
    assert removed_hashes(cache.drain_events()) == []
    for t in range(8):
        cache.append_token("D", 10 + t)
    assert removed_hashes(cache.drain_events()) == [hashes[k] for k in expected_evictions]
    survivors = set(prompts) - set(expected_evictions)
    assert all(cache.is_cached(hashes[k]) for k in survivors)


def test_prefix_outlives_its_extensions() -> None:
    cache = PagedKvCache(3, CFG)
    prompt = seq(0, 12)
    cache.try_admit("a", prompt, 0)
    cache.release("a")
    chain = block_hashes(prompt, CFG)
    assert cache.evictable_hashes() == list(reversed(chain))  # leaf evicted first
    cache.drain_events()
    cache.try_admit("b", [50] * 5, 0)  # needs 2 blocks
    assert removed_hashes(cache.drain_events()) == [chain[2], chain[1]]
    assert cache.match_prefix([*prompt, 0]) == chain[:1]


def test_admission_waits_for_blocks_and_counts() -> None:
    cache = PagedKvCache(4, CFG)
    assert cache.try_admit("a", seq(0, 5), 7) is not None  # 12 tokens: 3 blocks reserved
    assert (cache.num_used, cache.num_reserved, cache.num_free) == (2, 1, 2)
    assert cache.try_admit("b", seq(100, 5), 0) is None  # 2 blocks, only 1 unpromised
    assert cache.try_admit("b", seq(100, 3), 0) is not None  # 1 block fits
    cache.release("a")
    cache.release("b")
    assert (cache.num_used, cache.num_reserved, cache.num_free) == (0, 0, 4)
    assert cache.num_cached == 1  # a's only full block


def test_growing_beyond_the_reservation_fails_loudly() -> None:
    cache = PagedKvCache(1, CFG)
    cache.try_admit("a", seq(0, 3), 1)
    cache.append_token("a", 1)  # 4 tokens: the one reserved block is full
    with pytest.raises(CacheCapacityError):
        cache.append_token("a", 2)


def test_snapshot_continues_the_sequence() -> None:
    cache = PagedKvCache(16, CFG)
    cache.try_admit("a", seq(0, 9), 0)
    cache.release("a")
    cache.try_admit("b", seq(50, 4), 4)
    emitted = cache.drain_events()
    snap = cache.snapshot()
    assert isinstance(snap[0].data, AllBlocksCleared)
    assert [e.sequence for e in emitted + snap] == list(range(len(emitted) + len(snap)))
    assert (
        replay(snap)
        == replay(emitted)
        == {*block_hashes(seq(0, 9), CFG), *block_hashes(seq(50, 4), CFG)}
    )
    # Parents come before children and carry their parent hash.
    chain = block_hashes(seq(0, 9), CFG)
    parents = {
        b.block_hash: e.data.parent_hash
        for e in snap
        if isinstance(e.data, BlocksStored)
        for b in e.data.blocks
    }
    assert parents[chain[0]] is None
    assert parents[chain[1]] == chain[0]
    cache.append_token("b", 1)
    cache.append_token("b", 2)
    cache.append_token("b", 3)
    cache.append_token("b", 4)
    after = cache.drain_events()
    assert after[0].sequence == snap[-1].sequence + 1


ops = st.lists(
    st.tuples(
        st.sampled_from(["admit", "append", "release"]),
        st.integers(0, 5),  # sequence slot
        st.lists(
            st.integers(0, 2), min_size=1, max_size=14
        ),  # small alphabet: many shared prefixes
        st.integers(0, 6),  # max_new_tokens
    ),
    max_size=60,
)


@settings(max_examples=200, deadline=None)
@given(ops)
def test_accounting_and_event_stream_stay_consistent(
    program: list[tuple[str, int, list[int], int]],
) -> None:
    cache = PagedKvCache(8, CFG)
    running: dict[str, int] = {}  # id -> tokens it may still append
    held: set[int] = set()
    for op, slot, prompt, max_new in program:
        sid = f"s{slot}"
        if op == "admit" and sid not in running:
            if cache.try_admit(sid, prompt, max_new) is not None:
                running[sid] = max_new
        elif op == "append" and running.get(sid):
            cache.append_token(sid, prompt[0])
            running[sid] -= 1
        elif op == "release" and sid in running:
            cache.release(sid)
            del running[sid]
        replay(cache.drain_events(), held)
        assert 0 <= cache.num_used <= cache.num_blocks
        assert cache.num_evictable <= cache.num_free
        assert cache.num_reserved <= cache.num_free
        assert cache.num_cached == len(held)
        assert all(cache.is_cached(h) for h in held)
    assert replay(cache.snapshot()) == held
    for sid in list(running):
        cache.release(sid)
    assert (cache.num_used, cache.num_reserved, cache.num_free) == (0, 0, cache.num_blocks)
