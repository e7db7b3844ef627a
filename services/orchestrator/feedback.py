"""Prefix feedback: prefix lookups for routing, and the approximate-mode loop with kv_registry
(record each routing decision as predicted blocks; correct it with what the engine reports).

Invariants:
- Without a prefix index every call is a no-op and lookups match nothing (prefix-blind routing).
- A prediction lives from its lease's grant to its completion: bounded by the live leases.
- Registry calls run in the background and never delay admission or completion; their tasks are
  tracked until done.
- A reuse report carries the registry's answer to its lease's routing update: it is sent once
  that answer came (at once unless the lease ended before it, e.g. within the update linger).
  A routing to a replica the lookup found exact (KV events) sends no update: the registry would
  record nothing and answer with the lookup's match, which the report carries instead; the
  report leaves the prompt's block hashes out (the registry counts it from the prompt's length).
- A lookup's matches include the prompts of live leases (`InflightPrefixes`): a replica holds, or
  is computing, its leases' prompt blocks before the registry hears of them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection, Coroutine, Sequence
from dataclasses import dataclass

from llmmesh.kvblocks import PromptHashes
from services.orchestrator.inflight import InflightPrefixes
from services.orchestrator.prefix import NO_MATCHES, PrefixIndex, PrefixMatches


@dataclass(slots=True)
class _Prediction:
    """What approximate mode needs at completion: the prompt's block hashes, and how many blocks
    the registry predicted the replica held."""

    hashes: Sequence[int]
    prompt_tokens: int
    predicted: int = 0
    exact: bool = False  # the lookup found the replica exact: its report needs no hashes
    routing: asyncio.Task[None] | None = None  # the routing update, until answered


class PrefixFeedback:
    def __init__(self, index: PrefixIndex | None) -> None:
        self._index = index
        self._predictions: dict[str, _Prediction] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.inflight = InflightPrefixes()

    async def lookup(
        self,
        token_ids: Sequence[int],
        replica_ids: Collection[str] = (),
        hashes: PromptHashes | None = None,
    ) -> PrefixMatches:
        if self._index is None:
            return NO_MATCHES
        return self.inflight.merge(await self._index.lookup(token_ids, replica_ids, hashes))

    def routed(
        self, lease_id: str, replica_id: str, prefix: PrefixMatches, prompt_tokens: int
    ) -> None:
        """A lease was granted: the routing becomes predicted blocks on the replica."""
        if self._index is None or not prefix.hashes:
            return
        exact = replica_id in prefix.exact
        # What the registry lists for an exact replica is not indexed again (InflightPrefixes).
        listed = prefix.registered_blocks(replica_id) if exact else 0
        self.inflight.add(lease_id, replica_id, prefix.hashes, listed)
        pred = self._predictions[lease_id] = _Prediction(prefix.hashes, prompt_tokens)
        if exact:
            # The registry records nothing for an exact replica and would answer with the
            # match this lookup already has: no update (and no walk of the prompt's blocks).
            pred.predicted = listed
            pred.exact = True
            return
        pred.routing = self._background(
            self._record_routing(self._index, pred, replica_id, prefix.hashes)
        )

    async def _record_routing(
        self, index: PrefixIndex, pred: _Prediction, replica_id: str, hashes: Sequence[int]
    ) -> None:
        pred.predicted = await index.record_routing(replica_id, hashes)

    def completed(self, lease_id: str, replica_id: str, reused_blocks: int | None) -> None:
        """A lease ended. `reused_blocks` is the engine's kv_cache_reused_blocks, given only when
        the engine ran the prompt: it corrects the registry's predictions."""
        self.inflight.remove(lease_id)
        pred = self._predictions.pop(lease_id, None)
        if pred is not None and reused_blocks is not None and self._index is not None:
            self._background(self._report_reuse(self._index, pred, replica_id, reused_blocks))

    async def _report_reuse(
        self, index: PrefixIndex, pred: _Prediction, replica_id: str, reused_blocks: int
    ) -> None:
        if pred.routing is not None and not pred.routing.done():
            await asyncio.wait([pred.routing])  # its outcome is the routing task's own
        hashes = () if pred.exact else pred.hashes
        await index.report_reuse(
            replica_id, hashes, reused_blocks, pred.prompt_tokens, pred.predicted
        )

    def drop_replica(self, replica_id: str) -> None:
        """The replica's cached blocks are gone or unreachable."""
        self.inflight.drop_replica(replica_id)
        if self._index is not None:
            self._background(self._index.drop_replica(replica_id))

    def _background(self, coro: Coroutine[object, object, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task
