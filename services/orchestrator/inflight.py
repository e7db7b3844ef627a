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

Invariants:
- an entry lives from its lease's grant (`add`) to its end (`remove`) or its replica's drop;
- `matched` is, per replica, the longest leading run of the prompt's block hashes, up to an indexed
  depth, that one of the replica's live leases has;
- memory is bounded by the live leases (themselves bounded by the replicas' caps) times the indexed
  depths of their prompts (O(log) of their blocks beyond the first `EXACT_DEPTHS`).
"""

from __future__ import annotations

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
    out = []
    for depth in range(1, blocks + 1):
        step = 1 << max(0, depth.bit_length() - EXACT_DEPTHS.bit_length())
        if depth % step == 0 or depth == blocks:
            out.append(depth - 1)
    return tuple(out)


class InflightPrefixes:
    def __init__(self) -> None:
        self._holders: dict[int, dict[str, int]] = {}  # block hash -> replica -> live leases
        self._leases: dict[str, tuple[str, tuple[int, ...]]] = {}  # lease -> replica, hashes

    def __len__(self) -> int:
        return len(self._leases)

    def add(self, lease_id: str, replica_id: str, hashes: tuple[int, ...]) -> None:
        if not hashes or lease_id in self._leases:
            return
        self._leases[lease_id] = (replica_id, hashes)
        holders = self._holders
        for i in indexed_depths(len(hashes)):
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

    def _release(self, replica_id: str, hashes: tuple[int, ...]) -> None:
        holders = self._holders
        for i in indexed_depths(len(hashes)):
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
        gone = [lid for lid, (rid, _) in self._leases.items() if rid == replica_id]
        for lease_id in gone:
            self.remove(lease_id)

    def matched(self, hashes: Sequence[int]) -> dict[str, int]:
        """Per replica, the leading blocks of `hashes` one of its live leases' prompts has, to
        the deepest indexed depth."""
        out: dict[str, int] = {}
        holders = self._holders
        for i in indexed_depths(len(hashes)):
            by_replica = holders.get(hashes[i])
            if not by_replica:
                break
            for replica_id in by_replica:
                out[replica_id] = i + 1
        return out

    def merge(self, prefix: PrefixMatches) -> PrefixMatches:
        """`prefix` with each replica's match raised to what its live leases hold."""
        if not self._holders or not prefix.hashes:
            return prefix
        inflight = self.matched(prefix.hashes)
        if not inflight:
            return prefix
        matched = dict(prefix.matched_blocks)
        for replica_id, n in inflight.items():
            if n > matched.get(replica_id, 0):
                matched[replica_id] = n
        return dataclasses.replace(prefix, matched_blocks=matched, registered=prefix.matched_blocks)
