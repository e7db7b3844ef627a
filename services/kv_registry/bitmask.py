"""The bitmask block index both the exact and the predicted index are built on.

Data layout (what makes it fast in pure Python):
- Each replica owns a slot `s`: bit 2s ("held") and bit 2s+1 ("logged", used by the exact index)
  of an int mask.
- `index: dict[block hash, mask]`. A prefix match ANDs the masks of the prompt's blocks in order
  and stops when nothing is left: one dict probe and one int AND per block, whatever the number
  of replicas. Replicas drop out of the running mask at their first missing block.
- Clearing or dropping a replica does not walk its blocks: the replica moves to a fresh slot,
  the old slot leaves the live mask at once (matches stop seeing it) and its bits are swept in
  bounded steps (`sweep`), so a 1M-block resync never blocks lookups. Small replicas are swept
  inline.

Invariants (the owning index keeps the per-replica ones):
- `by_held` maps the held bit of every live slot to its replica; `live` is the OR of those bits.
- `entries` counts live held bits; `garbage_entries` the held bits of retired slots not swept
  yet. A retired slot is reused only once it is swept.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator, Sequence
from itertools import islice
from typing import ClassVar, Generic, TypeVar

from services.kv_registry.contracts import ReplicaMatch, Source
from services.kv_registry.metrics import ReplicaMetrics

_INLINE_SWEEP = 4_096  # retired data this small is swept at once instead of lazily
_MATCH_CACHE = 4_096  # ReplicaMatch objects kept per replica


class Slot:
    """A replica's place in a `BitmaskIndex`: its bits and its held-block count."""

    __slots__ = ("both", "count", "held", "id", "logged", "matches", "metrics", "slot")
    source: ClassVar[Source]

    def __init__(self, replica_id: str, slot: int, metrics: ReplicaMetrics) -> None:
        self.id = replica_id
        self.metrics = metrics
        self.count = 0  # held blocks
        self.matches: dict[int, ReplicaMatch] = {}  # immutable results, reused across lookups
        self.move_to(slot)

    def move_to(self, slot: int) -> None:
        self.slot = slot
        self.held = 1 << (2 * slot)
        self.logged = self.held << 1
        self.both = self.held | self.logged

    def match(self, k: int) -> ReplicaMatch:
        found = self.matches.get(k)
        if found is None:
            if len(self.matches) > _MATCH_CACHE:
                self.matches.clear()
            found = self.matches[k] = ReplicaMatch(self.id, k, self.source)
        return found


class _Garbage:
    """A retired slot's bits, swept from the index in bounded steps."""

    __slots__ = ("held", "keep", "pending", "slot", "source")

    def __init__(self, slot: int, held: int, both: int, source: Iterator[int], pending: int):
        self.slot = slot
        self.held = held
        self.keep = ~both
        self.source = source
        self.pending = pending  # held entries not swept yet


R = TypeVar("R", bound=Slot)

_NO_ENDS: tuple[tuple[int, int], ...] = ()


class BitmaskIndex(Generic[R]):
    def __init__(self) -> None:
        self.index: dict[int, int] = {}
        self.by_held: dict[int, R] = {}  # held bit -> live replica
        self.live = 0  # OR of live replicas' held bits
        self.entries = 0
        self.garbage_entries = 0
        self._garbage: list[_Garbage] = []
        self._free_slots: list[int] = []  # heap: lowest first keeps masks short
        self._next_slot = 0

    def alloc_slot(self) -> int:
        if self._free_slots:
            return heapq.heappop(self._free_slots)
        self._next_slot += 1
        return self._next_slot - 1

    def attach(self, rep: R) -> None:
        self.by_held[rep.held] = rep
        self.live |= rep.held

    def retire(self, rep: R, source: Iterator[int], size: int, *, drop: bool) -> None:
        """Empty the replica (forget it, with `drop`): `source` yields the `size` hashes that
        may carry its bits. Large data is swept lazily from the retired slot and the replica
        continues on a fresh slot."""
        held_count = rep.count
        rep.count = 0
        self.entries -= held_count
        garbage = _Garbage(rep.slot, rep.held, rep.both, source, held_count)
        lazy = size > _INLINE_SWEEP
        if lazy:
            self.garbage_entries += held_count
            self._garbage.append(garbage)
        else:
            self._sweep(garbage, size + 1)
        if lazy or drop:
            del self.by_held[rep.held]
            self.live &= ~rep.held
            if not lazy:
                heapq.heappush(self._free_slots, rep.slot)
        if lazy and not drop:
            rep.move_to(self.alloc_slot())
            self.attach(rep)

    @property
    def has_garbage(self) -> bool:
        return bool(self._garbage)

    def sweep(self, budget: int) -> int:
        """Sweep retired slots, oldest first, for about `budget` entries."""
        done = 0
        while self._garbage and done < budget:
            g = self._garbage[0]
            before = g.pending
            step = budget - done
            n = self._sweep(g, step)
            self.garbage_entries -= before - g.pending
            done += n
            if n < step:  # source exhausted
                self._garbage.pop(0)
                self.garbage_entries -= g.pending
                heapq.heappush(self._free_slots, g.slot)
        return done

    def _sweep(self, g: _Garbage, budget: int) -> int:
        """Clear up to `budget` of a retired slot's entries; returns how many were processed
        (fewer than `budget` means the slot is clean)."""
        idx = self.index
        get = idx.get
        held = g.held
        keep = g.keep
        n = freed = 0
        for h in islice(g.source, budget):
            n += 1
            mask = get(h)
            if mask is None:
                continue
            if mask & held:
                freed += 1
            mask &= keep
            if mask:
                idx[h] = mask
            else:
                del idx[h]
        g.pending -= freed
        return n

    def ends(self, hashes: Sequence[int]) -> Sequence[tuple[int, int]]:
        """(held bit, leading blocks held) of every live replica holding `hashes[0]`."""
        get = self.index.get
        cand = get(hashes[0], 0) & self.live
        if not cand:
            return _NO_ENDS
        n = len(hashes)
        ends: list[tuple[int, int]] = []
        for i, h in enumerate(islice(hashes, 1, None), 1):
            mask = get(h, 0) & cand
            if mask != cand:
                gone = cand ^ mask
                while gone:
                    low = gone & -gone
                    ends.append((low, i))
                    gone ^= low
                cand = mask
                if not cand:
                    break
        while cand:
            low = cand & -cand
            ends.append((low, n))
            cand ^= low
        return ends

    def held_prefix(self, held: int, hashes: Sequence[int]) -> int:
        """Leading blocks of `hashes` whose mask has the `held` bit."""
        get = self.index.get
        k = 0
        for h in hashes:
            if not get(h, 0) & held:
                break
            k += 1
        return k


class StoreBacked(Generic[R]):
    """The accounting half of `contracts.PrefixIndex` (entries, garbage, sweeping), answered by
    the index's own `store`."""

    store: BitmaskIndex[R]

    def sweep(self, budget: int) -> int:
        return self.store.sweep(budget)

    @property
    def has_garbage(self) -> bool:
        return self.store.has_garbage

    @property
    def entries(self) -> int:
        return self.store.entries

    @property
    def garbage_entries(self) -> int:
        return self.store.garbage_entries

    @property
    def unique_blocks(self) -> int:
        return len(self.store.index)
