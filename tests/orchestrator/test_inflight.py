"""In-flight prefixes: a replica's live leases' prompts count as matches before the registry
hears of them, and stop counting when the lease ends or the replica is dropped."""

from __future__ import annotations

import pytest

from services.orchestrator.feedback import PrefixFeedback
from services.orchestrator.inflight import InflightPrefixes
from services.orchestrator.prefix import PrefixMatches
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
