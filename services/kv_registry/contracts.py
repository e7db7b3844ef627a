"""What crosses module boundaries inside kv_registry: KV events, results, and `PrefixIndex`, the
one interface of the exact (event-driven) and predicted (approximate) indexes.

The registry (`core.KvRegistry`) owns one index of each kind and keeps these invariants across
them:
- a replica has entries in at most one index: the exact index once its event stream is in sync
  (`ExactIndex.is_exact`), the predicted index otherwise;
- the indexes' `entries + garbage_entries` sum to at most `max_entries` after every call.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol


class Source(enum.StrEnum):
    """Where a replica's entries come from."""

    EXACT = "exact"
    PREDICTED = "predicted"


@dataclass(frozen=True, slots=True)
class Stored:
    sequence: int
    block_hashes: tuple[int, ...]
    parent_hash: int | None = None


@dataclass(frozen=True, slots=True)
class Removed:
    sequence: int
    block_hashes: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Cleared:
    sequence: int


Event = Stored | Removed | Cleared


class ChangeKind(enum.Enum):
    """How one replica's entry in the exact index changed (what `WatchExact` streams)."""

    STORED = "stored"  # exact, and now also holds the hashes
    REMOVED = "removed"  # exact, and no longer holds the hashes
    CLEARED = "cleared"  # exact, and holds nothing
    GONE = "gone"  # no longer exact (dropped, or a new engine lifetime not yet in sync)


@dataclass(slots=True)
class ExactChange:
    """One change to the exact index. Applying the changes in order to a copy of the index
    (holding a hash again, or dropping one not held, is no change) keeps the copy equal to it."""

    replica_id: str
    kind: ChangeKind
    block_hashes: list[int] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class IngestResult:
    next_sequence: int
    resync_required: bool


@dataclass(frozen=True, slots=True)
class ReplicaMatch:
    replica_id: str
    matched_blocks: int
    source: Source = Source.EXACT


@dataclass(frozen=True, slots=True)
class LookupResult:
    prompt_blocks: int
    matches: tuple[ReplicaMatch, ...]  # most matched first, then by replica id


@dataclass(frozen=True, slots=True)
class RoutingResult:
    prompt_blocks: int
    # Leading blocks the registry believed the replica held before this call.
    predicted_blocks: int
    source: Source
    # Predicted entries written or refreshed (0 for an exact replica).
    recorded_blocks: int


@dataclass(frozen=True, slots=True)
class ReuseResult:
    reusable_blocks: int
    predicted_blocks: int
    reported_reused_blocks: int
    source: Source
    predicted_capacity: int  # after the correction; 0 for an exact replica
    dropped_blocks: int


# A lookup candidate: (-matched blocks, replica id, match). Sorting a list of them orders the
# matches as `LookupResult.matches` does.
Ranked = tuple[int, str, ReplicaMatch]


class PrefixIndex(Protocol):
    """An index of which replica holds which block, queried by prompt prefix.

    Replicas are keyed by id; an id the index does not know holds nothing. Entries are
    (block, replica) pairs. Dropping or clearing a replica retires its entries at once (lookups
    stop seeing them) and leaves them as garbage that `sweep` removes in bounded steps.
    """

    def find_matches(self, hashes: Sequence[int], ranked: list[Ranked]) -> None:
        """Append one `Ranked` per replica that holds at least the first of `hashes`."""
        ...

    def matched(self, replica_id: str, hashes: Sequence[int]) -> int:
        """Leading blocks of `hashes` the replica holds."""
        ...

    def block_count(self, replica_id: str) -> int: ...

    def evict(self, replica_id: str, n: int) -> int:
        """Drop the replica's `n` oldest entries (fewer if it holds fewer); returns how many."""
        ...

    def drop(self, replica_id: str) -> bool:
        """Forget the replica; False when unknown."""
        ...

    def sweep(self, budget: int) -> int:
        """Process up to `budget` garbage entries; returns how many (< budget: none left)."""
        ...

    @property
    def has_garbage(self) -> bool: ...

    @property
    def entries(self) -> int:
        """Live (block, replica) pairs."""
        ...

    @property
    def garbage_entries(self) -> int:
        """Retired pairs not swept yet."""
        ...

    @property
    def unique_blocks(self) -> int:
        """Block hashes with an entry (live, garbage, or exact-log only) in this index."""
        ...
