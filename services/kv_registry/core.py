"""The registry core: which replica holds which KV-cache blocks, exact or predicted.

Two sources, one index:
- Exact mode: a replica that publishes KV events. Per-replica ordered event streams (sequence
  numbers per epoch) are folded into the index; a gap puts the replica in resync (its later
  events are ignored until a `cleared` event, the head of an engine snapshot, arrives), so the
  index never holds a state the engine never had. Lookups keep answering from the last good
  state meanwhile. A new epoch (engine restart) discards what the previous epoch published.
- Approximate mode: a replica that publishes nothing (the Triton TensorRT-LLM backend). The
  orchestrator's routing decisions (`record_routing`) become predicted entries with a TTL, bounded
  per replica by an adaptive capacity (LRU), and corrected by what the engine reports per request
  (`report_reuse`: kv_cache_reused_blocks against the prediction).
A replica is approximate until its event stream is first in sync, then exact: its predictions
are dropped and later ones ignored. So after a registry restart, predictions answer for a replica
until the engine's snapshot (requested through the sequence gap) arrives.

Data layout (what makes it fast in pure Python):
- Each replica owns a slot `s`: bit 2s ("held") and bit 2s+1 ("logged") of an int mask.
- `_index: dict[block hash, mask]`. A lookup ANDs the masks of the prompt's blocks in order and
  stops when nothing is left: one dict probe and one int AND per block, whatever the number of
  replicas. Replicas drop out of the running mask at their first missing block.
- Exact replicas: `log`, an append-only list of `array('Q')` segments, holds each hash the
  replica stored, once (the logged bit says it is in the log). 8 bytes per (block, replica) and no
  Python object, since the hash int is the index's own key object. `removed` clears the held
  bit only; segments are compacted incrementally when more than half the log is stale.
- Predicted replicas: an `OrderedDict[hash, expiry]` in least-recently-routed order.
- Clearing or dropping a replica does not walk its blocks: the replica moves to a fresh slot,
  the old slot leaves the live mask at once (lookups stop seeing it) and its bits are swept in
  bounded steps (`maintain`, and amortized in every write), so a 1M-block resync never blocks
  lookups. Small replicas are swept inline.

Invariants:
- For a live replica r: held(r) is set in `_index[h]` exactly when h is in r's block set; for an
  exact replica logged(r) is set exactly when h is in r's log, and held implies logged.
- `entries` counts live (block, replica) pairs; `entries + garbage_entries <= max_entries` after
  every call: garbage is swept first, then the fullest replica's oldest blocks are dropped
  (first-stored order for exact replicas, least recently routed for predicted ones).
- Predicted expiries never increase along a prompt's block chain (a routing records the whole
  chain from block 0 and expiries only grow), so a predicted match is checked for expiry with a
  binary search over the matched prefix instead of a probe per block.
"""

from __future__ import annotations

import enum
import heapq
import math
import time
import weakref
from array import array
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import chain, islice

import xxhash

from llmmesh.common.errors import InvalidArgument
from llmmesh.kvblocks import BlockConfig, hashes_from_bytes, token_bytes
from services.kv_registry import metrics as m
from services.kv_registry.errors import BatchTooLarge, BlockConfigMismatch
from services.kv_registry.settings import KvRegistrySettings


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


_SEGMENT = 32_768  # log segment length (entries); a compaction step handles one segment
_INLINE_SWEEP = 4_096  # data this small is swept at once instead of lazily
_COMPACT_SLACK = 4_096  # stale log entries tolerated beyond the live count


class _Replica:
    __slots__ = (
        "blocks_gauge",
        "both",
        "capacity",
        "compact_at",
        "count",
        "epoch",
        "events",
        "exact",
        "held",
        "id",
        "log",
        "log_len",
        "logged",
        "matches",
        "next_sequence",
        "pred",
        "resyncing",
        "slot",
        "ttl",
        "ttl_mixed",
    )

    def __init__(self, replica_id: str, slot: int, capacity: int) -> None:
        self.id = replica_id
        self.slot = slot
        self.held = 1 << (2 * slot)
        self.logged = self.held << 1
        self.both = self.held | self.logged
        self.exact = False
        self.epoch: str | None = None
        self.next_sequence = 0
        self.resyncing = False
        self.count = 0  # held blocks
        self.log: list[array[int]] = []  # exact: stored hashes, oldest first
        self.log_len = 0
        self.compact_at = -1  # segment under incremental compaction, -1 when none
        self.pred: OrderedDict[int, float] = OrderedDict()  # predicted: hash -> expiry
        self.capacity = capacity
        self.ttl = 0.0  # the one TTL its predictions were recorded with ...
        self.ttl_mixed = False  # ... unless several were used
        self.matches: dict[int, ReplicaMatch] = {}  # immutable results, reused across lookups
        self.blocks_gauge = m.BLOCKS.labels(replica_id)
        self.events = {k: m.EVENTS.labels(replica_id, k) for k in ("stored", "removed", "cleared")}

    def move_to(self, slot: int) -> None:
        self.slot = slot
        self.held = 1 << (2 * slot)
        self.logged = self.held << 1
        self.both = self.held | self.logged

    @property
    def source(self) -> Source:
        return Source.EXACT if self.exact else Source.PREDICTED

    def match(self, k: int) -> ReplicaMatch:
        found = self.matches.get(k)
        if found is None:
            if len(self.matches) > 4096:
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


class KvRegistry:
    def __init__(
        self,
        block_config: BlockConfig,
        *,
        max_entries: int,
        max_events_per_request: int,
        predicted_ttl_s: float = 600.0,
        predicted_capacity: int = 32_768,
        predicted_shrink: float = 0.25,
        hash_cache_size: int = 4096,
        clock: Callable[[], float] = time.monotonic,
    ):
        if predicted_ttl_s <= 0 or predicted_capacity < 0 or not 0 < predicted_shrink <= 1:
            raise ValueError("predicted_ttl_s > 0, predicted_capacity >= 0, 0 < shrink <= 1")
        self.block_config = block_config
        self._max_entries = max_entries
        self._max_events = max_events_per_request
        self._ttl = predicted_ttl_s
        self._max_capacity = predicted_capacity
        self._shrink = predicted_shrink
        self._clock = clock
        self._index: dict[int, int] = {}
        self._replicas: dict[str, _Replica] = {}
        self._by_held: dict[int, _Replica] = {}  # held bit -> live replica
        self._live = 0  # OR of live replicas' held bits
        self._free_slots: list[int] = []  # heap: lowest first keeps masks short
        self._next_slot = 0
        self._garbage: list[_Garbage] = []
        self._garbage_entries = 0
        self._entries = 0
        self._compacting: dict[str, _Replica] = {}
        # xxh3-128 of a prompt's token bytes -> its block hashes: the orchestrator sends the
        # same prompt to Lookup, RecordRouting and ReportReuse; it is hashed once.
        self._hash_cache: OrderedDict[int, tuple[int, ...]] = OrderedDict()
        self._hash_cache_size = hash_cache_size
        ref = weakref.ref(self)
        m.ENTRIES.set_function(lambda: float(r.entries) if (r := ref()) else 0.0)
        m.UNIQUE_BLOCKS.set_function(lambda: float(len(r._index)) if (r := ref()) else 0.0)
        m.GARBAGE.set_function(lambda: float(r.garbage_entries) if (r := ref()) else 0.0)

    @classmethod
    def from_settings(cls, settings: KvRegistrySettings, block_config: BlockConfig) -> KvRegistry:
        return cls(
            block_config,
            max_entries=settings.max_entries,
            max_events_per_request=settings.max_events_per_request,
            predicted_ttl_s=settings.predicted_ttl_s,
            predicted_capacity=settings.predicted_capacity,
            predicted_shrink=settings.predicted_shrink,
            hash_cache_size=settings.hash_cache_size,
        )

    # -- hashing ----------------------------------------------------------------------------
    def hash_tokens(self, token_ids: Sequence[int]) -> tuple[int, ...]:
        """The prompt's full-block hashes (llmmesh.kvblocks identity), cached per prompt."""
        body = token_bytes(token_ids)
        key = _xxh3_128(body)
        cache = self._hash_cache
        hashes = cache.get(key)
        if hashes is None:
            hashes = tuple(hashes_from_bytes(body, self.block_config))
            if self._hash_cache_size:
                cache[key] = hashes
                if len(cache) > self._hash_cache_size:
                    cache.popitem(last=False)
        else:
            cache.move_to_end(key)
        return hashes

    # -- exact mode: ingest -----------------------------------------------------------------
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
        rep = self._replicas.get(replica_id) or self._add_replica(replica_id)
        if rep.epoch != epoch:
            if rep.exact:  # the engine restarted: what its previous lifetime published is gone
                self._retire(rep)
                self._set_exact(rep, False)
            rep.epoch = epoch
            rep.next_sequence = 0
            rep.resyncing = False
        was_resyncing = resyncing = rep.resyncing
        nxt = rep.next_sequence
        stored = removed = cleared = work = 0
        # The `stored` fast path is inlined (a snapshot is one event per block): blocks new to
        # the replica's log collect in `new` and are appended (and counted) by `flush`.
        idx = self._index
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
            self._entries += added
            return added

        for ev in events:
            seq = ev.sequence
            if resyncing or seq > nxt:
                if not isinstance(ev, Cleared):  # gap: wait for a snapshot
                    resyncing = True
                    continue
                resyncing = False  # a snapshot may start anywhere
            elif seq < nxt:
                continue  # duplicate delivery
            nxt = seq + 1
            if not rep.exact:
                self._retire(rep)  # predictions give way to the engine's own account
                self._set_exact(rep, True)
                held, logged, both = rep.held, rep.logged, rep.both
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
                self._retire(rep)
                held, logged, both = rep.held, rep.logged, rep.both
                cleared += 1
        work += flush()
        rep.next_sequence = nxt
        rep.resyncing = resyncing
        if stored:
            rep.events["stored"].inc(stored)
        if removed:
            rep.events["removed"].inc(removed)
        if cleared:
            rep.events["cleared"].inc(cleared)
        if resyncing and not was_resyncing:
            m.RESYNCS.labels(replica_id).inc()
        self._enforce_bound()
        self._housekeeping(work + len(events))
        rep.blocks_gauge.set(rep.count)
        return IngestResult(nxt, resyncing)

    def _remove(self, rep: _Replica, hashes: Iterable[int]) -> int:
        idx = self._index
        get = idx.get
        held = rep.held
        n = 0
        for h in hashes:
            mask = get(h)
            if mask is not None and mask & held:
                idx[h] = mask ^ held  # still logged: compaction removes the entry
                n += 1
        rep.count -= n
        self._entries -= n
        if rep.compact_at < 0 and rep.log_len > 2 * rep.count + _COMPACT_SLACK:
            rep.compact_at = 0
            self._compacting[rep.id] = rep
        return n

    # -- approximate mode ---------------------------------------------------------------------
    def record_routing(
        self, replica_id: str, hashes: Sequence[int], *, ttl_s: float | None = None
    ) -> RoutingResult:
        """The orchestrator routed a prompt (its full-block hashes) to `replica_id`. For an
        approximate replica the blocks become predicted entries (TTL, capacity-bounded LRU);
        an exact replica records nothing. Returns the prior belief (`predicted_blocks`)."""
        if not replica_id:
            raise InvalidArgument("must be non-empty", field="replica_id")
        ttl = self._ttl if ttl_s is None else ttl_s
        if not 0 < ttl < math.inf:
            raise InvalidArgument(f"must be positive and finite, got {ttl_s}", field="ttl_s")
        now = self._clock()
        rep = self._replicas.get(replica_id) or self._add_replica(replica_id)
        m.ROUTINGS.labels(replica_id, rep.source.value).inc()
        if rep.exact:
            return RoutingResult(len(hashes), self._matched(rep, hashes, now), Source.EXACT, 0)
        before = self._predict(rep, hashes, now, ttl)
        self._enforce_bound()
        self._housekeeping(len(hashes))
        rep.blocks_gauge.set(rep.count)
        recorded = min(len(hashes), rep.capacity)
        return RoutingResult(len(hashes), before, Source.PREDICTED, recorded)

    def report_reuse(
        self,
        replica_id: str,
        hashes: Sequence[int],
        reported_reused_blocks: int,
        *,
        prompt_tokens: int | None = None,
        predicted_blocks: int | None = None,
    ) -> ReuseResult:
        """The engine reused `reported_reused_blocks` leading blocks of this prompt (reported on
        completion). Counts predicted vs reported; for an approximate replica, corrects the model:

        - over-prediction (reported < predicted): the engine evicted blocks we still believed
          cached, so it retains less than our LRU assumes: the replica's capacity shrinks by
          `predicted_shrink` x the missed fraction, dropping its least recently routed entries;
        - under-prediction (reported > predicted): it retains more: the capacity grows back
          (at least by the missed blocks, up to `predicted_capacity`);
        - either way the engine now holds the whole prompt (it just computed and stored it), so
          the prompt's entries are refreshed as most recent. They are not dropped: the blocks
          missing at admission were recomputed by this very request.
        A large shrink drops at most ~2 x prompt blocks at once; `maintain` drains the rest.
        """
        if not replica_id:
            raise InvalidArgument("must be non-empty", field="replica_id")
        if reported_reused_blocks < 0:
            raise InvalidArgument("must not be negative", field="reported_reused_blocks")
        reusable = len(hashes)
        if prompt_tokens is not None:
            reusable = min(reusable, max(0, (prompt_tokens - 1) // self.block_config.block_size))
        now = self._clock()
        rep = self._replicas.get(replica_id)
        if predicted_blocks is None:
            predicted_blocks = 0 if rep is None else self._matched(rep, hashes, now)
        p = min(predicted_blocks, reusable)
        r = min(reported_reused_blocks, reusable)
        source = Source.EXACT if rep is not None and rep.exact else Source.PREDICTED
        labels = (replica_id, source.value)
        m.REPORTED_PROMPT_BLOCKS.labels(*labels).inc(reusable)
        m.PREDICTED_BLOCKS.labels(*labels).inc(p)
        m.REPORTED_REUSED_BLOCKS.labels(*labels).inc(r)
        m.CONFIRMED_BLOCKS.labels(*labels).inc(min(p, r))
        if rep is not None and rep.exact:
            return ReuseResult(reusable, p, r, Source.EXACT, 0, 0)
        if rep is None:
            rep = self._add_replica(replica_id)
        cap = rep.capacity
        if r < p:
            cap = math.floor(cap * (1 - self._shrink * (p - r) / p))
        elif r > p:
            cap = min(
                self._max_capacity, cap + max(r - p, math.ceil(cap * self._shrink * (r - p) / r))
            )
        rep.capacity = cap
        m.PREDICTED_CAPACITY.labels(replica_id).set(cap)
        budget = 2 * len(hashes) + 256
        dropped = self._evict(rep, min(rep.count - cap, budget)) if rep.count > cap else 0
        if dropped:
            m.EVICTIONS.labels("correction").inc(dropped)
        self._predict(rep, hashes, now, rep.ttl if rep.count else self._ttl)
        self._enforce_bound()
        self._housekeeping(len(hashes))
        rep.blocks_gauge.set(rep.count)
        return ReuseResult(reusable, p, r, Source.PREDICTED, cap, dropped)

    def _predict(self, rep: _Replica, hashes: Sequence[int], now: float, ttl: float) -> int:
        """Record the prompt's blocks as predicted entries; returns how many leading blocks the
        replica held (unexpired) before."""
        self._expire(rep, now)
        if not rep.count:
            rep.ttl, rep.ttl_mixed = ttl, False
        elif ttl != rep.ttl:
            rep.ttl_mixed = True
        pred = rep.pred
        idx = self._index
        get = idx.get
        held = rep.held
        expiry = now + ttl
        n = len(hashes)
        added = 0
        # Leaf first, so a prompt's first block is its most recent entry: the LRU drops a
        # prefix's extensions before the prefix, as the engine does.
        if not rep.ttl_mixed:
            # One TTL: LRU order is expiry order, so `_expire` left only live entries and a new
            # expiry is never earlier than an old one. One index probe per block, and the prior
            # match falls out of the same pass (the first block not held).
            before = n
            for i in range(n - 1, -1, -1):
                h = hashes[i]
                mask = get(h)
                if mask is None:
                    idx[h] = held
                elif mask & held:
                    pred.move_to_end(h)
                    pred[h] = expiry
                    continue
                else:
                    idx[h] = mask | held
                pred[h] = expiry
                added += 1
                before = i
        else:
            before = self._matched(rep, hashes, now)
            for h in reversed(hashes):
                old = pred.get(h)
                if old is None:
                    mask = get(h)
                    idx[h] = held if mask is None else mask | held
                    pred[h] = expiry
                    added += 1
                else:
                    pred.move_to_end(h)
                    if expiry > old:
                        pred[h] = expiry
        rep.count += added
        self._entries += added
        over = rep.count - rep.capacity
        if over > 0:  # at most ~2x the work of this call; `maintain` drains a larger excess
            m.EVICTIONS.labels("capacity").inc(self._evict(rep, min(over, 2 * n + 256)))
        return before

    def _expire(self, rep: _Replica, now: float) -> int:
        """Drop the replica's predicted entries whose TTL ran out, oldest first."""
        pred = rep.pred
        if rep.exact or not pred:
            return 0
        idx = self._index
        held = rep.held
        n = 0
        while pred:
            h = next(iter(pred))
            if pred[h] > now:
                break
            del pred[h]
            mask = idx[h] ^ held
            if mask:
                idx[h] = mask
            else:
                del idx[h]
            n += 1
        if n:
            rep.count -= n
            self._entries -= n
            m.EVICTIONS.labels("ttl").inc(n)
            rep.blocks_gauge.set(rep.count)
        return n

    def _matched(self, rep: _Replica, hashes: Sequence[int], now: float) -> int:
        """Leading blocks of `hashes` the replica holds (unexpired, when predicted)."""
        get = self._index.get
        held = rep.held
        k = 0
        for h in hashes:
            if not get(h, 0) & held:
                break
            k += 1
        if k and not rep.exact:
            k = self._unexpired(rep, hashes, k, now)
        return k

    @staticmethod
    def _unexpired(rep: _Replica, hashes: Sequence[int], k: int, now: float) -> int:
        """Length of the unexpired part of a predicted match of k blocks. Expiries never
        increase along the chain, so a binary search finds the first expired block."""
        pred = rep.pred
        if pred[hashes[k - 1]] > now:
            return k
        lo, hi = 0, k - 1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if pred[hashes[mid - 1]] > now:
                lo = mid
            else:
                hi = mid - 1
        return lo

    # -- both modes -------------------------------------------------------------------------
    def drop_replica(self, replica_id: str) -> bool:
        """Forget a replica that disappeared or failed health. If its engine still publishes,
        its next batch shows a gap and it is asked for a snapshot."""
        rep = self._replicas.pop(replica_id, None)
        if rep is None:
            return False
        self._compacting.pop(replica_id, None)
        self._retire(rep, drop=True)
        rep.blocks_gauge.set(0)
        m.REPLICA_EXACT.labels(replica_id).set(0)
        self._housekeeping(0)
        return True

    def lookup(self, token_ids: Sequence[int]) -> LookupResult:
        start = time.perf_counter()
        result = self._lookup(self.hash_tokens(token_ids))
        m.LOOKUPS.inc()
        m.LOOKUP_SECONDS.observe(time.perf_counter() - start)
        return result

    def lookup_hashes(self, hashes: Sequence[int]) -> LookupResult:
        start = time.perf_counter()
        result = self._lookup(hashes)
        m.LOOKUPS.inc()
        m.LOOKUP_SECONDS.observe(time.perf_counter() - start)
        return result

    def _lookup(self, hashes: Sequence[int]) -> LookupResult:
        n = len(hashes)
        if n == 0:
            return LookupResult(0, ())
        get = self._index.get
        cand = get(hashes[0], 0) & self._live
        if not cand:
            return LookupResult(n, ())
        ends: list[tuple[int, int]] = []  # (held bit, matched blocks)
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
        now: float | None = None
        ranked: list[tuple[int, str, ReplicaMatch]] = []
        by_held = self._by_held
        for bit, k in ends:
            rep = by_held[bit]
            if not rep.exact:
                if now is None:
                    now = self._clock()
                k = self._unexpired(rep, hashes, k, now)
                if not k:
                    continue
            ranked.append((-k, rep.id, rep.match(k)))
        ranked.sort()
        return LookupResult(n, tuple([r[2] for r in ranked]))

    # -- bookkeeping ------------------------------------------------------------------------
    def _add_replica(self, replica_id: str) -> _Replica:
        rep = _Replica(replica_id, self._alloc_slot(), self._max_capacity)
        self._replicas[replica_id] = rep
        self._by_held[rep.held] = rep
        self._live |= rep.held
        m.REPLICA_EXACT.labels(replica_id).set(0)
        m.PREDICTED_CAPACITY.labels(replica_id).set(rep.capacity)
        return rep

    def _alloc_slot(self) -> int:
        if self._free_slots:
            return heapq.heappop(self._free_slots)
        self._next_slot += 1
        return self._next_slot - 1

    def _set_exact(self, rep: _Replica, exact: bool) -> None:
        rep.exact = exact
        rep.matches.clear()
        rep.capacity = 0 if exact else self._max_capacity
        m.REPLICA_EXACT.labels(rep.id).set(1 if exact else 0)
        m.PREDICTED_CAPACITY.labels(rep.id).set(rep.capacity)

    def _retire(self, rep: _Replica, *, drop: bool = False) -> None:
        """Empty the replica (or forget it, with `drop`). Large data is swept lazily from a
        retired slot; the replica continues on a fresh slot."""
        source: Iterator[int]
        if rep.exact:
            size = rep.log_len
            source = chain.from_iterable(rep.log)
            rep.log = []
            rep.log_len = 0
            if rep.compact_at >= 0:
                rep.compact_at = -1
                self._compacting.pop(rep.id, None)
        else:
            size = len(rep.pred)
            source = iter(rep.pred)
            rep.pred = OrderedDict()
        held_count = rep.count
        rep.count = 0
        self._entries -= held_count
        garbage = _Garbage(rep.slot, rep.held, rep.both, source, held_count)
        lazy = size > _INLINE_SWEEP
        if lazy:
            self._garbage_entries += held_count
            self._garbage.append(garbage)
        else:
            self._sweep(garbage, size + 1)
        if lazy or drop:
            del self._by_held[rep.held]
            self._live &= ~rep.held
            if not lazy:
                heapq.heappush(self._free_slots, rep.slot)
        if lazy and not drop:
            rep.move_to(self._alloc_slot())
            self._by_held[rep.held] = rep
            self._live |= rep.held

    def _sweep(self, g: _Garbage, budget: int) -> int:
        """Clear up to `budget` of a retired slot's entries; returns how many were processed
        (fewer than `budget` means the slot is clean)."""
        idx = self._index
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

    def _collect(self, budget: int) -> int:
        """Sweep retired slots, oldest first, for about `budget` entries."""
        done = 0
        while self._garbage and done < budget:
            g = self._garbage[0]
            before = g.pending
            step = budget - done
            n = self._sweep(g, step)
            self._garbage_entries -= before - g.pending
            done += n
            if n < step:  # source exhausted
                self._garbage.pop(0)
                self._garbage_entries -= g.pending
                heapq.heappush(self._free_slots, g.slot)
        return done

    def _compact_step(self, budget: int) -> int:
        """Drop stale (removed) entries from exact replicas' logs, a segment at a time."""
        done = 0
        idx = self._index
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

    def _evict(self, rep: _Replica, n: int) -> int:
        """Drop the replica's `n` oldest blocks (fewer if it holds fewer)."""
        n = min(n, rep.count)
        if n <= 0:
            return 0
        idx = self._index
        if not rep.exact:
            pred = rep.pred
            held = rep.held
            for _ in range(n):
                h, _exp = pred.popitem(last=False)
                mask = idx[h] ^ held
                if mask:
                    idx[h] = mask
                else:
                    del idx[h]
        else:
            get = idx.get
            held = rep.held
            clear = ~rep.both
            evicted = 0
            while evicted < n and rep.log:
                seg = rep.log[0]
                k = 0
                for h in seg:
                    k += 1
                    mask = get(h, 0)
                    if mask & held:
                        evicted += 1
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
            n = evicted
        rep.count -= n
        self._entries -= n
        rep.blocks_gauge.set(rep.count)
        return n

    def _enforce_bound(self) -> None:
        over = self._entries + self._garbage_entries - self._max_entries
        while over > 0 and self._garbage:
            self._collect(max(over, 1024))
            over = self._entries + self._garbage_entries - self._max_entries
        while over > 0:
            ranked = sorted(self._replicas.values(), key=lambda r: r.count, reverse=True)[:2]
            if not ranked or ranked[0].count == 0:
                break
            second = ranked[1].count if len(ranked) > 1 else 0
            evicted = self._evict(ranked[0], min(over, ranked[0].count - second + 1))
            m.EVICTIONS.labels("bound").inc(evicted)
            over -= evicted

    def _housekeeping(self, work: int) -> None:
        """Amortized background work: about twice the work the caller just did."""
        if self._garbage or self._compacting:
            budget = 2 * work + 256
            done = self._collect(budget)
            if done < budget:
                self._compact_step(budget - done)

    def maintain(self, budget: int = 4096) -> int:
        """Background step (the servicer runs it periodically): sweep retired slots, compact
        logs, expire predictions. Returns the work done; 0 means idle."""
        done = self._collect(budget)
        if done < budget:
            done += self._compact_step(budget - done)
        now = self._clock()
        for rep in list(self._replicas.values()):
            done += self._expire(rep, now)
            if rep.count > rep.capacity and not rep.exact and done < budget:
                evicted = self._evict(rep, min(rep.count - rep.capacity, budget - done))
                m.EVICTIONS.labels("capacity").inc(evicted)
                done += evicted
        return done

    # -- introspection ----------------------------------------------------------------------
    def replica_ids(self) -> Iterable[str]:
        return self._replicas.keys()

    def block_count(self, replica_id: str) -> int:
        rep = self._replicas.get(replica_id)
        return 0 if rep is None else rep.count

    def source(self, replica_id: str) -> Source | None:
        """The replica's mode, None when unknown."""
        rep = self._replicas.get(replica_id)
        return None if rep is None else rep.source

    def predicted_capacity(self, replica_id: str) -> int:
        rep = self._replicas.get(replica_id)
        return 0 if rep is None else rep.capacity

    @property
    def entries(self) -> int:
        """Live (block, replica) pairs."""
        return self._entries

    @property
    def garbage_entries(self) -> int:
        """Pairs of cleared or dropped replicas still to be swept (they count toward the bound)."""
        return self._garbage_entries

    @property
    def unique_blocks(self) -> int:
        return len(self._index)


_xxh3_128 = xxhash.xxh3_128_intdigest
