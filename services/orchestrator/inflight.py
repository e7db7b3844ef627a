"""The prompts of live leases, per replica: blocks a replica holds, or is about to hold, before its
KV events (or the registry's predictions) say so.

A lease's engine computes its prompt's full blocks at prefill and keeps them while the sequence
runs (blocks in use are never evicted), so from its grant to its end the replica holds or is
computing them. The registry learns of them only from the engine's KV events, after the prefill:
a burst of requests sharing a prefix that nobody cached yet (a cold start, a new system prompt,
the next turn of a conversation) would otherwise see no replica with it and spread its cold
prefills over every replica instead of reusing the first.

Only some depths are indexed (`indexed_depths`): every depth below twice `EXACT_DEPTHS` blocks, then
depths spaced at most 1/`EXACT_DEPTHS` of the depth apart, and each prompt's last block. Block
hashes are chained (a shared block implies the blocks before it are shared too), so a match is
still a leading run, found at the deepest indexed depth it reaches: it is never over-claimed and
under-claimed by less than 1/`EXACT_DEPTHS` of its length, while a 32k-token prompt (1024 blocks)
costs 192 entries to add and to remove instead of 1024 (a lease's add and remove were a fifth of
the orchestrator's CPU per decision with 32k-token prompts, py-spy in bench-admit).

What the registry lists is not indexed again: a lease on a replica whose KV events the registry
holds (exact) gets entries only beyond the blocks the registry listed for that replica at the
grant. Those stay listed while the lease runs (in use, never evicted), and a lookup's match already
credits them. A cached prefix then costs a lease nothing to add and remove; only what its engine
computes does (a 32k-token prompt mostly cached: a few entries instead of 192). A lookup walks the
prompt's indexed depths from the lowest listed match among the replicas with entries and, above
the highest, stops at the first depth no lease has: a lease's entries along the prompt start no
higher than its replica's listed match of the prompt (the shared blocks up to where its own entries
start are listed), so above every start the depths leases hold are a run.

Invariants:
- an entry lives from its lease's grant (`add`) to its end (`remove`) or its replica's drop;
- `merge` credits each replica the larger of its listed match and the deepest indexed depth of
  the prompt one of its live leases has: what a walk over every lease's whole prompt finds, where
  the blocks listed at each grant are listed still. Where the registry dropped one the engine
  holds (its entry bound, a resync), no more than that;
- memory is bounded by the live leases (themselves bounded by the replicas' caps) times the indexed
  depths of their prompts (O(log) of their blocks beyond the first `EXACT_DEPTHS`).
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
from collections.abc import Mapping, Sequence
from types import MappingProxyType

from services.orchestrator.prefix import PrefixMatches

EXACT_DEPTHS = 32
_NONE: Mapping[str, int] = MappingProxyType({})


@functools.lru_cache(maxsize=1024)
def indexed_depths(blocks: int) -> tuple[int, ...]:
    """The 0-based positions of a `blocks`-block prompt that are indexed, ascending: those whose
    depth (position + 1) is a multiple of its step, a power of two at most 1/`EXACT_DEPTHS` of the
    depth (1 below twice `EXACT_DEPTHS`), and the last. The same depths for every prompt, so a
    prompt and a lease meet at each indexed depth both reach."""
    out = []
    for depth in range(1, blocks + 1):
        step = 1 << max(0, depth.bit_length() - EXACT_DEPTHS.bit_length())
        if depth % step == 0 or depth == blocks:
            out.append(depth - 1)
    return tuple(out)


def _above(blocks: int, listed: int) -> tuple[int, ...]:
    """The indexed positions of a `blocks`-block prompt beyond its first `listed` blocks."""
    depths = indexed_depths(blocks)
    return depths[bisect.bisect_left(depths, listed) :] if listed > 0 else depths


class InflightPrefixes:
    def __init__(self) -> None:
        self._holders: dict[int, dict[str, int]] = {}  # block hash -> replica -> live leases
        # lease -> replica, hashes, blocks listed already (entries start above them)
        self._leases: dict[str, tuple[str, Sequence[int], int]] = {}
        self._indexing: dict[str, int] = {}  # replica -> its live leases with entries

    def __len__(self) -> int:
        return len(self._leases)

    def add(self, lease_id: str, replica_id: str, hashes: Sequence[int], listed: int = 0) -> None:
        """A lease's prompt; `listed`: its leading blocks the registry lists for the replica
        from the replica's own KV events (exact), indexed no more (they stay listed while the
        lease runs: blocks in use are never evicted)."""
        if not hashes or lease_id in self._leases:
            return
        self._leases[lease_id] = (replica_id, hashes, listed)
        depths = _above(len(hashes), listed)
        if not depths:
            return
        self._indexing[replica_id] = self._indexing.get(replica_id, 0) + 1
        holders = self._holders
        for i in depths:
            h = hashes[i]
            by_replica = holders.get(h)
            if by_replica is None:
                holders[h] = {replica_id: 1}
            else:
                by_replica[replica_id] = by_replica.get(replica_id, 0) + 1

    def remove(self, lease_id: str) -> None:
        entry = self._leases.pop(lease_id, None)
        if entry is not None:
            self._release(*entry)

    def _release(self, replica_id: str, hashes: Sequence[int], listed: int) -> None:
        depths = _above(len(hashes), listed)
        if not depths:
            return
        n = self._indexing[replica_id] - 1
        if n:
            self._indexing[replica_id] = n
        else:
            del self._indexing[replica_id]
        holders = self._holders
        for i in depths:
            h = hashes[i]
            by_replica = holders.get(h)
            if by_replica is None:
                continue
            n = by_replica.get(replica_id, 0) - 1
            if n > 0:
                by_replica[replica_id] = n
            else:
                by_replica.pop(replica_id, None)
                if not by_replica:
                    del holders[h]

    def drop_replica(self, replica_id: str) -> None:
        """The replica's cache is gone or unreachable: its leases' prompts count no more."""
        gone = [lid for lid, (rid, _, _) in self._leases.items() if rid == replica_id]
        for lease_id in gone:
            self.remove(lease_id)

    def matched(self, hashes: Sequence[int], listed: Mapping[str, int] = _NONE) -> dict[str, int]:
        """Per replica, the leading blocks of `hashes` one of its live leases' prompts has, to
        the deepest indexed depth above where its entries start; `listed`: the registry's
        matches of `hashes` (each replica's leading blocks it lists)."""
        out: dict[str, int] = {}
        indexing = self._indexing
        if not indexing or not hashes:
            return out
        starts = [listed.get(replica_id, 0) for replica_id in indexing]
        lo, hi = min(starts), max(starts)
        holders = self._holders
        for i in _above(len(hashes), lo):
            by_replica = holders.get(hashes[i])
            if not by_replica:
                if i >= hi:
                    break  # above every start, holders along the prompt are a run
                continue
            for replica_id in by_replica:
                out[replica_id] = i + 1
        return out

    def merge(self, prefix: PrefixMatches) -> PrefixMatches:
        """`prefix` with each replica's match raised to what its live leases hold."""
        if not self._indexing or not prefix.hashes:
            return prefix
        inflight = self.matched(prefix.hashes, prefix.matched_blocks)
        if not inflight:
            return prefix
        matched = dict(prefix.matched_blocks)
        for replica_id, n in inflight.items():
            if n > matched.get(replica_id, 0):
                matched[replica_id] = n
        return dataclasses.replace(prefix, matched_blocks=matched, registered=prefix.matched_blocks)
