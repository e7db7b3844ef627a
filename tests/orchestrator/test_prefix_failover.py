"""The prefix client over several kv_registry replicas: fake registries on port 0, real channels.
Lookups stick to the replica that answered, fail over within the same lookup, skip a failed one
for `retry_s` and come back to it; approximate-mode updates go to every replica that is up."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
import pytest_asyncio
from prometheus_client import REGISTRY

from llmmesh.common import kv_registries
from llmmesh.common.kv_registries import RegistryEndpoint
from llmmesh.common.metric_names import ORCH_KV_UPDATES_DROPPED as KV_UPDATES_DROPPED
from llmmesh.generated.kvregistry.v1 import kvregistry_pb2 as pb
from llmmesh.generated.kvregistry.v1 import kvregistry_pb2_grpc as pb_grpc
from llmmesh.kvblocks import BlockConfig
from services.orchestrator.prefix import RegistryPrefixIndex, registry_index
from services.orchestrator.settings import OrchestratorSettings
from tests.helpers import ManualClock, eventually

CFG = BlockConfig(block_size=4, hash_seed=1)
PROMPT = list(range(12))  # three blocks


class FakeRegistry(pb_grpc.KvRegistryServiceServicer):
    """Answers every lookup with its own name as the matching replica; records updates."""

    def __init__(self, name: str, streams: bool = True) -> None:
        self.name = name
        self.streams = streams  # serves LookupStream (else UNIMPLEMENTED, an older registry)
        self.lookups = 0
        self.streamed = 0  # lookups answered over a stream
        self.streams_opened = 0
        self.updates: list[str] = []
        self.hang = False
        self.invalid = False  # refuses each lookup INVALID_ARGUMENT (a prompt over its bound)
        self.max_blocks = 0  # refuses a prompt of more blocks INVALID_ARGUMENT (0: no bound)
        self.delay_s = 0.0  # each lookup answers after this long
        self.reached = asyncio.Event()  # set once `lookups` reaches `expect`
        self.expect = 0

    async def Lookup(
        self, request: pb.LookupRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.LookupResponse:
        self.lookups += 1
        if self.expect and self.lookups >= self.expect:
            self.reached.set()
        if self.hang:
            await asyncio.sleep(3600)
        if self.invalid or 0 < self.max_blocks < len(request.block_hashes):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "prompt too long")
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        return pb.LookupResponse(
            prompt_blocks=len(request.block_hashes),
            matches=[
                pb.ReplicaMatch(
                    replica_id=self.name, matched_blocks=2, source=pb.MATCH_SOURCE_EXACT
                )
            ],
        )

    async def LookupStream(
        self,
        request_iterator: AsyncIterator[pb.LookupRequest],
        context: grpc.aio.ServicerContext[object, object],
    ) -> AsyncIterator[pb.LookupResponse]:
        if not self.streams:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "no LookupStream here")
        self.streams_opened += 1
        async for request in request_iterator:
            self.streamed += 1
            response = await self.Lookup(request, context)
            response.request_id = request.request_id
            yield response

    async def RecordRouting(
        self, request: pb.RecordRoutingRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.RecordRoutingResponse:
        self.updates.append(f"record:{request.replica_id}")
        return pb.RecordRoutingResponse(predicted_blocks=len(self.name))

    async def ReportReuse(
        self, request: pb.ReportReuseRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.ReportReuseResponse:
        self.updates.append(f"report:{request.replica_id}")
        return pb.ReportReuseResponse()

    async def DropReplica(
        self, request: pb.DropReplicaRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.DropReplicaResponse:
        self.updates.append(f"drop:{request.replica_id}")
        return pb.DropReplicaResponse()


class Served:
    """A fake registry on a port that survives stop()/start() (a restart on the same address)."""

    def __init__(self, name: str, streams: bool = True, fake: FakeRegistry | None = None) -> None:
        self.fake = fake or FakeRegistry(name, streams)  # type: ignore[abstract]  # no PublishEvents
        self.port = 0
        self.server: grpc.aio.Server | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> None:
        self.server = grpc.aio.server()
        pb_grpc.add_KvRegistryServiceServicer_to_server(self.fake, self.server)
        self.port = self.server.add_insecure_port(f"127.0.0.1:{self.port}")
        await self.server.start()

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop(None)
            self.server = None


@pytest_asyncio.fixture(params=[True, False], ids=["stream", "unary"])
async def registries(request: pytest.FixtureRequest) -> AsyncIterator[tuple[Served, Served]]:
    """Two registries; with `unary`, older ones without LookupStream (every lookup falls back
    to a unary Lookup)."""
    a, b = Served("a", request.param), Served("b", request.param)
    await a.start()
    await b.start()
    yield a, b
    await a.stop()
    await b.stop()


def index(
    *served: Served, clock: ManualClock | None = None, timeout_s: float = 5.0
) -> RegistryPrefixIndex:
    """The client over `served`; `timeout_s` is each lookup's budget (only the tests of a
    registry that hangs or is slow give a short one: on two busy cores a stream opened and
    refused, then a unary call, once took over 0.5 s in CI)."""
    return RegistryPrefixIndex(
        [RegistryEndpoint(s.address) for s in served],
        CFG,
        timeout_s,
        retry_s=2.0,
        clock=clock or time.monotonic,
    )


async def matched_by(idx: RegistryPrefixIndex) -> set[str]:
    return set((await idx.lookup(PROMPT)).matched_blocks)


async def test_lookups_stick_to_the_first_registry(registries: tuple[Served, Served]) -> None:
    a, b = registries
    idx = index(a, b)
    try:
        for _ in range(3):
            assert await matched_by(idx) == {"a"}
        assert (a.fake.lookups, b.fake.lookups) == (3, 0)
        assert idx.preferred == a.address
    finally:
        await idx.close()


async def test_lookups_share_one_stream_and_each_gets_its_own_answer(
    registries: tuple[Served, Served],
) -> None:
    a, _ = registries
    idx = index(a, timeout_s=10.0)  # 100 at once on two busy cores: no lookup may time out
    prompts = [list(range(4 * n)) for n in (1, 5, 2, 9, 3)] * 20
    try:
        got = await asyncio.gather(*(idx.lookup(p) for p in prompts))
        assert [m.prompt_blocks for m in got] == [len(p) // 4 for p in prompts]
        assert all(m.matched_blocks == {"a": 2} for m in got)
        assert all(m.exact == {"a"} for m in got)  # its matches come from KV events
        assert a.fake.lookups == len(prompts)
        if a.fake.streams:
            assert (a.fake.streamed, a.fake.streams_opened) == (len(prompts), 1)
        else:
            assert a.fake.streamed == 0
    finally:
        await idx.close()


async def test_stream_lookups_can_be_turned_off(registries: tuple[Served, Served]) -> None:
    a, _ = registries
    idx = RegistryPrefixIndex(
        [RegistryEndpoint(a.address)], CFG, 0.5, retry_s=2.0, stream_lookups=False
    )
    try:
        assert await matched_by(idx) == {"a"}
        assert (a.fake.lookups, a.fake.streamed) == (1, 0)
    finally:
        await idx.close()


async def test_a_lookup_that_gave_up_does_not_take_the_next_ones_answer(
    registries: tuple[Served, Served],
) -> None:
    """On a stream, answers match requests by order: one that comes after its lookup timed out
    is dropped, not handed to the lookup behind it."""
    a, b = registries
    clock = ManualClock(1000.0)
    # A budget b answers within on a loaded machine (with 0.25 s, b's own call timed out in
    # a CI-like run), a's answer later than it.
    idx = index(a, b, clock=clock, timeout_s=1.0)
    try:
        a.fake.delay_s = 1.5
        assert await matched_by(idx) == {"b"}  # a timed out; b answered the same lookup
        a.fake.delay_s = 0.0
        await b.stop()
        clock.t += 5  # past retry_s: a is tried again, its late answer still on the way
        got = await idx.lookup(list(range(8)))
        assert (got.prompt_blocks, got.matched_blocks) == (2, {"a": 2})
    finally:
        await idx.close()


async def test_a_cancelled_lookup_leaves_the_stream_and_the_registry_alone(
    registries: tuple[Served, Served],
) -> None:
    """A caller that goes away (its Admit cancelled) mid-lookup costs nothing to the lookups
    beside it: no broken call, no registry marked down."""
    a, _ = registries
    idx = index(a, timeout_s=5.0)
    try:
        assert await matched_by(idx) == {"a"}
        a.fake.delay_s = 0.2
        a.fake.expect = a.fake.lookups + 4
        doomed = asyncio.ensure_future(idx.lookup(PROMPT))
        others = [asyncio.ensure_future(idx.lookup(PROMPT)) for _ in range(3)]
        await asyncio.wait_for(a.fake.reached.wait(), 5.0)  # all four reached a
        doomed.cancel()
        got = await asyncio.gather(*others)
        assert [m.matched_blocks for m in got] == [{"a": 2}] * 3
        assert idx.preferred == a.address
        assert await matched_by(idx) == {"a"}
        assert a.fake.streams_opened == (1 if a.fake.streams else 0)
    finally:
        await idx.close()


async def test_a_dead_registry_fails_over_within_the_lookup_and_comes_back(
    registries: tuple[Served, Served],
) -> None:
    a, b = registries
    clock = ManualClock(1000.0)
    idx = index(a, b, clock=clock)
    try:
        assert await matched_by(idx) == {"a"}
        await a.stop()  # kill: its connection breaks, calls fail at once
        assert await matched_by(idx) == {"b"}  # the same lookup still has prefix matches
        assert idx.preferred == b.address
        lookups_a = a.fake.lookups
        await a.start()  # restarted on its address
        channel_a = next(r.channel for r in idx._registries if r.address == a.address)

        async def reconnected() -> bool:
            state = channel_a.get_state(try_to_connect=True)
            return state is grpc.ChannelConnectivity.READY

        # The index's channel to a is back (its reconnect backoff grows with the failures).
        await eventually(reconnected, what="the index's channel to the restarted a is ready")
        assert await matched_by(idx) == {"b"}  # sticky: the survivor keeps serving
        clock.t += 5  # past retry_s: a is eligible again, used once b fails
        await b.stop()
        assert await matched_by(idx) == {"a"}
        assert a.fake.lookups == lookups_a + 1
        assert idx.preferred == a.address
    finally:
        await idx.close()


async def test_a_hanging_registry_costs_one_timeout_then_is_skipped(
    registries: tuple[Served, Served],
) -> None:
    """Judged by the calls each registry got, not by wall time: the budget is long enough for
    b to answer on a loaded machine (a 0.1 s budget let b's own call time out there too)."""
    a, b = registries
    a.fake.hang = True
    idx = index(a, b, timeout_s=0.5)
    try:
        assert await matched_by(idx) == {"b"}  # a's call timed out (it never answers): b's
        assert a.fake.lookups == 1
        for _ in range(5):
            assert await matched_by(idx) == {"b"}
        assert a.fake.lookups == 1  # no more waiting on a
        assert b.fake.lookups == 6
    finally:
        await idx.close()


async def test_all_registries_down_routes_prefix_blind(registries: tuple[Served, Served]) -> None:
    a, b = registries
    idx = index(a, b, clock=ManualClock(1000.0))  # no time passes: both stay down
    try:
        await a.stop()
        await b.stop()
        m = await idx.lookup(PROMPT)
        assert m.prompt_blocks == 3
        assert m.matched_blocks == {}
        assert len(m.hashes) == 3
        asked = []
        lookup = idx._lookup

        async def counted(reg: Any, *args: Any) -> Any:
            asked.append(reg.address)
            return await lookup(reg, *args)

        idx._lookup = counted  # type: ignore[method-assign,assignment]
        assert (await idx.lookup(PROMPT)).matched_blocks == {}
        assert asked == []  # both skipped (down until retry_s): no call at all
    finally:
        await idx.close()


async def test_updates_go_to_every_registry_that_is_up(
    registries: tuple[Served, Served],
) -> None:
    a, b = registries
    idx = index(a, b, clock=ManualClock(1000.0))  # no time passes: a stays down once failed
    try:
        assert await idx.record_routing("r1", [1, 2]) == 1  # the preferred (a)'s prediction
        await idx.report_reuse("r1", [1, 2], 1, 8, 1)
        await idx.drop_replica("r2")
        expected = ["record:r1", "report:r1", "drop:r2"]
        assert a.fake.updates == expected
        assert b.fake.updates == expected
        await a.stop()
        failed = idx._failed
        tried_down: list[str] = []

        def counted(reg: Any, err: grpc.aio.AioRpcError, call: str) -> None:
            tried_down.append(reg.address)
            failed(reg, err, call)

        idx._failed = counted  # type: ignore[method-assign]
        assert await idx.record_routing("r3", [1]) == 1  # b's answer; a marked down
        assert tried_down == [a.address]
        await idx.drop_replica("r4")  # a is skipped, not tried (and waited on) again
        assert tried_down == [a.address]
        assert b.fake.updates[-2:] == ["record:r3", "drop:r4"]
        assert await matched_by(idx) == {"b"}  # lookups skip a without trying it
        assert a.fake.lookups == 0
    finally:
        await idx.close()


class BatchingRegistry(FakeRegistry):
    """A registry that knows UpdateBatch: records each batch's size and its updates."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.batches: list[int] = []
        self.release = asyncio.Event()
        self.release.set()
        self.entered = asyncio.Event()  # set when a batch arrives

    async def UpdateBatch(
        self, request: pb.UpdateBatchRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.UpdateBatchResponse:
        self.entered.set()
        await self.release.wait()
        self.batches.append(len(request.updates))
        predicted = []
        for u in request.updates:
            kind = u.WhichOneof("kind")
            replica = getattr(u, kind or "drop").replica_id
            self.updates.append(f"{kind}:{replica}")
            if kind == "routing":
                predicted.append(int(replica[1:]))
        return pb.UpdateBatchResponse(predicted_blocks=predicted)


async def batching(
    *, max_pending: int = 4096, linger_s: float = 0.0
) -> tuple[Served, BatchingRegistry, RegistryPrefixIndex]:
    """A served BatchingRegistry and an index that sends its updates to it."""
    served = Served("a")
    fake = BatchingRegistry("a")  # type: ignore[abstract]
    served.fake = fake
    await served.start()
    idx = RegistryPrefixIndex(
        [RegistryEndpoint(served.address)],
        CFG,
        0.5,
        update_timeout_s=5.0,
        max_pending=max_pending,
        linger_s=linger_s,
    )
    return served, fake, idx


async def test_updates_are_batched_in_order_and_the_oldest_dropped_when_full() -> None:
    served, fake, idx = await batching(max_pending=4)
    dropped = REGISTRY.get_sample_value(KV_UPDATES_DROPPED) or 0.0
    try:
        assert await idx.record_routing("r7", [1, 2]) == 7  # alone: sent at once
        fake.release.clear()  # the next batch hangs in the registry until released
        fake.entered.clear()
        first = asyncio.ensure_future(idx.record_routing("r1", [1]))
        await fake.entered.wait()
        assert idx.pending == 0  # r1's batch is in flight
        later = [asyncio.ensure_future(idx.record_routing(f"r{i}", [1])) for i in range(2, 8)]
        reuse = asyncio.ensure_future(idx.report_reuse("r5", [1], 1, 8, 5))
        await asyncio.sleep(0)
        assert idx.pending == 4  # r2, r3 and r4 dropped (oldest first), r5..r7 and the report kept
        fake.release.set()
        assert await first == 1
        assert [await f for f in later] == [0, 0, 0, 5, 6, 7]  # a dropped routing predicts 0
        await reuse
        assert fake.batches == [1, 1, 4]  # one call carried everything queued meanwhile
        assert fake.updates == [
            "routing:r7",
            "routing:r1",
            "routing:r5",
            "routing:r6",
            "routing:r7",
            "reuse:r5",
        ]
        assert REGISTRY.get_sample_value(KV_UPDATES_DROPPED) == dropped + 3
    finally:
        await idx.close()
        await served.stop()


async def test_dns_target_adds_the_pods_it_resolves_to(registries: tuple[Served, Served]) -> None:
    a, _ = registries
    idx = RegistryPrefixIndex([], CFG, 0.5, dns=f"localhost:{a.port}")
    try:
        assert idx.addresses == []
        assert (await idx.lookup(PROMPT)).matched_blocks == {}
        await idx.refresh()
        assert idx.addresses == [a.address]
        assert await matched_by(idx) == {"a"}
    finally:
        await idx.close()


async def test_a_prompt_a_registry_refuses_is_routed_blind_and_the_registry_stays_up(
    registries: tuple[Served, Served],
) -> None:
    a, b = registries
    idx = index(a, b)
    try:
        a.fake.invalid = b.fake.invalid = True
        assert (await idx.lookup(PROMPT)).matched_blocks == {}
        assert a.fake.lookups + b.fake.lookups == 1  # the prompt, not the registry: no retry
        a.fake.invalid = b.fake.invalid = False
        assert await matched_by(idx) == {"a"}  # not skipped for retry_s
    finally:
        await idx.close()


async def test_a_prompt_refused_on_the_stream_fails_no_other_lookup() -> None:
    """The registry ends a LookupStream with the status of a request it refuses: the lookups
    written after it on the same call are asked again, not routed blind with its error."""
    a = Served("a")
    await a.start()
    idx = index(a, timeout_s=5.0)
    try:
        assert await matched_by(idx) == {"a"}  # the stream is open and has answered
        a.fake.max_blocks = 3
        a.fake.delay_s = 0.05  # the three are in flight together
        long_prompt = list(range(4 * 4))
        results = await asyncio.gather(
            idx.lookup(PROMPT), idx.lookup(long_prompt), idx.lookup(PROMPT)
        )
        assert [set(r.matched_blocks) for r in results] == [{"a"}, set(), {"a"}]
        assert a.fake.streams_opened == 1
        assert idx.preferred == a.address  # the registry is not taken for failed
        assert await matched_by(idx) == {"a"}
    finally:
        await idx.close()
        await a.stop()


async def test_a_lookup_in_flight_when_its_registry_is_removed_ends_prefix_blind(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    a = Served("a", streams=False)  # unary: closing its channel cancels the call
    await a.start()
    a.fake.hang = True
    a.fake.expect = 1
    found: list[RegistryEndpoint] | None = [RegistryEndpoint(a.address)]

    async def resolve(target: str) -> list[RegistryEndpoint] | None:
        return found

    monkeypatch.setattr(kv_registries, "resolve_dns", resolve)
    idx = RegistryPrefixIndex([], CFG, 5.0, dns="kv.example:1")
    try:
        await idx.refresh()
        lookup = asyncio.ensure_future(idx.lookup(PROMPT))
        await a.fake.reached.wait()
        found = []
        await idx.refresh()  # closes the channel under the lookup
        # Answered, prefix-blind: the lookup is not cancelled with the call.
        assert (await lookup).matched_blocks == {}
    finally:
        await idx.close()
        await a.stop()


def test_settings_configure_the_index() -> None:
    assert registry_index(OrchestratorSettings(), CFG) is None
    s = OrchestratorSettings(
        kv_registry_address="h1:1", kv_registry_addresses=["h2:2", "h1:1"], kv_registry_dns=None
    )
    idx = registry_index(s, CFG)
    assert idx is not None
    assert idx.addresses == ["h1:1", "h2:2"]
    with pytest.raises(ValueError, match="host:port"):
        OrchestratorSettings(kv_registry_addresses=["nohost"])


def test_registry_lists_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMMESH_ORCHESTRATOR_KV_REGISTRY_ADDRESSES", '["a:1", "b:2"]')
    monkeypatch.setenv("LLMMESH_ORCHESTRATOR_KV_REGISTRY_DNS", "kv.ns.svc:50053")
    s = OrchestratorSettings()
    assert s.kv_registry_addresses == ["a:1", "b:2"]
    assert s.kv_registry_dns == "kv.ns.svc:50053"


async def test_an_update_into_an_empty_queue_lingers_and_takes_the_next_along() -> None:
    # A routing update and, within the linger, the previous request's reuse report: one call.
    served, fake, idx = await batching(linger_s=1.0)
    try:
        routed = asyncio.ensure_future(idx.record_routing("r3", [1, 2]))
        await asyncio.sleep(0.05)  # within the linger: the update is still queued
        assert idx.pending == 1
        assert not fake.entered.is_set()
        reused = asyncio.ensure_future(idx.report_reuse("r3", [1, 2], 2, 64, 3))
        assert await routed == 3
        await reused
        assert fake.batches == [2]
        assert fake.updates == ["routing:r3", "reuse:r3"]
    finally:
        await idx.close()
        await served.stop()


async def test_updates_that_come_during_a_call_wait_the_linger_and_leave_together() -> None:
    # Under load the next batch does not leave as soon as the previous call is answered: it
    # lingers too, so updates arriving meanwhile share one call (at most a call per linger).
    served, fake, idx = await batching(linger_s=1.0)

    async def pending_is(n: int) -> bool:
        return idx.pending == n

    try:
        fake.release.clear()
        first = asyncio.ensure_future(idx.record_routing("r1", [1]))
        await fake.entered.wait()
        second = asyncio.ensure_future(idx.record_routing("r2", [1]))
        await eventually(lambda: pending_is(1), what="r2 queued behind r1's call")
        fake.release.set()
        assert await first == 1
        assert idx.pending == 1  # r2 lingers after r1's answer ...
        third = asyncio.ensure_future(idx.report_reuse("r1", [1], 1, 64, 1))
        assert await second == 2
        await third
        assert fake.batches == [1, 2]  # ... and takes the report along
        assert fake.updates == ["routing:r1", "routing:r2", "reuse:r1"]
    finally:
        await idx.close()
        await served.stop()


async def test_a_full_batch_does_not_linger() -> None:
    served, fake, idx = await batching(linger_s=60.0)
    try:
        n = RegistryPrefixIndex.MAX_BATCH
        routed = [idx.record_routing(f"r{i}", [1]) for i in range(n)]
        # Within 10 s, a 60 s linger: the full batch left at once.
        assert await asyncio.wait_for(asyncio.gather(*routed), 10) == list(range(n))
        assert fake.batches == [n]
    finally:
        await idx.close()
        await served.stop()
