"""The exact index written the obvious way: a set of replica ids per block, an OrderedDict per
replica, `llmmesh.kvblocks.block_hashes` per lookup; no metrics.

The oracle of the differential tests (tests/kv_registry/test_exact.py) and the baseline of
`make bench-registry` (bench/registry.py). Same answers as `services.kv_registry.core.KvRegistry`
for replicas that publish events.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from llmmesh.kvblocks import BlockConfig, block_hashes
from services.kv_registry.contracts import (
    Cleared,
    Event,
    IngestResult,
    LookupResult,
    Removed,
    ReplicaMatch,
    Stored,
)
from services.kv_registry.errors import BatchTooLarge, BlockConfigMismatch


@dataclass
class _Replica:
    epoch: str
    next_sequence: int = 0
    resyncing: bool = False
    blocks: OrderedDict[int, None] = field(default_factory=OrderedDict)


class NaiveKvRegistry:
    def __init__(self, block_config: BlockConfig, *, max_entries: int, max_events_per_request: int):
        self.block_config = block_config
        self._max_entries = max_entries
        self._max_events = max_events_per_request
        self._replicas: dict[str, _Replica] = {}
        self._holders: dict[int, set[str]] = {}
        self._entries = 0

    # -- ingest ---------------------------------------------------------------------------
    def ingest(
        self, replica_id: str, epoch: str, block_config: BlockConfig, events: Sequence[Event]
    ) -> IngestResult:
        if not replica_id:
            raise BlockConfigMismatch("must be non-empty", field="replica_id")
        if block_config != self.block_config:
            raise BlockConfigMismatch(
                f"engine publishes block_size={block_config.block_size} "
                f"hash_seed={block_config.hash_seed}, registry uses "
                f"block_size={self.block_config.block_size} hash_seed={self.block_config.hash_seed}",
                field="block_size",
            )
        if len(events) > self._max_events:
            raise BatchTooLarge(f"{len(events)} events > {self._max_events}", field="events")
        rep = self._replicas.get(replica_id)
        if rep is None or rep.epoch != epoch:
            if rep is not None:
                self._clear(replica_id, rep)
            rep = _Replica(epoch=epoch)
            self._replicas[replica_id] = rep
        for ev in events:
            if rep.resyncing:
                if isinstance(ev, Cleared):
                    rep.resyncing = False
                    rep.next_sequence = ev.sequence
                else:
                    continue
            if ev.sequence < rep.next_sequence:
                continue  # duplicate delivery
            if ev.sequence > rep.next_sequence:
                rep.resyncing = True
                if isinstance(ev, Cleared):  # a snapshot may start anywhere
                    rep.resyncing = False
                    rep.next_sequence = ev.sequence
                else:
                    continue
            self._apply(replica_id, rep, ev)
            rep.next_sequence = ev.sequence + 1
        return IngestResult(rep.next_sequence, rep.resyncing)

    def _apply(self, replica_id: str, rep: _Replica, ev: Event) -> None:
        if isinstance(ev, Stored):
            for h in ev.block_hashes:
                if h in rep.blocks:
                    rep.blocks.move_to_end(h)
                    continue
                rep.blocks[h] = None
                self._holders.setdefault(h, set()).add(replica_id)
                self._entries += 1
            self._enforce_bound()
        elif isinstance(ev, Removed):
            for h in ev.block_hashes:
                if h in rep.blocks:
                    del rep.blocks[h]
                    self._unhold(h, replica_id)
        else:
            self._clear(replica_id, rep)

    def _unhold(self, h: int, replica_id: str) -> None:
        holders = self._holders.get(h)
        if holders is not None:
            holders.discard(replica_id)
            if not holders:
                del self._holders[h]
        self._entries -= 1

    def _clear(self, replica_id: str, rep: _Replica) -> None:
        for h in rep.blocks:
            self._unhold(h, replica_id)
        rep.blocks.clear()

    def _enforce_bound(self) -> None:
        while self._entries > self._max_entries:
            rid, rep = max(self._replicas.items(), key=lambda kv: len(kv[1].blocks))
            h, _ = rep.blocks.popitem(last=False)
            self._unhold(h, rid)

    def drop_replica(self, replica_id: str) -> bool:
        """Forget a replica that disappeared or failed health; it must resend a snapshot."""
        rep = self._replicas.pop(replica_id, None)
        if rep is None:
            return False
        self._clear(replica_id, rep)
        return True

    # -- lookup ---------------------------------------------------------------------------
    def lookup(self, token_ids: Sequence[int]) -> LookupResult:
        return self.lookup_hashes(block_hashes(token_ids, self.block_config))

    def lookup_hashes(self, hashes: Sequence[int]) -> LookupResult:
        matched: dict[str, int] = {}
        candidates: set[str] | None = None
        for i, h in enumerate(hashes):
            holders = self._holders.get(h)
            if not holders:
                still: set[str] = set()
            else:
                still = set(holders) if candidates is None else candidates & holders
            if candidates is not None:
                for rid in candidates - still:
                    matched[rid] = i
            candidates = still
            if not candidates:
                break
        for rid in candidates or ():
            matched[rid] = len(hashes)
        ordered = sorted(matched.items(), key=lambda kv: (-kv[1], kv[0]))
        return LookupResult(len(hashes), tuple(ReplicaMatch(r, n) for r, n in ordered if n > 0))

    # -- introspection --------------------------------------------------------------------
    def replica_ids(self) -> Iterable[str]:
        return self._replicas.keys()

    def block_count(self, replica_id: str) -> int:
        rep = self._replicas.get(replica_id)
        return 0 if rep is None else len(rep.blocks)

    @property
    def entries(self) -> int:
        return self._entries
