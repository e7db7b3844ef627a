"""The exact index: what replicas that publish KV events hold, from their event streams.

Per-replica ordered event streams (sequence numbers per epoch) are folded into the index; a gap
puts the replica in resync (its later events are ignored until a `cleared` event, the head of
an engine snapshot, arrives numbered at or after the next sequence expected), so the index never holds a state the engine never had. Lookups
keep answering from the last good state meanwhile. A new epoch (engine restart) discards what
the previous epoch published (an epoch that started before the kept one is refused before it gets
here: `KvRegistry.ingest`).

A replica is exact from the first event applied in sequence until its epoch changes; the
registry moves it out of the predicted index when it becomes exact.

Storage, on the shared `BitmaskIndex`: `log`, an append-only list of `array('Q')` segments,
holds each hash the replica stored, once (the logged bit says it is in the log). 8 bytes per
(block, replica) and no Python object, since the hash int is the index's own key object.
`removed` clears the held bit only; segments are compacted incrementally when more than half
the log is stale.

Invariants, for every replica r of this index:
- held(r) is set in `index[h]` exactly when r holds h; logged(r) is set exactly when h is in
  r's log, and held implies logged; each hash is in the log at most once;
- a replica that is not exact holds nothing (`count == 0`, empty log).
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable, Sequence
from itertools import chain
from typing import NamedTuple

from services.kv_registry.bitmask import BitmaskIndex, Slot, StoreBacked
from services.kv_registry.contracts import (
    ChangeKind,
    Cleared,
    Event,
    ExactChange,
    IngestResult,
    Ranked,
    Removed,
    Source,
    Stored,
)
from services.kv_registry.metrics import RegistryMetrics, ReplicaMetrics

_SEGMENT = 32_768  # log segment length (entries); a compaction step handles one segment
_COMPACT_SLACK = 4_096  # stale log entries tolerated beyond the live count


class ExactReplica(Slot):
    __slots__ = ("compact_at", "epoch", "exact", "log", "log_len", "next_sequence", "resyncing")
    source = Source.EXACT

    def __init__(self, replica_id: str, slot: int, metrics: ReplicaMetrics) -> None:
        super().__init__(replica_id, slot, metrics)
        self.exact = False
        self.epoch: str | None = None
        self.next_sequence = 0
        self.resyncing = False
        self.log: list[array[int]] = []  # stored hashes, oldest first
        self.log_len = 0
        self.compact_at = -1  # segment under incremental compaction, -1 when none


class Applied(NamedTuple):
    """What one `ingest` call did."""

    result: IngestResult
    work: int  # entries touched, for amortized housekeeping
    mode_changed: bool  # the replica became exact, or stopped being exact


class ExactIndex(StoreBacked[ExactReplica]):
    """Implements `contracts.PrefixIndex` (the registry validates requests before calling)."""

    def __init__(self, metrics: RegistryMetrics) -> None:
        self.store: BitmaskIndex[ExactReplica] = BitmaskIndex()
        self.replicas: dict[str, ExactReplica] = {}
        self._compacting: dict[str, ExactReplica] = {}
        self._metrics = metrics
        # Changes to what exact replicas hold, in order, while someone watches (None: nobody);
        # the registry hands them on and empties the list after each call.
        self.changes: list[ExactChange] | None = None

    def epoch_of(self, replica_id: str) -> str | None:
        """The engine lifetime the replica's account is of (None: none kept)."""
        rep = self.replicas.get(replica_id)
        return None if rep is None else rep.epoch

    def is_exact(self, replica_id: str) -> bool:
        rep = self.replicas.get(replica_id)
        return rep is not None and rep.exact

    def exact_replicas(self) -> list[str]:
        return [rid for rid, rep in self.replicas.items() if rep.exact]

    def snapshot(self, replica_id: str) -> list[ExactChange]:
        """The replica's entry as changes that rebuild it from nothing: CLEARED, then STORED
        with every block it holds (first stored first); none when it is not exact."""
        rep = self.replicas.get(replica_id)
        if rep is None or not rep.exact:
            return []
        get = self.store.index.get
        held = rep.held
        out = [ExactChange(rep.id, ChangeKind.CLEARED)]
        blocks = [h for seg in rep.log for h in seg if get(h, 0) & held]
        if blocks:
            out.append(ExactChange(rep.id, ChangeKind.STORED, blocks))
        return out

    # -- ingest -----------------------------------------------------------------------------
    def ingest(
        self,
        replica_id: str,
        epoch: str,
        events: Sequence[Event],
        next_sequence: int | None = None,
    ) -> Applied:
        """Apply one batch of the replica's events in order. `next_sequence` (a heartbeat, no
        events): the engine's next sequence; one this index does not expect is a gap."""
        rep = self.replicas.get(replica_id) or self._add(replica_id)
        was_exact = rep.exact
        changes = self.changes
        if rep.epoch != epoch:
            if rep.exact:  # the engine restarted: what its previous lifetime published is gone
                self._retire(rep, drop=False)
                rep.exact = False
                if changes is not None:
                    changes.append(ExactChange(replica_id, ChangeKind.GONE))
            rep.epoch = epoch
            rep.next_sequence = 0
            rep.resyncing = False
        was_resyncing = resyncing = rep.resyncing
        nxt = rep.next_sequence
        stored = removed = cleared = work = 0
        # The `stored` fast path is inlined (a snapshot is one event per block): blocks new to
        # the replica's log collect in `new` and are appended (and counted) by `flush`.
        store = self.store
        idx = store.index
        get = idx.get
        held, logged, both = rep.held, rep.logged, rep.both
        new: list[int] = []
        relogged = 0

        def flush() -> int:
            nonlocal new, relogged
            added = len(new) + relogged
            if new:
                log = rep.log
                if not log or len(log[-1]) >= _SEGMENT:
                    log.append(array("Q"))
                log[-1].extend(new)
                rep.log_len += len(new)
                new = []
            relogged = 0
            rep.count += added
            store.entries += added
            return added

        for ev in events:
            seq = ev.sequence
            if resyncing or seq > nxt:
                if not isinstance(ev, Cleared) or seq < nxt:
                    # A gap: wait for a snapshot. A snapshot below the next sequence is an
                    # older one delivered late (a new one is numbered from the engine's
                    # counter, never below what this stream applied): it would roll back.
                    resyncing = True
                    continue
                resyncing = False  # a snapshot may start anywhere at or after the next
            elif seq < nxt:
                continue  # duplicate delivery
            nxt = seq + 1
            if not rep.exact:  # its slot is clean: a replica that is not exact holds nothing
                rep.exact = True
            if changes is not None:
                _note(changes, replica_id, ev)
            if isinstance(ev, Stored):
                stored += 1
                for h in ev.block_hashes:
                    mask = get(h)
                    if mask is None:
                        idx[h] = both  # one shared int object for every block it adds
                        new.append(h)
                    elif mask & held:
                        continue  # already held
                    elif mask & logged:
                        idx[h] = mask | held  # stored again while still in the log
                        relogged += 1
                    else:
                        idx[h] = mask | both
                        new.append(h)
            elif isinstance(ev, Removed):
                work += flush() + self._remove(rep, ev.block_hashes)
                removed += 1
            else:
                work += flush()
                self._retire(rep, drop=False)
                held, logged, both = rep.held, rep.logged, rep.both
                cleared += 1
        work += flush()
        if next_sequence is not None and not events and next_sequence != nxt:
            resyncing = True  # events this index never saw (it restarted, or lost them)
        rep.next_sequence = nxt
        rep.resyncing = resyncing
        metrics = rep.metrics
        metrics.events(stored, removed, cleared)
        if resyncing and not was_resyncing:
            metrics.resync()
        if rep.exact or was_exact:  # otherwise the predicted index owns the block count
            metrics.blocks(rep.count)
        return Applied(IngestResult(nxt, resyncing), work + len(events), rep.exact != was_exact)

    def _remove(self, rep: ExactReplica, hashes: Iterable[int]) -> int:
        idx = self.store.index
        get = idx.get
        held = rep.held
        n = 0
        for h in hashes:
            mask = get(h)
            if mask is not None and mask & held:
                idx[h] = mask ^ held  # still logged: compaction removes the entry
                n += 1
        rep.count -= n
        self.store.entries -= n
        if rep.compact_at < 0 and rep.log_len > 2 * rep.count + _COMPACT_SLACK:
            rep.compact_at = 0
            self._compacting[rep.id] = rep
        return n

    # -- PrefixIndex ------------------------------------------------------------------------
    def find_matches(self, hashes: Sequence[int], ranked: list[Ranked]) -> None:
        store = self.store
        if not store.live:
            return
        by_held = store.by_held
        for bit, k in store.ends(hashes):
            rep = by_held[bit]
            ranked.append((-k, rep.id, rep.match(k)))

    def matched(self, replica_id: str, hashes: Sequence[int]) -> int:
        rep = self.replicas.get(replica_id)
        return 0 if rep is None else self.store.held_prefix(rep.held, hashes)

    def block_count(self, replica_id: str) -> int:
        rep = self.replicas.get(replica_id)
        return 0 if rep is None else rep.count

    def evict(self, replica_id: str, n: int) -> int:
        """Drop the replica's `n` first-stored blocks."""
        rep = self.replicas.get(replica_id)
        if rep is None:
            return 0
        n = min(n, rep.count)
        if n <= 0:
            return 0
        idx = self.store.index
        get = idx.get
        held = rep.held
        clear = ~rep.both
        evicted = 0
        gone: list[int] | None = None
        if self.changes is not None:
            gone = []
            self.changes.append(ExactChange(replica_id, ChangeKind.REMOVED, gone))
        while evicted < n and rep.log:
            seg = rep.log[0]
            k = 0
            for h in seg:
                k += 1
                mask = get(h, 0)
                if mask & held:
                    evicted += 1
                    if gone is not None:
                        gone.append(h)
                mask &= clear
                if mask:
                    idx[h] = mask
                else:
                    idx.pop(h, None)
                if evicted == n:
                    break
            del seg[:k]
            rep.log_len -= k
            if not seg:
                del rep.log[0]
                if rep.compact_at > 0:
                    rep.compact_at -= 1
        rep.count -= evicted
        self.store.entries -= evicted
        rep.metrics.blocks(rep.count)
        return evicted

    def drop(self, replica_id: str) -> bool:
        rep = self.replicas.pop(replica_id, None)
        if rep is None:
            return False
        if rep.exact and self.changes is not None:
            self.changes.append(ExactChange(replica_id, ChangeKind.GONE))
        self._retire(rep, drop=True)
        return True

    # -- upkeep -----------------------------------------------------------------------------
    @property
    def compacting(self) -> bool:
        return bool(self._compacting)

    def compact(self, budget: int) -> int:
        """Drop stale (removed) entries from logs, a segment at a time, for about `budget`
        entries; returns the entries processed."""
        done = 0
        idx = self.store.index
        get = idx.get
        while self._compacting and done < budget:
            rep = next(iter(self._compacting.values()))
            if rep.compact_at >= len(rep.log):
                rep.compact_at = -1
                del self._compacting[rep.id]
                continue
            seg = rep.log[rep.compact_at]
            held = rep.held
            unlog = ~rep.logged
            keep: list[int] = []
            for h in seg:
                mask = get(h, 0)
                if mask & held:
                    keep.append(h)
                else:
                    mask &= unlog
                    if mask:
                        idx[h] = mask
                    else:
                        idx.pop(h, None)
            done += len(seg)
            rep.log_len -= len(seg) - len(keep)
            at = rep.compact_at
            if at > 0 and len(rep.log[at - 1]) + len(keep) <= _SEGMENT:
                rep.log[at - 1].extend(keep)  # merge into the previous (compacted) segment
                del rep.log[at]
            elif keep:
                rep.log[at] = array("Q", keep)
                rep.compact_at += 1
            else:
                del rep.log[at]
        return done

    # -- bookkeeping ------------------------------------------------------------------------
    def _add(self, replica_id: str) -> ExactReplica:
        store = self.store
        rep = ExactReplica(replica_id, store.alloc_slot(), self._metrics.replica(replica_id))
        self.replicas[replica_id] = rep
        store.attach(rep)
        return rep

    def _retire(self, rep: ExactReplica, *, drop: bool) -> None:
        size = rep.log_len
        source = chain.from_iterable(rep.log)
        rep.log = []
        rep.log_len = 0
        if rep.compact_at >= 0:
            rep.compact_at = -1
            self._compacting.pop(rep.id, None)
        self.store.retire(rep, source, size, drop=drop)


def _note(changes: list[ExactChange], replica_id: str, ev: Event) -> None:
    """Append the change an applied event makes; consecutive `stored` of one replica coalesce
    (an engine snapshot is one event per block)."""
    if isinstance(ev, Stored):
        last = changes[-1] if changes else None
        if last is not None and last.kind is ChangeKind.STORED and last.replica_id == replica_id:
            last.block_hashes.extend(ev.block_hashes)
        else:
            changes.append(ExactChange(replica_id, ChangeKind.STORED, list(ev.block_hashes)))
    elif isinstance(ev, Removed):
        changes.append(ExactChange(replica_id, ChangeKind.REMOVED, list(ev.block_hashes)))
    else:
        changes.append(ExactChange(replica_id, ChangeKind.CLEARED))
