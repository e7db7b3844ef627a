"""The predicted index: what replicas that publish nothing (the Triton TensorRT-LLM backend)
probably hold, from the orchestrator's routing decisions.

A routing (`record`) makes the prompt's blocks predicted entries with a TTL, bounded per
replica by an adaptive capacity (LRU), and the engine's per-request report (`correct`:
kv_cache_reused_blocks against the prediction) adapts that capacity.

Storage, on the shared `BitmaskIndex`: per replica an `OrderedDict[hash, expiry]` in least
recently routed order.

Invariants, for every replica r of this index:
- held(r) is set in `index[h]` exactly when h is in `r.pred`, and `r.count == len(r.pred)`;
- expiries never increase along a prompt's block chain (a routing records the whole chain from
  block 0 and expiries only grow), so a match is checked for expiry with a binary search over
  the matched prefix instead of a probe per block;
- after `maintain`, a replica holds at most `capacity` entries (a write may leave more, it
  drops at most about twice its own size).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import NamedTuple

from services.kv_registry.bitmask import BitmaskIndex, Slot, StoreBacked
from services.kv_registry.contracts import Ranked, RoutingResult, Source
from services.kv_registry.metrics import EvictionReason, RegistryMetrics, ReplicaMetrics


class PredictedReplica(Slot):
    __slots__ = ("capacity", "pred", "ttl", "ttl_mixed")
    source = Source.PREDICTED

    def __init__(self, replica_id: str, slot: int, metrics: ReplicaMetrics, capacity: int):
        super().__init__(replica_id, slot, metrics)
        self.pred: OrderedDict[int, float] = OrderedDict()  # hash -> expiry
        self.capacity = capacity
        self.ttl = 0.0  # the one TTL its predictions were recorded with ...
        self.ttl_mixed = False  # ... unless several were used


class Correction(NamedTuple):
    capacity: int  # after the correction
    dropped: int  # entries the smaller capacity dropped at once


class PredictedIndex(StoreBacked[PredictedReplica]):
    """Implements `contracts.PrefixIndex` (the registry validates requests before calling)."""

    def __init__(
        self,
        *,
        ttl_s: float,
        capacity: int,
        shrink: float,
        clock: Callable[[], float],
        metrics: RegistryMetrics,
    ) -> None:
        if ttl_s <= 0 or capacity < 0 or not 0 < shrink <= 1:
            raise ValueError("ttl_s > 0, capacity >= 0, 0 < shrink <= 1")
        self.ttl_s = ttl_s  # of a routing that sets none
        self.max_capacity = capacity
        self._shrink = shrink
        self._clock = clock
        self._metrics = metrics
        self.store: BitmaskIndex[PredictedReplica] = BitmaskIndex()
        self.replicas: dict[str, PredictedReplica] = {}

    def capacity(self, replica_id: str) -> int:
        rep = self.replicas.get(replica_id)
        return self.max_capacity if rep is None else rep.capacity

    # -- writes -----------------------------------------------------------------------------
    def record(self, replica_id: str, hashes: Sequence[int], ttl: float) -> RoutingResult:
        """The prompt (its full-block hashes) was routed to the replica: its blocks become
        predicted entries. Reports the prior belief (`predicted_blocks`)."""
        now = self._clock()
        rep = self.replicas.get(replica_id) or self._add(replica_id)
        before = self._predict(rep, hashes, now, ttl)
        rep.metrics.blocks(rep.count)
        n = len(hashes)
        return RoutingResult(n, before, Source.PREDICTED, min(n, rep.capacity))

    def ttl_of(self, replica_id: str) -> float:
        """The TTL the replica's entries are refreshed with (`ttl_s` when it has none)."""
        rep = self.replicas.get(replica_id)
        return self.ttl_s if rep is None else self._ttl(rep)

    def _ttl(self, rep: PredictedReplica) -> float:
        return rep.ttl if rep.count else self.ttl_s

    def correct(
        self, replica_id: str, hashes: Sequence[int], predicted: int, reported: int
    ) -> Correction:
        """The engine reused `reported` leading blocks of this prompt where `predicted` were
        predicted (both at most the reusable blocks):

        - over-prediction (reported < predicted): the engine evicted blocks we still believed
          cached, so it retains less than our LRU assumes: the replica's capacity shrinks by
          `shrink` x the missed fraction, dropping its least recently routed entries;
        - under-prediction (reported > predicted): it retains more: the capacity grows back
          (at least by the missed blocks, up to the configured capacity);
        - either way the engine now holds the whole prompt (it just computed and stored it), so
          the prompt's entries are refreshed as most recent. They are not dropped: the blocks
          missing at admission were recomputed by this very request.
        A large shrink drops at most ~2 x prompt blocks at once; `maintain` drains the rest.
        """
        now = self._clock()
        rep = self.replicas.get(replica_id) or self._add(replica_id)
        p, r = predicted, reported
        cap = rep.capacity
        if r < p:
            cap = math.floor(cap * (1 - self._shrink * (p - r) / p))
        elif r > p:
            cap = min(
                self.max_capacity, cap + max(r - p, math.ceil(cap * self._shrink * (r - p) / r))
            )
        rep.capacity = cap
        rep.metrics.predicted_capacity(cap)
        budget = 2 * len(hashes) + 256
        dropped = self._evict(rep, min(rep.count - cap, budget)) if rep.count > cap else 0
        if dropped:
            self._metrics.evicted(EvictionReason.CORRECTION, dropped)
        self._predict(rep, hashes, now, self._ttl(rep))
        rep.metrics.blocks(rep.count)
        return Correction(cap, dropped)

    def _predict(self, rep: PredictedReplica, hashes: Sequence[int], now: float, ttl: float) -> int:
        """Record the prompt's blocks as predicted entries; returns how many leading blocks the
        replica held (unexpired) before."""
        self._expire(rep, now)
        if not rep.count:
            rep.ttl, rep.ttl_mixed = ttl, False
        elif ttl != rep.ttl:
            rep.ttl_mixed = True
        pred = rep.pred
        store = self.store
        idx = store.index
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
        store.entries += added
        over = rep.count - rep.capacity
        if over > 0:  # at most ~2x the work of this call; `maintain` drains a larger excess
            evicted = self._evict(rep, min(over, 2 * n + 256))
            self._metrics.evicted(EvictionReason.CAPACITY, evicted)
        return before

    def _expire(self, rep: PredictedReplica, now: float) -> int:
        """Drop the replica's entries whose TTL ran out, oldest first."""
        pred = rep.pred
        if not pred:
            return 0
        idx = self.store.index
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
            self.store.entries -= n
            self._metrics.evicted(EvictionReason.TTL, n)
            rep.metrics.blocks(rep.count)
        return n

    def _evict(self, rep: PredictedReplica, n: int) -> int:
        """Drop the replica's `n` least recently routed entries (fewer if it holds fewer)."""
        n = min(n, rep.count)
        if n <= 0:
            return 0
        idx = self.store.index
        pred = rep.pred
        held = rep.held
        for _ in range(n):
            h, _exp = pred.popitem(last=False)
            mask = idx[h] ^ held
            if mask:
                idx[h] = mask
            else:
                del idx[h]
        rep.count -= n
        self.store.entries -= n
        rep.metrics.blocks(rep.count)
        return n

    def _matched(self, rep: PredictedReplica, hashes: Sequence[int], now: float) -> int:
        k = self.store.held_prefix(rep.held, hashes)
        return _unexpired(rep, hashes, k, now) if k else 0

    # -- PrefixIndex ------------------------------------------------------------------------
    def find_matches(self, hashes: Sequence[int], ranked: list[Ranked]) -> None:
        store = self.store
        if not store.live:
            return
        ends = store.ends(hashes)
        if not ends:
            return
        now = self._clock()
        by_held = store.by_held
        for bit, k in ends:
            rep = by_held[bit]
            k = _unexpired(rep, hashes, k, now)
            if k:
                ranked.append((-k, rep.id, rep.match(k)))

    def matched(self, replica_id: str, hashes: Sequence[int]) -> int:
        """Leading blocks of `hashes` the replica holds, unexpired."""
        rep = self.replicas.get(replica_id)
        return 0 if rep is None else self._matched(rep, hashes, self._clock())

    def block_count(self, replica_id: str) -> int:
        rep = self.replicas.get(replica_id)
        return 0 if rep is None else rep.count

    def evict(self, replica_id: str, n: int) -> int:
        rep = self.replicas.get(replica_id)
        return 0 if rep is None else self._evict(rep, n)

    def drop(self, replica_id: str) -> bool:
        rep = self.replicas.pop(replica_id, None)
        if rep is None:
            return False
        source = iter(rep.pred)
        size = len(rep.pred)
        rep.pred = OrderedDict()
        self.store.retire(rep, source, size, drop=True)
        return True

    # -- upkeep -----------------------------------------------------------------------------
    def maintain(self, budget: int) -> int:
        """Expire every replica's predictions, then drain capacity excess while `budget` lasts
        (expiries count toward it). Returns the entries dropped."""
        now = self._clock()
        done = 0
        for rep in list(self.replicas.values()):
            done += self._expire(rep, now)
            if rep.count > rep.capacity and done < budget:
                evicted = self._evict(rep, min(rep.count - rep.capacity, budget - done))
                self._metrics.evicted(EvictionReason.CAPACITY, evicted)
                done += evicted
        return done

    def _add(self, replica_id: str) -> PredictedReplica:
        store = self.store
        rep = PredictedReplica(
            replica_id, store.alloc_slot(), self._metrics.replica(replica_id), self.max_capacity
        )
        self.replicas[replica_id] = rep
        store.attach(rep)
        return rep


def _unexpired(rep: PredictedReplica, hashes: Sequence[int], k: int, now: float) -> int:
    """Length of the unexpired part of a match of k blocks. Expiries never increase along the
    chain, so a binary search finds the first expired block."""
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
