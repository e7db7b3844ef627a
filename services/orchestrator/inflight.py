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

What the registry listed is indexed again from its last block only: a lease on a replica whose
KV events the registry holds (exact) gets entries from the last block the registry listed for
that replica when the request was looked up (`first_entry`: that block, rounded down to an
indexed depth) instead of from the first. A cached prefix then costs a lease next to nothing to
add and remove; only what its engine computes does (a 32k-token prompt mostly cached: a few
entries instead of 192). A lookup walks the prompt's indexed depths from the lowest first entry
among live leases; at a depth no lease has, it goes on at the next first entry: a lease's
entries along the prompt are a run from its first entry, so depths leases hold begin only at
first entries. The walk does not read the registry's answer: what leases hold beyond their first
entries counts even where the registry since dropped the blocks they listed (evicted before the
prefill, a failed lookup, a resync, another registry's answer). A lookup reads the depths leases
hold along the prompt and at most one more per run and per first entry it passes.

Invariants:
- an entry lives from its lease's grant (`add`) to its end (`remove`) or its replica's drop;
- `matched` is, per replica, the deepest indexed depth of the prompt one of the replica's live
  leases has, among leases whose first entry the prompt shares: with the registry's answer
  (`merge`), the match of whole-prompt entries wherever the registry lists what each lease's
  prompt shares with the prompt below that lease's first entry; else up to that much less;
- memory is bounded by the live leases (themselves bounded by the replicas' caps) times the indexed
  depths of their prompts (O(log) of their blocks beyond the first `EXACT_DEPTHS`).
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
from collections.abc import Sequence

from services.orchestrator.prefix import PrefixMatches

EXACT_DEPTHS = 32


@functools.lru_cache(maxsize=1024)
def indexed_depths(blocks: int) -> tuple[int, ...]:
    """The 0-based positions of a `blocks`-block prompt that are indexed, ascending: those whose
    depth (position + 1) is a multiple of its step, a power of two at most 1/`EXACT_DEPTHS` of the
    depth (1 below twice `EXACT_DEPTHS`), and the last. The same depths for every prompt, so a
    prompt and a lease meet at each indexed depth both reach."""
    return tuple(d - 1 for d in range(1, blocks + 1) if d % _step(d) == 0 or d == blocks)


def _step(depth: int) -> int:
    """The spacing of indexed depths around `depth` (see `indexed_depths`)."""
    return 1 << max(0, depth.bit_length() - EXACT_DEPTHS.bit_length())


def first_entry(listed: int) -> int:
    """Where a lease's entries start when the registry lists its first `listed` blocks: the
    deepest position at most `listed - 1` that every prompt reaching it indexes (0 with none
    listed). One listed block is indexed again, so a prompt reaching it meets the lease."""
    return listed - listed % _step(listed) - 1 if listed > 0 else 0


def _from(blocks: int, start: int) -> tuple[int, ...]:
    """The indexed positions of a `blocks`-block prompt from position `start` on."""
    depths = indexed_depths(blocks)
    return depths[bisect.bisect_left(depths, start) :]  # a tuple's whole slice is itself


class InflightPrefixes:
    def __init__(self) -> None:
        self._holders: dict[int, dict[str, int]] = {}  # block hash -> replica -> live leases
        # lease -> replica, hashes, the position its entries start at
        self._leases: dict[str, tuple[str, Sequence[int], int]] = {}
        self._starts: list[int] = []  # the live leases' first entries' positions, ascending

    def __len__(self) -> int:
        return len(self._leases)

    def add(self, lease_id: str, replica_id: str, hashes: Sequence[int], listed: int = 0) -> None:
        """A lease's prompt; `listed`: its leading blocks the registry lists for the replica
        from the replica's own KV events (exact): indexed from `first_entry(listed)` on."""
        if not hashes or lease_id in self._leases:
            return
        start = first_entry(min(listed, len(hashes)))
        self._leases[lease_id] = (replica_id, hashes, start)
        bisect.insort(self._starts, start)
        holders = self._holders
        for i in _from(len(hashes), start):
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

    def _release(self, replica_id: str, hashes: Sequence[int], start: int) -> None:
        del self._starts[bisect.bisect_left(self._starts, start)]
        holders = self._holders
        for i in _from(len(hashes), start):
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

    def matched(self, hashes: Sequence[int]) -> dict[str, int]:
        """Per replica, the leading blocks of `hashes` one of its live leases' prompts has, to
        the deepest indexed depth, among leases whose first entry `hashes` reaches."""
        out: dict[str, int] = {}
        starts = self._starts
        if not starts or not hashes:
            return out
        holders = self._holders
        depths = indexed_depths(len(hashes))
        k = 0  # the next first entry a run may begin at
        at = bisect.bisect_left(depths, starts[0])
        while at < len(depths):
            i = depths[at]
            by_replica = holders.get(hashes[i])
            if by_replica:
                for replica_id in by_replica:
                    out[replica_id] = i + 1
                at += 1
                continue
            # No lease holds this depth: a lease met further on begins at its first entry.
            k = bisect.bisect_right(starts, i, k)
            if k == len(starts):
                break
            at = bisect.bisect_left(depths, starts[k], at + 1)
        return out

    def merge(self, prefix: PrefixMatches) -> PrefixMatches:
        """`prefix` with each replica's match raised to what its live leases hold."""
        if not self._starts or not prefix.hashes:
            return prefix
        inflight = self.matched(prefix.hashes)
        if not inflight:
            return prefix
        matched = dict(prefix.matched_blocks)
        for replica_id, n in inflight.items():
            if n > matched.get(replica_id, 0):
                matched[replica_id] = n
        return dataclasses.replace(prefix, matched_blocks=matched, registered=prefix.matched_blocks)
