"""The registry core: per-replica ordered event streams folded into a block → replicas index.

Invariants:
- For each replica, events are applied strictly in sequence order within one epoch. A gap puts
  the replica in resync: its later events are ignored until a `cleared` event (the head of an
  engine snapshot) arrives, so the index never holds a state the engine never had.
- A new epoch (engine restart) discards everything the replica's previous epoch published.
- `_holders[h]` is exactly the set of replicas whose block set contains h.
- Total (block, replica) pairs never exceed `max_entries`: the fullest replica's least recently
  stored block is dropped first.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from prometheus_client import Counter, Gauge, Histogram

from llmmesh.kvblocks import BlockConfig, block_hashes
from services.kv_registry.errors import BatchTooLarge, BlockConfigMismatch


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


@dataclass(frozen=True, slots=True)
class IngestResult:
    next_sequence: int
    resync_required: bool


@dataclass(frozen=True, slots=True)
class ReplicaMatch:
    replica_id: str
    matched_blocks: int


@dataclass(frozen=True, slots=True)
class LookupResult:
    prompt_blocks: int
    matches: tuple[ReplicaMatch, ...]  # most matched first


@dataclass
class _Replica:
    epoch: str
    next_sequence: int = 0
    resyncing: bool = False
    blocks: OrderedDict[int, None] = field(default_factory=OrderedDict)


_BLOCKS = Gauge("llmmesh_kv_registry_blocks", "Blocks indexed per replica.", ["replica"])
_EVENTS = Counter("llmmesh_kv_registry_events_total", "KV events applied.", ["replica", "kind"])
_LOOKUPS = Counter("llmmesh_kv_registry_lookups_total", "Prefix lookups served.")
_RESYNCS = Counter("llmmesh_kv_registry_resyncs_total", "Resyncs requested.", ["replica"])
_LOOKUP_SECONDS = Histogram(
    "llmmesh_kv_registry_lookup_seconds",
    "Lookup latency inside the registry core.",
    buckets=(1e-5, 2.5e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 5e-3, 0.02),
)


class KvRegistry:
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
        was_resyncing = rep.resyncing
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
        if rep.resyncing and not was_resyncing:
            _RESYNCS.labels(replica_id).inc()
        _BLOCKS.labels(replica_id).set(len(rep.blocks))
        return IngestResult(rep.next_sequence, rep.resyncing)

    def _apply(self, replica_id: str, rep: _Replica, ev: Event) -> None:
        if isinstance(ev, Stored):
            _EVENTS.labels(replica_id, "stored").inc()
            for h in ev.block_hashes:
                if h in rep.blocks:
                    rep.blocks.move_to_end(h)
                    continue
                rep.blocks[h] = None
                self._holders.setdefault(h, set()).add(replica_id)
                self._entries += 1
            self._enforce_bound()
        elif isinstance(ev, Removed):
            _EVENTS.labels(replica_id, "removed").inc()
            for h in ev.block_hashes:
                if h in rep.blocks:
                    del rep.blocks[h]
                    self._unhold(h, replica_id)
        else:
            _EVENTS.labels(replica_id, "cleared").inc()
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
        _BLOCKS.labels(replica_id).set(0)
        return True

    # -- lookup ---------------------------------------------------------------------------
    def lookup(self, token_ids: Sequence[int]) -> LookupResult:
        start = time.perf_counter()
        hashes = block_hashes(token_ids, self.block_config)
        result = self.lookup_hashes(hashes)
        _LOOKUPS.inc()
        _LOOKUP_SECONDS.observe(time.perf_counter() - start)
        return result

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
