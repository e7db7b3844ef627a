"""In-flight prefixes: a replica's live leases' prompts count as matches before the registry
hears of them, and stop counting when the lease ends or the replica is dropped."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.orchestrator.feedback import PrefixFeedback
from services.orchestrator.inflight import (
    EXACT_DEPTHS,
    InflightPrefixes,
    first_entry,
    indexed_depths,
)
from services.orchestrator.prefix import PrefixMatches
from tests.helpers import shared_head
from tests.orchestrator.conftest import FixedPrefix

A = (11, 12, 13, 14)  # a prompt's chained block hashes
B = (11, 12, 23)  # shares A's first two blocks
C = (31, 32)  # shares nothing


@pytest.mark.parametrize(
    ("live", "prompt", "expected"),
    [
        ([], A, {}),
        ([("l1", "r1", A)], A, {"r1": 4}),
        ([("l1", "r1", A)], B, {"r1": 2}),
        ([("l1", "r1", A)], C, {}),
        ([("l1", "r1", A), ("l2", "r2", B)], A, {"r1": 4, "r2": 2}),
        ([("l1", "r1", B), ("l2", "r1", A)], A, {"r1": 4}),
        ([("l1", "r1", A[:1])], A, {"r1": 1}),
    ],
)
def test_matched_is_the_longest_leading_run_per_replica(
    live: list[tuple[str, str, tuple[int, ...]]],
    prompt: tuple[int, ...],
    expected: dict[str, int],
) -> None:
    idx = InflightPrefixes()
    for lease_id, replica_id, hashes in live:
        idx.add(lease_id, replica_id, hashes)
    assert idx.matched(prompt) == expected


def test_a_lease_counts_until_it_ends_and_shared_blocks_until_the_last() -> None:
    idx = InflightPrefixes()
    idx.add("l1", "r1", A)
    idx.add("l2", "r1", B)
    idx.remove("l1")
    assert idx.matched(A) == {"r1": 2}  # B still holds the shared blocks
    idx.remove("l2")
    idx.remove("l2")  # a second end is a no-op
    assert idx.matched(A) == {}
    assert len(idx) == 0
    assert idx._holders == {}  # nothing left behind


def test_a_dropped_replica_counts_no_more() -> None:
    idx = InflightPrefixes()
    idx.add("l1", "r1", A)
    idx.add("l2", "r2", A)
    idx.drop_replica("r1")
    assert idx.matched(A) == {"r2": 4}
    idx.remove("l1")  # its lease still ends later
    assert idx.matched(A) == {"r2": 4}


def test_merge_raises_matches_and_never_lowers_them() -> None:
    idx = InflightPrefixes()
    idx.add("l1", "r1", B)
    idx.add("l2", "r2", A)
    registry = PrefixMatches(4, {"r1": 3, "r3": 1}, A)
    merged = idx.merge(registry)
    assert merged.matched_blocks == {"r1": 3, "r2": 4, "r3": 1}
    # What the registry knew stays apart (the hit metric counts that only).
    assert [merged.registered_blocks(r) for r in ("r1", "r2", "r3")] == [3, 0, 1]
    assert registry.registered_blocks("r1") == 3
    assert (merged.prompt_blocks, merged.hashes) == (4, A)
    assert idx.merge(PrefixMatches(2, {}, C)) == PrefixMatches(2, {}, C)


async def test_feedback_lookups_see_the_prompts_routed_and_not_yet_ended() -> None:
    feedback = PrefixFeedback(FixedPrefix(PrefixMatches(len(A), {}, A)))  # no KV event yet
    first = await feedback.lookup([0] * 8)
    assert first.matched_blocks == {}
    feedback.routed("l1", "r1", first, 8)
    assert (await feedback.lookup([0] * 8)).matched_blocks == {"r1": 4}
    feedback.completed("l1", "r1", reused_blocks=None)
    assert (await feedback.lookup([0] * 8)).matched_blocks == {}
    feedback.routed("l2", "r2", first, 8)
    feedback.drop_replica("r2")
    assert (await feedback.lookup([0] * 8)).matched_blocks == {}


def chain(n: int, base: int) -> tuple[int, ...]:
    """n chained block hashes; two chains with the same base share every block."""
    return tuple(base * 10_000 + i for i in range(n))


def diverging(shared: int, n: int, tail: int = 2) -> tuple[int, ...]:
    """A prompt of n blocks sharing its first `shared` blocks with chain(..., 1), then its own
    (prompts with another `tail` share nothing after that)."""
    return chain(shared, 1) + tuple(tail * 10_000 + i for i in range(shared, n))


@given(
    lease_blocks=st.integers(1, 2048),
    prompt_blocks=st.integers(1, 2048),
    shared=st.integers(0, 2048),
)
def test_a_long_match_is_never_over_claimed_and_under_claimed_by_under_a_32nd(
    lease_blocks: int, prompt_blocks: int, shared: int
) -> None:
    shared = min(shared, lease_blocks, prompt_blocks)
    idx = InflightPrefixes()
    idx.add("l1", "r1", chain(lease_blocks, 1))
    got = idx.matched(diverging(shared, prompt_blocks)).get("r1", 0)
    assert got <= shared
    assert shared - got <= shared // EXACT_DEPTHS
    if shared < 2 * EXACT_DEPTHS or shared == lease_blocks == prompt_blocks:
        assert got == shared  # exact below 64 blocks, and for the same prompt again


def test_indexed_depths_grow_with_the_log_of_long_prompts() -> None:
    assert len(indexed_depths(63)) == 63
    assert len(indexed_depths(1024)) == 192  # a 32k-token prompt at 32 tokens per block
    assert len(indexed_depths(4096)) == 256
    assert indexed_depths(100)[-1] == 99  # the last block always


def test_ending_a_long_lease_leaves_nothing_behind() -> None:
    idx = InflightPrefixes()
    idx.add("l1", "r1", chain(1000, 1))
    idx.add("l2", "r2", chain(700, 1))
    assert idx.matched(chain(1000, 1)) == {"r1": 1000, "r2": 688}  # 700 rounded to 16s
    idx.remove("l1")
    idx.remove("l2")
    assert idx._holders == {}


def test_a_lease_indexes_only_from_the_last_block_listed_for_its_replica() -> None:
    idx = InflightPrefixes()
    idx.add("l1", "r1", chain(1000, 1), listed=990)
    assert sum(len(by) for by in idx._holders.values()) == len(
        [i for i in indexed_depths(1000) if i >= first_entry(990)]
    )
    assert first_entry(990) == 975  # depth 976: the deepest multiple of 16 up to 990
    listed = PrefixMatches(1000, {"r1": 990}, chain(1000, 1))
    assert idx.merge(listed).matched_blocks == {"r1": 1000}
    # Another replica listing more of the prompt does not hide r3's entries below that.
    idx.add("l3", "r3", (*chain(40, 1), 7), listed=10)
    listed = PrefixMatches(1000, {"r1": 990, "r2": 60, "r3": 10}, chain(1000, 1))
    assert idx.merge(listed).matched_blocks == {"r1": 1000, "r2": 60, "r3": 40}
    idx.remove("l3")
    idx.add("l2", "r2", chain(1000, 1), listed=1000)  # all of it listed: from its first entry
    assert idx.matched(chain(1000, 1)) == {"r1": 1000, "r2": 1000}
    idx.remove("l1")
    idx.remove("l2")
    assert idx._holders == {}
    assert idx._starts == []


def test_a_lease_counts_beyond_its_listed_blocks_whatever_the_registry_answers_since() -> None:
    idx = InflightPrefixes()
    idx.add("l1", "r1", chain(100, 1), listed=80)
    prompt = chain(120, 1)
    # A lookup that failed; the listed blocks evicted before the lease's prefill.
    for registry in ({}, {"r1": 30}):
        assert idx.merge(PrefixMatches(120, registry, prompt)).matched_blocks == {"r1": 100}


@st.composite
def live_leases(draw: st.DrawFn) -> tuple[list[tuple[str, tuple[int, ...], int]], tuple[int, ...]]:
    """Live leases (replica, prompt, blocks listed when it was looked up), prompts of one family
    each with its own tail, and a prompt of the family."""
    prompt_len = draw(st.integers(1, 300))
    prompt = diverging(draw(st.integers(0, prompt_len)), prompt_len)
    leases = []
    for n in range(draw(st.integers(1, 6))):
        length = draw(st.integers(1, 300))
        family = draw(st.integers(0, length))
        hashes = diverging(family, length, tail=3 + n)
        leases.append(
            (draw(st.sampled_from(["r1", "r2", "r3"])), hashes, draw(st.integers(0, length)))
        )
    return leases, prompt


def whole_prompt_match(replica: str, hashes: tuple[int, ...], prompt: tuple[int, ...]) -> int:
    """What one lease's entries over its whole prompt credit its replica for `prompt`."""
    whole = InflightPrefixes()
    whole.add("l", replica, hashes)
    return whole.matched(prompt).get(replica, 0)


@given(live_leases())
def test_a_lease_is_found_as_whole_prompt_entries_find_it_where_the_prompt_reaches_its_first_entry(
    case: tuple[list[tuple[str, tuple[int, ...], int]], tuple[int, ...]],
) -> None:
    leases, prompt = case
    idx = InflightPrefixes()
    expected: dict[str, int] = {}
    for n, (replica, hashes, listed) in enumerate(leases):
        idx.add(f"l{n}", replica, hashes, listed)
        if shared_head(hashes, prompt) > first_entry(min(listed, len(hashes))):
            got = whole_prompt_match(replica, hashes, prompt)
            expected[replica] = max(expected.get(replica, 0), got)
    assert idx.matched(prompt) == expected


@given(live_leases(), st.lists(st.integers(0, 20), min_size=3, max_size=3))
def test_with_the_listed_blocks_listed_the_registry_and_the_leases_credit_what_whole_prompts_do(
    case: tuple[list[tuple[str, tuple[int, ...], int]], tuple[int, ...]], extra: list[int]
) -> None:
    """Where each replica lists at least what its leases' prompts share with the prompt up to
    where their listing ended (it may hold more of the prompt)."""
    leases, prompt = case
    floor: dict[str, int] = {}
    beyond, whole = InflightPrefixes(), InflightPrefixes()
    for n, (replica, hashes, listed) in enumerate(leases):
        beyond.add(f"l{n}", replica, hashes, listed)
        whole.add(f"l{n}", replica, hashes)
        floor[replica] = max(floor.get(replica, 0), min(listed, shared_head(hashes, prompt)))
    listings = {r: min(len(prompt), f + extra[k]) for k, (r, f) in enumerate(sorted(floor.items()))}
    registry = PrefixMatches(len(prompt), {r: n for r, n in listings.items() if n}, prompt)
    assert beyond.merge(registry).matched_blocks == whole.merge(registry).matched_blocks


def test_a_run_passing_another_lease_first_entry_and_a_later_one_after_a_gap() -> None:
    idx = InflightPrefixes()
    idx.add("x", "r1", chain(50, 1), listed=10)  # first entry 9
    idx.add("z", "r3", (*chain(20, 1), *range(90_000, 90_040)), listed=30)  # 29: not shared
    idx.add("w", "r4", (*chain(71, 1), *range(80_000, 80_030)), listed=30)  # 29: outlasts x
    idx.add("y", "r2", chain(120, 1), listed=80)  # 79, after a gap no lease holds
    assert idx.matched(diverging(150, 150)) == {"r1": 50, "r4": 70, "r2": 120}


# (what, lease id (repeats are ignored), replica, prompt blocks, of which from the family,
# blocks listed): "add" uses them all, "remove" the lease id, "drop" the replica.
LEASE_STEPS = st.lists(
    st.tuples(
        st.sampled_from(["add", "add", "remove", "drop"]),
        st.integers(0, 7),
        st.sampled_from(["r1", "r2", "r3"]),
        st.integers(1, 200),
        st.integers(0, 200),
        st.integers(0, 210),
    ),
    max_size=16,
)


@given(LEASE_STEPS, st.integers(1, 200), st.integers(0, 200))
def test_after_any_adds_ends_and_drops_the_index_answers_as_its_live_leases_do(
    steps: list[tuple[str, int, str, int, int, int]], prompt_blocks: int, shared_blocks: int
) -> None:
    """Against a brute force over the live leases (each one's entries from its first entry on),
    after every step; nothing is left once every lease ended."""
    idx = InflightPrefixes()
    live: dict[str, tuple[str, tuple[int, ...], int]] = {}
    prompt = diverging(min(shared_blocks, prompt_blocks), prompt_blocks)
    for what, n, replica, length, family, listed in steps:
        if what == "add":
            hashes = diverging(min(family, length), length, tail=10 + n)
            idx.add(f"l{n}", replica, hashes, listed)
            live.setdefault(f"l{n}", (replica, hashes, first_entry(min(listed, length))))
        elif what == "remove":
            idx.remove(f"l{n}")
            live.pop(f"l{n}", None)
        else:
            idx.drop_replica(replica)
            live = {k: v for k, v in live.items() if v[0] != replica}
        expected: dict[str, int] = {}
        for replica, hashes, start in live.values():
            if shared_head(hashes, prompt) > start:
                got = whole_prompt_match(replica, hashes, prompt)
                expected[replica] = max(expected.get(replica, 0), got)
        assert idx.matched(prompt) == expected
        assert len(idx) == len(live)
    for lease_id in list(live):
        idx.remove(lease_id)
    assert idx._holders == {}
    assert idx._starts == []
