"""Shared fakes of the orchestrator's tests."""

from __future__ import annotations

import asyncio
from collections.abc import Collection, Sequence

from llmmesh.kvblocks import PromptHashes
from services.orchestrator.prefix import PrefixMatches


class FixedPrefix:
    """In-process PrefixIndex: fixed lookup answers; records the approximate-mode calls."""

    def __init__(self, matches: PrefixMatches):
        self.matches = matches
        self.calls: list[tuple[str, ...]] = []
        self.reports: list[tuple[str, int, int, int]] = []
        self.report_hashes: list[tuple[int, ...]] = []
        self.called = asyncio.Event()
        self.looked_up_for: list[frozenset[str]] = []  # each lookup's replicas

    async def lookup(
        self,
        token_ids: Sequence[int],
        replica_ids: Collection[str] = (),
        hashes: PromptHashes | None = None,
    ) -> PrefixMatches:
        self.looked_up_for.append(frozenset(replica_ids))
        return self.matches_for(token_ids)

    def matches_for(self, token_ids: Sequence[int]) -> PrefixMatches:
        """The answer to a lookup of `token_ids` (the same for every prompt here)."""
        return self.matches

    async def record_routing(self, replica_id: str, hashes: Sequence[int]) -> int:
        self.calls.append(("record", replica_id))
        self.called.set()
        return 3

    async def report_reuse(
        self,
        replica_id: str,
        hashes: Sequence[int],
        reported: int,
        prompt_tokens: int,
        predicted: int,
    ) -> None:
        self.reports.append((replica_id, reported, prompt_tokens, predicted))
        self.report_hashes.append(tuple(hashes))
        self.called.set()

    async def drop_replica(self, replica_id: str) -> None:
        self.calls.append(("drop", replica_id))
        self.called.set()

    async def settle(self, n: int) -> None:
        """Wait until n approximate-mode calls happened (they run as background tasks)."""
        while len(self.calls) + len(self.reports) < n:
            self.called.clear()
            await self.called.wait()
