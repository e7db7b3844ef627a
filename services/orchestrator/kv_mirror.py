"""A copy of kv_registry's exact index in the orchestrator's memory, so that routing for replicas
that publish KV events (exact mode) needs no lookup round trip.

kv_registry streams its exact index with WatchExact: a snapshot, then every change in the order
it applied them (`prefix.RegistryPrefixIndex` runs the watch and converts the messages). Applying
the changes in order keeps this copy equal to the registry's exact index, a stream's delay
behind: the same staleness a lookup answer has by the time its lease reaches the engine.

The copy answers a lookup only for a decision it can answer in full: the watch is in sync and
every replica the decision may choose is exact here. A replica that is not exact (approximate
mode, or not in sync with the registry yet) may hold predicted entries, which only the registry
has: such a lookup goes to the registry, as without a copy. For those replicas the two answers
are the same: the registry's lookup reads its exact index for them (a replica has entries in
exactly one of its indexes).

Lookups: a replica's match is the leading blocks of the prompt it holds. Engines keep a
replica's blocks along any prompt a run: a block is computed after its parent and evicted only
after its extensions (TensorRT-LLM's block manager evicts leaf blocks; the emulator releases a
sequence's blocks leaf first). Where every replica's listed blocks along the prompt are a run,
the holders of block i among those of the first block are a subset of those of block i - 1, and
a bisection over the prompt's depths finds where each replica's match ends with O(k log n) index
reads (k distinct match lengths, n blocks) instead of one per block (a 32k-token prompt is 1024
blocks; the walk was a sixth of the orchestrator's CPU per decision in bench-admit): the answer
is the registry's. The registry's entry bound can drop a block from within a run while the
engine still holds it (it drops a replica's earliest-logged blocks, and a block stored again
after the bound dropped it is logged last): the registry's walk stops at the dropped block,
the copy credits the replica through the blocks still listed. With any gap in a replica's
listed blocks, the copy credits at least the leading run and ends on a listed block (which one
depends on where the bisection reads, so on the other replicas' matches); the engine's own
blocks being a run, that is no more than the engine holds, as far as the listing is current.

Storage: block hash -> bitmask of the replicas holding it (a bit per replica, reused after the
replica is gone), and per replica the set of hashes it holds, so clearing one costs its own
blocks. The copy holds at most `max_blocks` block hashes; a snapshot or change beyond that raises
`MirrorFull` and the owner drops the copy (lookups go to the registry) and tries again later,
twice as late each time it outgrows the bound again.

Invariants:
- bit b is set in `index[h]` exactly when the replica in slot b holds h (`held[slot]` has h);
- every key of `index` has a non-zero mask.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence


class MirrorFull(Exception):
    """The copy would exceed its bound."""


class ExactMirror:
    def __init__(self, max_blocks: int) -> None:
        self._max_blocks = max_blocks
        self.reset()

    # -- the watch ------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget everything (a new watch starts from a snapshot)."""
        self._index: dict[int, int] = {}
        self._slots: dict[str, int] = {}  # exact replica -> its bit
        self._ids: list[str | None] = []  # bit -> replica (None: free)
        self._held: list[set[int]] = []  # bit -> hashes held
        self._exact: frozenset[str] = frozenset()
        self.synced = False

    def stored(self, replica_id: str, hashes: Iterable[int]) -> None:
        bit, held = self._slot(replica_id)
        idx = self._index
        get = idx.get
        for h in hashes:
            if h not in held:
                held.add(h)
                idx[h] = get(h, 0) | bit
        if len(idx) > self._max_blocks:
            raise MirrorFull(f"{len(idx)} blocks > {self._max_blocks}")

    def removed(self, replica_id: str, hashes: Iterable[int]) -> None:
        bit, held = self._slot(replica_id)
        for h in hashes:
            if h in held:
                held.discard(h)
                self._clear(h, bit)

    def cleared(self, replica_id: str) -> None:
        bit, held = self._slot(replica_id)
        for h in held:
            self._clear(h, bit)
        held.clear()

    def gone(self, replica_id: str) -> None:
        slot = self._slots.pop(replica_id, None)
        if slot is None:
            return
        bit = 1 << slot
        for h in self._held[slot]:
            self._clear(h, bit)
        self._held[slot] = set()
        self._ids[slot] = None
        self._exact = frozenset(self._slots)

    # -- reading --------------------------------------------------------------------------------
    @property
    def exact(self) -> frozenset[str]:
        """The replicas this copy holds the whole truth for."""
        return self._exact

    @property
    def blocks(self) -> int:
        return len(self._index)

    def covers(self, replica_ids: Collection[str]) -> bool:
        """In sync, and every one of `replica_ids` is exact here."""
        if not self.synced:
            return False
        return self._exact.issuperset(replica_ids)

    def lookup(self, hashes: Sequence[int]) -> dict[str, int]:
        """Per replica holding the first block: how many leading blocks of `hashes` it holds.

        By bisection over the prompt's depths ("Lookups" above): a walk's answer where each
        replica's listed blocks along the prompt are a run."""
        if not hashes:
            return {}
        get = self._index.get
        mask = get(hashes[0], 0)
        out: dict[str, int] = {}
        if not mask:
            return out
        # Ranges (lo, holders at lo, hi, holders at hi), lo < hi, the holders at hi a subset of
        # those at lo; depth len(hashes) holds nothing. Where holdings are runs, a replica's bit
        # leaves the holders once, in a range of length one: its match ends there.
        stack = [(0, mask, len(hashes), 0)]
        while stack:
            lo, at_lo, hi, at_hi = stack.pop()
            if hi - lo == 1:
                self._name(at_lo ^ at_hi, hi, out)
                continue
            mid = (lo + hi) >> 1
            at_mid = get(hashes[mid], 0) & at_lo
            if at_mid != at_lo:
                stack.append((lo, at_lo, mid, at_mid))
            at_hi &= at_mid
            if at_mid != at_hi:
                stack.append((mid, at_mid, hi, at_hi))
        return out

    # -- bookkeeping ----------------------------------------------------------------------------
    def _name(self, mask: int, matched: int, out: dict[str, int]) -> None:
        ids = self._ids
        while mask:
            low = mask & -mask
            rid = ids[low.bit_length() - 1]
            if rid is not None:
                out[rid] = matched
            mask ^= low

    def _slot(self, replica_id: str) -> tuple[int, set[int]]:
        slot = self._slots.get(replica_id)
        if slot is None:
            try:
                slot = self._ids.index(None)
                self._ids[slot] = replica_id
            except ValueError:
                slot = len(self._ids)
                self._ids.append(replica_id)
                self._held.append(set())
            self._slots[replica_id] = slot
            self._exact = frozenset(self._slots)
        return 1 << slot, self._held[slot]

    def _clear(self, h: int, bit: int) -> None:
        mask = self._index.get(h, 0) & ~bit
        if mask:
            self._index[h] = mask
        else:
            self._index.pop(h, None)
