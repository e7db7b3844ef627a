"""The prefix client's copy of the exact index (WatchExact) against fake registries on port 0:
covered lookups are answered from the copy with no call; a lookup with a replica the copy does
not hold goes to the registry; a watch that ends drops the copy and starts again from a
snapshot; a refused watch leaves every lookup to the registry; a registry removed from the set
while watched drops the copy."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import grpc
import pytest

from llmmesh.common import kv_registries
from llmmesh.common.kv_registries import RegistryEndpoint
from llmmesh.generated.kvregistry.v1 import kvregistry_pb2 as pb
from llmmesh.kvblocks import BlockConfig, PromptHashes, block_hashes
from services.orchestrator.kv_mirror import ExactMirror
from services.orchestrator.prefix import RegistryPrefixIndex
from tests.helpers import eventually
from tests.orchestrator.test_prefix_failover import CFG, PROMPT, FakeRegistry, Served

HASHES = block_hashes(PROMPT, CFG)
KIND = pb.ExactChange


class WatchedRegistry(FakeRegistry):
    """Streams a snapshot (r1 holds the prompt's first two blocks), then holds the watch until
    `end` is set, then ends it with `end_code` (UNAVAILABLE). `refuse`: UNIMPLEMENTED (an older
    registry)."""

    def __init__(
        self, name: str, refuse: bool = False, end: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE
    ) -> None:
        super().__init__(name)
        self.refuse = refuse
        self.watches = 0
        self.end = asyncio.Event()
        self.end_code = end

    async def WatchExact(
        self, request: pb.WatchExactRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> AsyncIterator[pb.ExactIndexUpdate]:
        self.watches += 1
        if self.refuse:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "no WatchExact here")
        yield pb.ExactIndexUpdate(
            changes=[
                pb.ExactChange(replica_id="r1", kind=KIND.KIND_CLEARED),
                pb.ExactChange(replica_id="r1", kind=KIND.KIND_STORED, block_hashes=HASHES[:2]),
            ],
            synced=True,
        )
        await self.end.wait()
        self.end.clear()
        await context.abort(self.end_code, "watch ended")


async def served(fake: WatchedRegistry) -> Served:
    s = Served(fake.name, fake=fake)
    await s.start()
    return s


def mirrored(*regs: Served, dns: str | None = None) -> RegistryPrefixIndex:
    return RegistryPrefixIndex(
        [RegistryEndpoint(s.address) for s in regs],
        CFG,
        0.5,
        dns=dns,
        retry_s=0.05,
        mirror=ExactMirror(1000),
    )


@contextlib.asynccontextmanager
async def watched(
    fake: WatchedRegistry,
) -> AsyncIterator[RegistryPrefixIndex]:
    """An index with a copy, over `fake` served on port 0; both closed at the end."""
    reg = await served(fake)
    idx = mirrored(reg)
    try:
        yield idx
    finally:
        await idx.close()
        await reg.stop()


async def from_copy(idx: RegistryPrefixIndex, fake: FakeRegistry) -> bool:
    """One covered lookup answered without a call to the registry."""
    before = fake.lookups
    matches = await idx.lookup(PROMPT, ["r1"])
    return fake.lookups == before and matches.matched_blocks == {"r1": 2}


async def test_covered_lookups_come_from_the_copy() -> None:
    fake = WatchedRegistry("a")  # type: ignore[abstract]  # no PublishEvents, UpdateBatch
    async with watched(fake) as idx:
        await eventually(lambda: from_copy(idx, fake), 5, "lookups from the copy")
        covered = await idx.lookup(PROMPT, ["r1"])
        assert covered.exact == {"r1"}  # no routing update for r1: the registry records nothing
        assert covered.prompt_blocks == len(HASHES)
        before = fake.lookups
        partial = await idx.lookup(PROMPT, ["r1", "r2"])  # r2 may have predicted entries
        assert partial.matched_blocks == {"a": 2}  # the fake registry's own answer
        assert fake.lookups == before + 1
        assert fake.watches == 1


async def test_a_watch_that_ends_drops_the_copy_and_starts_again() -> None:
    fake = WatchedRegistry("a")  # type: ignore[abstract]  # no PublishEvents, UpdateBatch
    async with watched(fake) as idx:
        await eventually(lambda: from_copy(idx, fake), 5, "lookups from the copy")
        fake.end.set()

        async def watched_again() -> bool:
            return fake.watches == 2

        await eventually(watched_again, 5, "a new watch")
        await eventually(lambda: from_copy(idx, fake), 5, "lookups from the new copy")


# RESOURCE_EXHAUSTED: behind while waiting; CANCELLED: behind in a write it did not read.
@pytest.mark.parametrize("code", [grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.CANCELLED])
async def test_a_copy_that_fell_behind_leaves_its_registry_up(code: grpc.StatusCode) -> None:
    fake = WatchedRegistry("a", end=code)  # type: ignore[abstract]
    reg = await served(fake)
    idx = RegistryPrefixIndex(
        [RegistryEndpoint(reg.address)], CFG, 0.5, retry_s=30.0, mirror=ExactMirror(1000)
    )
    mirror = idx.mirror
    assert mirror is not None
    try:
        await eventually(lambda: from_copy(idx, fake), 5, "lookups from the copy")
        fake.end.set()  # this orchestrator fell behind the registry's changes

        async def dropped() -> bool:
            return not mirror.synced

        await eventually(dropped, 5, "the copy dropped")
        # The registry itself is fine: lookups still reach it (a failed one is skipped 30 s).
        assert (await idx.lookup(PROMPT, ["r1"])).matched_blocks == {"a": 2}
    finally:
        await idx.close()
        await reg.stop()


async def test_a_refused_watch_leaves_lookups_to_the_registry() -> None:
    fake = WatchedRegistry("a", refuse=True)  # type: ignore[abstract]
    async with watched(fake) as idx:
        for _ in range(20):
            assert (await idx.lookup(PROMPT, ["r1"])).matched_blocks == {"a": 2}
        # Far fewer tries than lookups: a refusal waits WATCH_REFUSED_RETRY_S, not retry_s.
        assert fake.watches == 1
        assert fake.lookups == 20


async def test_a_registry_removed_while_watched_drops_the_copy(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake = WatchedRegistry("a")  # type: ignore[abstract]  # no PublishEvents, UpdateBatch
    reg = await served(fake)
    found: list[RegistryEndpoint] | None = [RegistryEndpoint(reg.address)]

    async def resolve(target: str) -> list[RegistryEndpoint] | None:
        return found

    monkeypatch.setattr(kv_registries, "resolve_dns", resolve)
    idx = mirrored(dns="kv.example:1")
    mirror = idx.mirror
    assert mirror is not None
    try:
        await idx.refresh()
        await eventually(lambda: from_copy(idx, fake), 5, "lookups from the copy")
        found = []
        await idx.refresh()  # closes its channel, which cancels the watch
        assert idx.addresses == []

        async def dropped() -> bool:
            return not mirror.synced

        await eventually(dropped, 5, "the copy dropped")
        assert (await idx.lookup(PROMPT, ["r1"])).matched_blocks == {}  # prefix-blind
        found = [RegistryEndpoint(reg.address)]
        await idx.refresh()  # back: the watch (still running) finds it again
        await eventually(lambda: from_copy(idx, fake), 5, "a new watch")
    finally:
        await idx.close()
        await reg.stop()


async def test_sent_hashes_are_used_only_when_hashed_with_this_config() -> None:
    fake = WatchedRegistry("a")  # type: ignore[abstract]  # no PublishEvents, UpdateBatch
    async with watched(fake) as idx:
        await eventually(lambda: from_copy(idx, fake), 5, "lookups from the copy")
        same = PromptHashes(CFG, tuple(HASHES))
        assert (await idx.lookup([], ["r1"], same)).matched_blocks == {"r1": 2}
        other = PromptHashes(BlockConfig(CFG.block_size, CFG.hash_seed + 1), tuple(HASHES))
        blind = await idx.lookup([], ["r1"], other)  # nothing to hash here: cache-blind
        assert (blind.prompt_blocks, blind.matched_blocks) == (0, {})
        rehashed = await idx.lookup(PROMPT, ["r1"], other)  # the prompt came too: hashed here
        assert rehashed.matched_blocks == {"r1": 2}


class LaggingRegistry(WatchedRegistry):
    """Ends every watch RESOURCE_EXHAUSTED before its snapshot is through: a copy that cannot
    keep up with the registry's changes."""

    async def WatchExact(
        self, request: pb.WatchExactRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> AsyncIterator[pb.ExactIndexUpdate]:
        self.watches += 1
        yield pb.ExactIndexUpdate(
            changes=[pb.ExactChange(replica_id="r1", kind=KIND.KIND_CLEARED)], synced=False
        )
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "behind")


async def test_a_copy_that_keeps_falling_behind_is_watched_again_twice_as_late() -> None:
    """Each watch costs the registry a snapshot and the orchestrator its application, while
    both are loaded: a copy that never got in sync was watched again every `retry_s`."""
    fake = LaggingRegistry("a")  # type: ignore[abstract]
    async with watched(fake) as idx:  # retry_s 0.05
        assert (await idx.lookup(PROMPT, ["r1"])).matched_blocks == {"a": 2}  # starts the watch

        async def fourth_lapse() -> bool:
            return idx.watch_wait_s >= 0.05 * 2**3

        await eventually(fourth_lapse, 10, "the fourth lapse's wait")
        assert 4 <= fake.watches <= 5
        assert (await idx.lookup(PROMPT, ["r1"])).matched_blocks == {"a": 2}  # the registry's


async def test_a_registry_refusing_the_watch_leaves_it_to_another() -> None:
    """The first registry refuses WatchExact (an older version mid-upgrade, a mesh policy): the
    copy is taken from the next one, not left off for as long as the first one refuses."""
    refusing = WatchedRegistry("a", refuse=True)  # type: ignore[abstract]
    serving = WatchedRegistry("b")  # type: ignore[abstract]
    a, b = await served(refusing), await served(serving)
    idx = mirrored(a, b)
    try:
        await idx.lookup(PROMPT, ["r1"])  # starts the watch

        async def copied() -> bool:
            return await from_copy(idx, serving) and await from_copy(idx, refusing)

        await eventually(copied, 5, "lookups from a copy of the second registry's index")
        assert (refusing.watches, serving.watches) == (1, 1)
    finally:
        await idx.close()
        await a.stop()
        await b.stop()
