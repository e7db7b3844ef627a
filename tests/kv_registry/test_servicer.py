"""KvRegistryService over a real gRPC channel (settings → core → server on port 0 → stub),
including the engine emulator's own publisher against it."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
import pytest_asyncio
from prometheus_client import CollectorRegistry

from llmmesh.common.server import ManagedServer, ServiceRegistration
from llmmesh.common.settings import KvBlockSettings
from llmmesh.emulator.kv_cache import PagedKvCache
from llmmesh.emulator.publisher import KvEventPublisher
from llmmesh.generated.kvregistry.v1 import kvregistry_pb2 as pb
from llmmesh.generated.kvregistry.v1 import kvregistry_pb2_grpc as pb_grpc
from llmmesh.kvblocks import BlockConfig, block_hashes, new_epoch
from services.kv_registry.contracts import ChangeKind, ExactChange, Stored
from services.kv_registry.core import KvRegistry
from services.kv_registry.metrics import PrometheusMetrics
from services.kv_registry.servicer import (
    UPDATE_BLOCKS,
    YIELD_BLOCKS,
    KvRegistryServicer,
    Watcher,
    broadcast,
    run_maintenance,
    update_messages,
)
from services.kv_registry.settings import KvRegistrySettings

BLOCKS = KvBlockSettings(block_size=4, hash_seed=9)
CFG = BLOCKS.block_config()
PROMPT = list(range(300, 318))  # 4 full blocks + 2 tokens
HASHES = block_hashes(PROMPT, CFG)
SERVICE = pb.DESCRIPTOR.services_by_name["KvRegistryService"].full_name
TRACEPARENT = "00-" + "1" * 32 + "-" + "2" * 16 + "-01"  # W3C trace context of a caller


@dataclass
class Registry:
    stub: pb_grpc.KvRegistryServiceAsyncStub
    core: KvRegistry
    address: str
    servicer: KvRegistryServicer


@pytest_asyncio.fixture
async def registry(request: pytest.FixtureRequest) -> AsyncIterator[Registry]:
    """Indirect parameter: the servicer's `watch_backlog` (default: the setting's)."""
    settings = KvRegistrySettings(
        grpc_port=0, max_entries=10_000, predicted_capacity=100, maintenance_interval_s=0.01
    )
    metrics = PrometheusMetrics(CollectorRegistry())
    core = KvRegistry(settings, BLOCKS.block_config(), clock=time.monotonic, metrics=metrics)
    servicer = KvRegistryServicer(core, getattr(request, "param", settings.watch_backlog))
    server = ManagedServer(
        host="127.0.0.1",
        port=settings.grpc_port,
        services=[
            ServiceRegistration(
                SERVICE, lambda s: pb_grpc.add_KvRegistryServiceServicer_to_server(servicer, s)
            )
        ],
        drain_seconds=0,
    )
    port = await server.start()
    maintenance = asyncio.create_task(
        run_maintenance(core, settings.maintenance_interval_s, settings.maintenance_batch)
    )
    address = f"127.0.0.1:{port}"
    async with grpc.aio.insecure_channel(address) as channel:
        yield Registry(pb_grpc.KvRegistryServiceStub(channel), core, address, servicer)
    maintenance.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await maintenance
    await server.stop()


def stored(seq: int, hashes: list[int]) -> pb.KvEvent:
    ev = pb.KvEvent(sequence=seq)
    ev.stored.blocks.extend(pb.StoredBlock(block_hash=h) for h in hashes)
    return ev


def publish(replica: str, *events: pb.KvEvent, block_size: int = 4) -> pb.PublishEventsRequest:
    return pb.PublishEventsRequest(
        replica_id=replica, epoch="e", block_size=block_size, hash_seed=9, events=events
    )


def summary(resp: pb.LookupResponse) -> list[tuple[str, int, int, int]]:
    return [(m.replica_id, m.matched_blocks, m.matched_tokens, m.source) for m in resp.matches]


@pytest.mark.parametrize(
    "request_",
    [pb.LookupRequest(token_ids=PROMPT), pb.LookupRequest(block_hashes=HASHES)],
    ids=["token_ids", "block_hashes"],
)
async def test_publish_then_lookup(registry: Registry, request_: pb.LookupRequest) -> None:
    resp = await registry.stub.PublishEvents(publish("r0", stored(0, HASHES[:3])))
    assert (resp.next_sequence, resp.resync_required) == (1, False)
    got = await registry.stub.Lookup(request_)
    assert (got.block_size, got.prompt_blocks) == (4, 4)
    assert summary(got) == [("r0", 3, 12, pb.MATCH_SOURCE_EXACT)]


async def test_lookup_stream_answers_each_request_in_order_as_lookup_does(
    registry: Registry,
) -> None:
    await registry.stub.PublishEvents(publish("r0", stored(0, HASHES[:3])))
    await registry.stub.PublishEvents(publish("r1", stored(0, HASHES[:1])))
    requests = [
        pb.LookupRequest(block_hashes=HASHES),
        pb.LookupRequest(block_hashes=HASHES[:1]),
        pb.LookupRequest(block_hashes=[12345]),
        pb.LookupRequest(token_ids=PROMPT, trace_context={"traceparent": TRACEPARENT}),
    ]
    call = registry.stub.LookupStream()  # type: ignore[call-arg]
    for i, r in enumerate(requests):
        r.request_id = 10 + i
        await call.write(r)
    await call.done_writing()
    answers = [a async for a in call]
    assert await call.code() == grpc.StatusCode.OK
    assert [a.request_id for a in answers] == [10, 11, 12, 13]
    for r, a in zip(requests, answers, strict=True):
        a.ClearField("request_id")
        assert a == await registry.stub.Lookup(r)
    assert [summary(a) for a in answers[:3]] == [
        [("r0", 3, 12, pb.MATCH_SOURCE_EXACT), ("r1", 1, 4, pb.MATCH_SOURCE_EXACT)],
        [("r0", 1, 4, pb.MATCH_SOURCE_EXACT), ("r1", 1, 4, pb.MATCH_SOURCE_EXACT)],
        [],
    ]


async def test_lookup_stream_ends_with_the_status_lookup_refuses_with(registry: Registry) -> None:
    call = registry.stub.LookupStream()  # type: ignore[call-arg]
    await call.write(pb.LookupRequest(block_hashes=HASHES[:1]))
    first = await call.read()
    assert isinstance(first, pb.LookupResponse)
    assert first.prompt_blocks == 1
    await call.write(pb.LookupRequest(token_ids=PROMPT, block_hashes=HASHES))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call.read()
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "block_hashes" in (err.value.details() or "")


@pytest.mark.parametrize("rpc", ["Lookup", "RecordRouting", "ReportReuse"])
@pytest.mark.parametrize("by", ["block_hashes", "token_ids"])
async def test_a_prompt_over_max_prompt_blocks_is_refused(
    registry: Registry, rpc: str, by: str
) -> None:
    most = KvRegistrySettings().max_prompt_blocks
    bs = CFG.block_size
    # At the bound it is served; one block over it is refused before any hashing or indexing.
    for blocks, refused in ((most, False), (most + 1, True)):
        call = getattr(registry.stub, rpc)
        if rpc == "Lookup":
            request: pb.LookupRequest | pb.RecordRoutingRequest | pb.ReportReuseRequest = (
                pb.LookupRequest()
            )
        elif rpc == "RecordRouting":
            request = pb.RecordRoutingRequest(replica_id="r1")
        else:
            request = pb.ReportReuseRequest(replica_id="r1", reported_reused_blocks=0)
        if by == "block_hashes":
            request.block_hashes.extend(range(1, blocks + 1))
        else:
            request.token_ids.extend([7] * (blocks * bs))
        if not refused:
            await call(request)
            continue
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call(request)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert f"max_prompt_blocks={most}" in (err.value.details() or "")


async def test_drain_ends_open_lookup_streams(registry: Registry) -> None:
    """A draining registry ends its streams at once (callers fail over) instead of holding
    them for the whole grace period."""
    call = registry.stub.LookupStream()  # type: ignore[call-arg]
    await call.write(pb.LookupRequest(block_hashes=HASHES))
    await call.read()
    assert registry.servicer.open_streams == 1
    await registry.servicer.end_streams()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call.read()
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    await eventually(lambda: registry.servicer.open_streams == 0, "the handler to end")
    late = registry.stub.LookupStream()  # type: ignore[call-arg]  # one opened while draining ends at once
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await late.read()
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def watch(registry: Registry, cfg: BlockConfig = CFG) -> WatchCall:
    return registry.stub.WatchExact(
        pb.WatchExactRequest(block_size=cfg.block_size, hash_seed=cfg.hash_seed)
    )


WatchCall = grpc.aio.UnaryStreamCall[pb.WatchExactRequest, pb.ExactIndexUpdate]
KIND = pb.ExactChange


def changes(update: pb.ExactIndexUpdate) -> list[tuple[str, int, list[int]]]:
    return [(c.replica_id, c.kind, list(c.block_hashes)) for c in update.changes]


async def read_to_end(call: WatchCall) -> None:
    while await call.read() is not grpc.aio.EOF:  # type: ignore[attr-defined]
        pass


async def snapshot(call: WatchCall) -> list[tuple[str, int, list[int]]]:
    out: list[tuple[str, int, list[int]]] = []
    while True:
        update = await call.read()
        assert isinstance(update, pb.ExactIndexUpdate)
        out += changes(update)
        if update.synced:
            return out


async def test_watch_exact_sends_a_snapshot_then_each_change(registry: Registry) -> None:
    await registry.stub.PublishEvents(publish("r0", stored(0, HASHES[:2])))
    await registry.stub.RecordRouting(  # a predicted replica is not in the exact index
        pb.RecordRoutingRequest(replica_id="p", block_hashes=HASHES)
    )
    call = watch(registry)
    assert await snapshot(call) == [
        ("r0", KIND.KIND_CLEARED, []),
        ("r0", KIND.KIND_STORED, HASHES[:2]),
    ]
    assert registry.servicer.watchers == 1
    removed = pb.KvEvent(sequence=2)
    removed.removed.block_hashes.append(HASHES[0])
    await registry.stub.PublishEvents(publish("r0", stored(1, HASHES[2:3]), removed))
    update = await call.read()
    assert isinstance(update, pb.ExactIndexUpdate)
    assert not update.synced
    assert changes(update) == [
        ("r0", KIND.KIND_STORED, HASHES[2:3]),
        ("r0", KIND.KIND_REMOVED, HASHES[:1]),
    ]
    await registry.stub.DropReplica(pb.DropReplicaRequest(replica_id="r0"))
    update = await call.read()
    assert isinstance(update, pb.ExactIndexUpdate)
    assert changes(update) == [("r0", KIND.KIND_GONE, [])]
    call.cancel()
    await eventually(lambda: registry.servicer.watchers == 0, "the watch to end")


async def test_watch_exact_refuses_another_block_identity(registry: Registry) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await watch(registry, BlockConfig(CFG.block_size, CFG.hash_seed + 1)).read()
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "hash_seed" in (err.value.details() or "")


@pytest.mark.parametrize("registry", [1], indirect=True)
async def test_a_watcher_that_falls_behind_is_ended(registry: Registry) -> None:
    """Changes beyond its backlog end the watch (RESOURCE_EXHAUSTED) instead of buffering."""
    call = watch(registry)
    assert await snapshot(call) == []
    for seq in range(3):  # three changing calls, with no chance for the handler to write
        registry.core.ingest("r0", "e", CFG, [Stored(seq, (HASHES[seq],))])
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await read_to_end(call)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    await eventually(lambda: registry.servicer.watchers == 0, "the watch to end")


@pytest.mark.parametrize("registry", [1], indirect=True)
async def test_a_watcher_that_falls_behind_during_a_write_it_takes_is_told_why(
    registry: Registry,
) -> None:
    """The overflow comes while the handler is in a write the caller takes: the write ends and
    the call ends RESOURCE_EXHAUSTED, not cancelled with no status (the caller would wait for
    one for ever)."""
    gate = asyncio.Event()
    in_write = asyncio.Event()

    class Aborted(Exception):
        pass

    class Call:  # the handler called directly, as the server would; its writes wait at `gate`
        async def write(self, msg: pb.ExactIndexUpdate) -> None:
            in_write.set()
            await gate.wait()

        async def abort(self, code: grpc.StatusCode, details: str) -> None:
            raise Aborted(code)

    call: Any = Call()
    handler = asyncio.ensure_future(
        registry.servicer.WatchExact(
            pb.WatchExactRequest(block_size=CFG.block_size, hash_seed=CFG.hash_seed), call
        )
    )
    await in_write.wait()  # the snapshot's end (synced), not taken yet
    for seq in range(3):
        registry.core.ingest("r0", "e", CFG, [Stored(seq, (HASHES[seq],))])
    gate.set()  # the caller takes it
    with pytest.raises(Aborted) as err:
        await handler
    assert err.value.args == (grpc.StatusCode.RESOURCE_EXHAUSTED,)


@pytest.mark.parametrize("registry", [50_000], indirect=True)
async def test_a_watcher_that_stops_reading_is_ended_in_the_middle_of_a_write(
    registry: Registry,
) -> None:
    """A caller that keeps its connection but reads nothing blocks the handler's write (flow
    control): its overflow still ends the watch, not only the next wait."""
    call = watch(registry)
    assert await snapshot(call) == []
    [watcher] = registry.servicer._watchers
    seq = 0
    chunk = 2_000  # hashes a change (and as many evicted: the registry holds 10,000)
    while not watcher.overflowed:  # the caller's window fills, then the backlog
        assert seq < 2_000, "the writes never blocked"
        hashes = tuple(range(1 + seq * chunk, 1 + (seq + 1) * chunk))
        registry.core.ingest("r0", "e", CFG, [Stored(seq, hashes)])
        seq += 1
        for _ in range(20):  # the handler writes what the caller's window takes
            await asyncio.sleep(0)
    assert seq > 50  # it wrote before it fell behind
    await eventually(lambda: registry.servicer.watchers == 0, "the stalled watch to end")
    call.cancel()


async def test_drain_ends_watches(registry: Registry) -> None:
    call = watch(registry)
    await snapshot(call)
    await registry.servicer.end_streams()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call.read()
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_updates_come_in_bounded_messages() -> None:
    big = [ExactChange("r0", ChangeKind.CLEARED), ExactChange("r0", ChangeKind.STORED)]
    big[1].block_hashes.extend(range(1, 2 * UPDATE_BLOCKS + 2))
    messages = update_messages(big)
    assert len(messages) == 3
    assert all(sum(len(c.block_hashes) for c in m.changes) <= UPDATE_BLOCKS for m, _ in messages)
    rebuilt = [h for m, _ in messages for c in m.changes for h in c.block_hashes]
    assert rebuilt == big[1].block_hashes
    assert sum(w for _, w in messages) == len(rebuilt) + 4  # hashes plus one per change part
    assert update_messages([]) == []


def test_a_watcher_queues_only_what_its_snapshot_will_not_hold() -> None:
    """Changes of a replica whose snapshot is still to come are dropped (the snapshot, taken
    later, holds them); the others' are queued."""
    w = Watcher(["r1"], 100)
    broadcast(
        [w],
        [ExactChange("r0", ChangeKind.STORED, [1]), ExactChange("r1", ChangeKind.STORED, [2])],
    )
    assert [changes(m) for m in w.backlog] == [[("r0", KIND.KIND_STORED, [1])]]
    w.pending.clear()
    broadcast([w], [ExactChange("r1", ChangeKind.REMOVED, [2])])
    assert changes(w.backlog[-1]) == [("r1", KIND.KIND_REMOVED, [2])]


async def test_gap_asks_for_resync(registry: Registry) -> None:
    await registry.stub.PublishEvents(publish("r0", stored(0, HASHES[:1])))
    resp = await registry.stub.PublishEvents(publish("r0", stored(4, HASHES[1:2])))
    assert (resp.next_sequence, resp.resync_required) == (1, True)
    snapshot = pb.KvEvent(sequence=7)
    snapshot.cleared.SetInParent()
    resp = await registry.stub.PublishEvents(publish("r0", snapshot, stored(8, HASHES)))
    assert (resp.next_sequence, resp.resync_required) == (9, False)


async def test_a_replaced_engine_lifetime_is_refused_failed_precondition(
    registry: Registry,
) -> None:
    first, second = new_epoch(1_000_000_000), new_epoch(2_000_000_000)
    request = publish("r0", stored(0, HASHES))
    request.epoch = second
    await registry.stub.PublishEvents(request)
    late = publish("r0", stored(5, HASHES[:1]))
    late.epoch = first
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await registry.stub.PublishEvents(late)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert registry.core.block_count("r0") == len(HASHES)


async def test_a_heartbeat_out_of_step_asks_for_resync(registry: Registry) -> None:
    beat = publish("r-idle")
    beat.next_sequence = 12  # an engine this registry never heard from (it restarted)
    resp = await registry.stub.PublishEvents(beat)
    assert (resp.next_sequence, resp.resync_required) == (0, True)
    resp = await registry.stub.PublishEvents(publish("r-idle"))  # no heartbeat: nothing to judge
    assert resp.resync_required  # still waiting for the snapshot


async def test_approximate_mode_round_trip(registry: Registry) -> None:
    stub = registry.stub
    routed = await stub.RecordRouting(pb.RecordRoutingRequest(replica_id="p0", token_ids=PROMPT))
    assert (
        routed.prompt_blocks,
        routed.predicted_blocks,
        routed.source,
        routed.recorded_blocks,
    ) == (4, 0, pb.MATCH_SOURCE_PREDICTED, 4)
    got = await stub.Lookup(pb.LookupRequest(token_ids=PROMPT))
    assert summary(got) == [("p0", 4, 16, pb.MATCH_SOURCE_PREDICTED)]
    again = await stub.RecordRouting(
        pb.RecordRoutingRequest(replica_id="p0", block_hashes=HASHES, ttl_s=30)
    )
    assert again.predicted_blocks == 4
    report = await stub.ReportReuse(
        pb.ReportReuseRequest(
            replica_id="p0",
            block_hashes=HASHES,
            prompt_tokens=len(PROMPT),
            reported_reused_blocks=2,
            predicted_blocks=again.predicted_blocks,
        )
    )
    assert (
        report.reusable_blocks,
        report.predicted_blocks,
        report.reported_reused_blocks,
        report.source,
        report.predicted_capacity,
    ) == (4, 4, 2, pb.MATCH_SOURCE_PREDICTED, 87)
    dropped = await stub.DropReplica(pb.DropReplicaRequest(replica_id="p0"))
    assert dropped.dropped
    assert not (await stub.DropReplica(pb.DropReplicaRequest(replica_id="p0"))).dropped
    assert not (await stub.Lookup(pb.LookupRequest(token_ids=PROMPT))).matches


async def test_a_batch_of_long_prompts_lets_a_lookup_through_between_its_updates(
    registry: Registry,
) -> None:
    """Applying a batch yields to the loop every YIELD_BLOCKS hashes: a lookup that arrives
    meanwhile is answered between two updates, not after the whole batch."""
    order: list[str] = []
    routed = asyncio.Event()
    record, lookup = registry.core.record_routing, registry.core.lookup_hashes

    def recorded(*args: Any, **kw: Any) -> Any:
        order.append("route")
        routed.set()
        return record(*args, **kw)

    def looked_up(*args: Any, **kw: Any) -> Any:
        order.append("lookup")
        return lookup(*args, **kw)

    registry.core.record_routing = recorded  # type: ignore[method-assign]
    registry.core.lookup_hashes = looked_up  # type: ignore[method-assign]
    long = list(range(1, YIELD_BLOCKS + 1))
    batch = pb.UpdateBatchRequest(
        updates=[
            pb.RegistryUpdate(
                routing=pb.RecordRoutingRequest(replica_id=f"p{i}", block_hashes=long)
            )
            for i in range(2)
        ]
    )

    class Call:  # the servicer's handlers called directly, as the server would
        def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
            return ()

    call: Any = Call()
    applying = asyncio.ensure_future(registry.servicer.UpdateBatch(batch, call))
    await routed.wait()  # the first update is applied; the batch yields
    await registry.servicer.Lookup(pb.LookupRequest(block_hashes=HASHES), call)
    resp = await applying
    assert list(resp.predicted_blocks) == [0, 0]
    assert order == ["route", "lookup", "route"]


async def test_a_batch_begun_is_applied_whole_when_its_call_ends(registry: Registry) -> None:
    """Its deadline passes (or its caller cancels) at a yield between two updates: the rest of
    the batch, the drop at its end included, is still applied (its sender does not resend)."""
    await registry.stub.RecordRouting(
        pb.RecordRoutingRequest(replica_id="victim", block_hashes=HASHES)
    )
    routed: list[str] = []
    first = asyncio.Event()
    record = registry.core.record_routing

    def recorded(replica_id: str, *args: Any, **kw: Any) -> Any:
        routed.append(replica_id)
        first.set()
        return record(replica_id, *args, **kw)

    registry.core.record_routing = recorded  # type: ignore[method-assign]
    long = list(range(1, YIELD_BLOCKS + 1))
    updates = [
        pb.RegistryUpdate(routing=pb.RecordRoutingRequest(replica_id=f"p{i}", block_hashes=long))
        for i in range(3)
    ]
    updates.append(pb.RegistryUpdate(drop=pb.DropReplicaRequest(replica_id="victim")))
    call: Any = object()
    applying = asyncio.ensure_future(
        registry.servicer.UpdateBatch(pb.UpdateBatchRequest(updates=updates), call)
    )
    await first.wait()  # the first update is applied; the batch yields
    applying.cancel()  # as gRPC cancels the handler of a call whose deadline passed
    with pytest.raises(asyncio.CancelledError):
        await applying
    await registry.servicer.applied()
    assert routed == ["p0", "p1", "p2"]
    assert "victim" not in registry.core.replica_ids()


async def test_update_batch_applies_in_order_and_skips_refused_updates(
    registry: Registry,
) -> None:
    def routing(replica: str) -> pb.RegistryUpdate:
        return pb.RegistryUpdate(
            routing=pb.RecordRoutingRequest(replica_id=replica, block_hashes=HASHES)
        )

    resp = await registry.stub.UpdateBatch(
        pb.UpdateBatchRequest(
            updates=[
                routing("p0"),
                routing(""),  # refused by RecordRouting: skipped, the rest applies
                routing("p0"),  # sees the first one's prediction
                pb.RegistryUpdate(
                    reuse=pb.ReportReuseRequest(
                        replica_id="p0",
                        block_hashes=HASHES,
                        prompt_tokens=len(PROMPT),
                        reported_reused_blocks=2,
                        predicted_blocks=4,
                    )
                ),
                routing("p1"),
                pb.RegistryUpdate(drop=pb.DropReplicaRequest(replica_id="p1")),
                pb.RegistryUpdate(),  # no kind
            ]
        )
    )
    assert list(resp.predicted_blocks) == [0, 0, 4, 0]
    assert resp.rejected == 2
    got = await registry.stub.Lookup(pb.LookupRequest(block_hashes=HASHES))
    assert [m.replica_id for m in got.matches] == ["p0"]  # p1 recorded, then dropped
    # The reported prompt's own entries are kept by the correction.
    routed = await registry.stub.RecordRouting(
        pb.RecordRoutingRequest(replica_id="p0", block_hashes=HASHES)
    )
    assert routed.predicted_blocks == 4


async def test_report_for_an_exact_replica_only_counts(registry: Registry) -> None:
    await registry.stub.PublishEvents(publish("r0", stored(0, HASHES)))
    report = await registry.stub.ReportReuse(
        pb.ReportReuseRequest(replica_id="r0", token_ids=PROMPT, reported_reused_blocks=4)
    )
    assert (report.predicted_blocks, report.reported_reused_blocks, report.source) == (
        4,
        4,
        pb.MATCH_SOURCE_EXACT,
    )


async def test_a_batch_over_the_event_bound_is_refused_before_it_is_converted(
    registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    def unreached(_: object) -> None:
        raise AssertionError("converted")

    monkeypatch.setattr("services.kv_registry.servicer.event_from_pb", unreached)
    request = publish("r0")
    for seq in range(KvRegistrySettings().max_events_per_request + 1):
        request.events.add(sequence=seq).cleared.SetInParent()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await registry.stub.PublishEvents(request)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "events" in (err.value.details() or "")


@pytest.mark.parametrize(
    ("call", "detail"),
    [
        (
            lambda s: s.Lookup(pb.LookupRequest(token_ids=PROMPT, block_hashes=HASHES)),
            "block_hashes",
        ),
        (lambda s: s.PublishEvents(publish("r0", block_size=8)), "block_size"),
        (lambda s: s.PublishEvents(publish("", stored(0, HASHES))), "replica_id"),
        (lambda s: s.RecordRouting(pb.RecordRoutingRequest(token_ids=PROMPT)), "replica_id"),
        (
            lambda s: s.RecordRouting(
                pb.RecordRoutingRequest(replica_id="p0", token_ids=PROMPT, ttl_s=-1)
            ),
            "ttl_s",
        ),
        (lambda s: s.ReportReuse(pb.ReportReuseRequest(token_ids=PROMPT)), "replica_id"),
        (lambda s: s.DropReplica(pb.DropReplicaRequest()), "replica_id"),
        # The largest uint64: the next expected sequence, answered back, would not fit.
        (lambda s: s.PublishEvents(publish("r0", stored(2**64 - 1, HASHES))), "sequence"),
        (lambda s: s.WatchExact(pb.WatchExactRequest(block_size=0)).read(), "block_size"),
    ],
)
async def test_invalid_arguments(
    registry: Registry,
    call: Callable[[pb_grpc.KvRegistryServiceAsyncStub], object],
    detail: str,
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call(registry.stub)  # type: ignore[misc]
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert detail in (err.value.details() or "")


async def eventually(check: Callable[[], bool], what: str, timeout_s: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def test_engine_publisher_and_lookup_agree(registry: Registry) -> None:
    """The emulator's KV cache and publisher (snapshot at start, then its event stream) against
    the real service: the registry's lookup is the engine's own prefix match."""
    cache = PagedKvCache(12, CFG)
    publisher = KvEventPublisher(
        registry.address,
        replica_id="engine-0",
        epoch="boot-1",
        block_config=BlockConfig(CFG.block_size, CFG.hash_seed),
        snapshot=cache.snapshot,
        interval_s=0.001,
    )
    publisher.start()
    try:
        prompts = [[i * 1000 + t for t in range(4 * (i % 3 + 1) + 1)] for i in range(8)]
        for i, prompt in enumerate(prompts):  # 8 prompts through a 12-block cache: evictions
            assert cache.try_admit(f"s{i}", prompt, 2) is not None
            publisher.publish(cache.drain_events())
            cache.release(f"s{i}")

        def engine(prompt: list[int]) -> int:
            hashes = block_hashes(prompt, CFG)
            return next((i for i, h in enumerate(hashes) if not cache.is_cached(h)), len(hashes))

        def agree() -> bool:
            return (
                all(
                    {m.replica_id: m.matched_blocks for m in registry.core.lookup(p).matches}
                    == ({"engine-0": engine(p)} if engine(p) else {})
                    for p in prompts
                )
                and registry.core.block_count("engine-0") == cache.num_cached
            )

        await eventually(agree, "registry in sync with the engine")
        assert any(engine(p) == 0 for p in prompts)  # some prompts were evicted
        assert any(engine(p) > 0 for p in prompts)
    finally:
        await asyncio.to_thread(publisher.stop)
