"""gRPC adapter: protobuf ↔ registry core."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from typing import TypeVar

import grpc
from opentelemetry import trace
from opentelemetry.trace import SpanKind

from llmmesh.common.errors import InvalidArgument, ServiceError, abort
from llmmesh.common.telemetry import extract_trace_context
from llmmesh.generated.kvregistry.v1 import kvregistry_pb2 as pb
from llmmesh.generated.kvregistry.v1 import kvregistry_pb2_grpc as pb_grpc
from llmmesh.kvblocks import BlockConfig
from services.kv_registry.contracts import (
    ChangeKind,
    Cleared,
    Event,
    ExactChange,
    Removed,
    Source,
    Stored,
)
from services.kv_registry.core import KvRegistry
from services.kv_registry.errors import BlockConfigMismatch

Ctx = grpc.aio.ServicerContext[object, object]
Req = TypeVar("Req")
Resp = TypeVar("Resp")


async def _answer(apply: Callable[[Req], Resp], request: Req, context: Ctx) -> Resp:
    """`apply(request)`, its ServiceError aborting the call (the update RPCs, which UpdateBatch
    applies too)."""
    try:
        return apply(request)
    except ServiceError as err:
        await abort(context, err)
        raise


log = logging.getLogger(__name__)
_tracer = trace.get_tracer("llmmesh.kv_registry")

SOURCE_PB = {Source.EXACT: pb.MATCH_SOURCE_EXACT, Source.PREDICTED: pb.MATCH_SOURCE_PREDICTED}


def event_from_pb(ev: pb.KvEvent) -> Event:
    # Hot path of PublishEvents (a snapshot is one event per block): `stored` first, one
    # wrapper per field access, no generator.
    if ev.HasField("stored"):
        stored = ev.stored
        blocks = stored.blocks
        if len(blocks) == 1:
            hashes: tuple[int, ...] = (blocks[0].block_hash,)
        else:
            hashes = tuple([b.block_hash for b in blocks])
        parent = stored.parent_hash if stored.HasField("parent_hash") else None
        return Stored(ev.sequence, hashes, parent)
    if ev.HasField("removed"):
        return Removed(ev.sequence, tuple(ev.removed.block_hashes))
    if ev.HasField("cleared"):
        return Cleared(ev.sequence)
    raise BlockConfigMismatch(f"event {ev.sequence} has no kind", field="events")


def prompt_hashes(
    core: KvRegistry, token_ids: Sequence[int], block_hashes: Sequence[int]
) -> Sequence[int]:
    """The prompt's block hashes from whichever of the two fields is set (`check_prompt`)."""
    core.check_prompt(len(token_ids), len(block_hashes))
    if len(block_hashes):
        if len(token_ids):
            raise InvalidArgument("set token_ids or block_hashes, not both", field="block_hashes")
        return list(block_hashes)
    return core.hash_tokens(token_ids)


CHANGE_KIND_PB = {
    ChangeKind.STORED: pb.ExactChange.KIND_STORED,
    ChangeKind.REMOVED: pb.ExactChange.KIND_REMOVED,
    ChangeKind.CLEARED: pb.ExactChange.KIND_CLEARED,
    ChangeKind.GONE: pb.ExactChange.KIND_GONE,
}
UPDATE_BLOCKS = 32_768  # block hashes per WatchExact message (~300 KB on the wire)
# Block hashes an UpdateBatch applies between two yields to the event loop (~10 ms of work).
YIELD_BLOCKS = 8192
# How long a watcher that overflowed while its handler was in a write may take to finish that
# write before the handler is cancelled: a caller reading finishes it in a moment and is told
# why its watch ends (RESOURCE_EXHAUSTED); only a caller that stopped reading, whose write
# waits on flow control for ever, is cut without a status.
WRITE_GRACE_S = 1.0


def _blocks(update: pb.RegistryUpdate, kind: str | None) -> int:
    """The prompt size an update carries, in blocks or tokens (a bound on its work)."""
    if kind == "routing":
        return len(update.routing.block_hashes) + len(update.routing.token_ids)
    if kind == "reuse":
        return len(update.reuse.block_hashes) + len(update.reuse.token_ids)
    return 0


def change_to_pb(c: ExactChange, hashes: Sequence[int]) -> pb.ExactChange:
    return pb.ExactChange(replica_id=c.replica_id, kind=CHANGE_KIND_PB[c.kind], block_hashes=hashes)


def update_messages(changes: Iterable[ExactChange]) -> list[tuple[pb.ExactIndexUpdate, int]]:
    """Changes, in order, as messages of at most `UPDATE_BLOCKS` hashes (a long change is split),
    each with its weight: hashes plus changes (what a watcher's backlog bound counts)."""
    out: list[tuple[pb.ExactIndexUpdate, int]] = []
    batch: list[pb.ExactChange] = []
    size = 0
    for c in changes:
        hashes = c.block_hashes
        for at in range(0, max(len(hashes), 1), UPDATE_BLOCKS):
            part = hashes[at : at + UPDATE_BLOCKS]
            if batch and size + len(part) > UPDATE_BLOCKS:
                out.append((pb.ExactIndexUpdate(changes=batch), size + len(batch)))
                batch, size = [], 0
            batch.append(change_to_pb(c, part))
            size += len(part)
    if batch:
        out.append((pb.ExactIndexUpdate(changes=batch), size + len(batch)))
    return out


class Watcher:
    """One WatchExact caller. `pending`: the exact replicas whose snapshot it has not been sent
    yet; their changes are not queued (the snapshot, taken later, holds them). `backlog`: the
    changes of the others, to send after the snapshot, bounded by weight (`update_messages`):
    changes beyond `limit` end the watch (`overflowed`) instead of growing it."""

    def __init__(self, pending: Iterable[str], limit: int) -> None:
        self.pending = set(pending)
        self.backlog: deque[pb.ExactIndexUpdate] = deque()
        self._weights: deque[int] = deque()
        self._weight = 0
        self._limit = limit
        self.overflowed = False
        self.ready = asyncio.Event()
        # The task writing to this caller, and whether it is in a write: a write to a caller
        # that stopped reading waits on flow control forever, so an overflow then cancels it
        # once the write has had `WRITE_GRACE_S` to end (cancelled in a write whose message the
        # caller already took, the handler would end the call with no status: the caller waits
        # for one for ever).
        self.writer: asyncio.Task[object] | None = None
        self.writing = False

    def offer(self, messages: list[tuple[pb.ExactIndexUpdate, int]]) -> None:
        if self.overflowed or not messages:
            return
        for msg, weight in messages:
            self.backlog.append(msg)
            self._weights.append(weight)
            self._weight += weight
        if self._weight > self._limit:
            self.end()
        self.ready.set()

    def end(self) -> None:
        if self.overflowed:
            return
        self.overflowed = True
        self.backlog.clear()
        self._weights.clear()
        self.ready.set()
        if self.writing and self.writer is not None:
            asyncio.get_running_loop().call_later(WRITE_GRACE_S, self._cut, self.writer)

    def _cut(self, writer: asyncio.Task[object]) -> None:
        """Cancel the handler still in a write it began before the overflow."""
        if self.writing and self.writer is writer:
            writer.cancel()

    def take(self) -> pb.ExactIndexUpdate:
        self._weight -= self._weights.popleft()
        return self.backlog.popleft()


async def _write(context: Ctx, watcher: Watcher, msg: pb.ExactIndexUpdate) -> None:
    watcher.writing = True
    try:
        await context.write(msg)
    finally:
        watcher.writing = False


def broadcast(watchers: Iterable[Watcher], changes: list[ExactChange]) -> None:
    """Queue changes the registry just applied for each watcher (what its snapshot will not
    hold). Never raises: the engine's call that made the changes succeeded."""
    shared: list[tuple[pb.ExactIndexUpdate, int]] | None = None
    for w in watchers:
        if w.overflowed:
            continue  # its watch is ending: nothing more is sent
        try:
            if w.pending:
                w.offer(update_messages(c for c in changes if c.replica_id not in w.pending))
            else:
                if shared is None:
                    shared = update_messages(changes)
                w.offer(shared)
        except Exception:
            log.exception("WatchExact update failed; ending the watch")
            w.end()


class KvRegistryServicer(pb_grpc.KvRegistryServiceServicer):
    def __init__(self, core: KvRegistry, watch_backlog: int):
        """`watch_backlog`: changes buffered per WatchExact caller (block hashes, plus one per
        change)."""
        self._core = core
        self._streams: set[asyncio.Task[object]] = set()  # open LookupStream/WatchExact handlers
        self._ending = False  # end_streams was called: streams end UNAVAILABLE
        self._watchers: set[Watcher] = set()
        self._watch_backlog = watch_backlog
        self._batches: set[asyncio.Future[pb.UpdateBatchResponse]] = set()  # being applied

    async def PublishEvents(
        self, request: pb.PublishEventsRequest, context: Ctx
    ) -> pb.PublishEventsResponse:
        try:
            if request.block_size == 0:
                raise BlockConfigMismatch("must be positive", field="block_size")
            cfg = BlockConfig(request.block_size, request.hash_seed)
            self._core.check_batch(len(request.events))  # before any is converted
            events = [event_from_pb(e) for e in request.events]
            heartbeat = request.next_sequence if request.HasField("next_sequence") else None
            res = self._core.ingest(request.replica_id, request.epoch, cfg, events, heartbeat)
        except ServiceError as err:
            await abort(context, err)
            raise
        return pb.PublishEventsResponse(
            next_sequence=res.next_sequence, resync_required=res.resync_required
        )

    async def Lookup(self, request: pb.LookupRequest, context: Ctx) -> pb.LookupResponse:
        return await self._traced_lookup(request, context, context.invocation_metadata())

    async def _traced_lookup(
        self,
        request: pb.LookupRequest,
        context: Ctx,
        carrier: Iterable[tuple[str, str | bytes]] | None,
    ) -> pb.LookupResponse:
        """`_lookup` in a server span, child of the caller's span found in `carrier`."""
        with _tracer.start_as_current_span(
            "kv_registry.lookup", context=extract_trace_context(carrier), kind=SpanKind.SERVER
        ):
            return await self._lookup(request, context)

    async def LookupStream(  # type: ignore[override]  # writes through `context`, returns None
        self, request_iterator: AsyncIterator[pb.LookupRequest], context: Ctx
    ) -> None:
        """Each request answered in order, as `Lookup` answers it; a refused one ends the stream
        with its status; `end_streams` (drain) ends them all. The caller's span comes in the
        request (`trace_context`)."""
        if self.draining():
            await context.abort(grpc.StatusCode.UNAVAILABLE, "kv_registry is draining")
        task = asyncio.current_task()
        if task is not None:
            self._streams.add(task)
        # Reads and writes through `context` (not an async generator), so a cancel from
        # `end_streams` always lands in this code, which ends the call with its status.
        try:
            while True:
                request = await context.read()
                if request is grpc.aio.EOF:  # type: ignore[attr-defined]
                    return
                assert isinstance(request, pb.LookupRequest)
                if request.trace_context:
                    carrier = request.trace_context.items()
                    response = await self._traced_lookup(request, context, carrier)
                else:
                    response = await self._lookup(request, context)
                response.request_id = request.request_id
                await context.write(response)
        except asyncio.CancelledError:
            if not self.draining():
                raise  # the caller went away
            await context.abort(grpc.StatusCode.UNAVAILABLE, "kv_registry is draining")
        finally:
            if task is not None:
                self._streams.discard(task)

    async def WatchExact(  # type: ignore[override]  # writes through `context`, returns None
        self, request: pb.WatchExactRequest, context: Ctx
    ) -> None:
        """The snapshot, then every change, until the caller leaves, falls `watch_backlog`
        updates behind (RESOURCE_EXHAUSTED) or the registry drains (UNAVAILABLE)."""
        if self.draining():
            await context.abort(grpc.StatusCode.UNAVAILABLE, "kv_registry is draining")
        try:
            theirs = BlockConfig(request.block_size, request.hash_seed)
        except ValueError as err:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"block_size: {err}")
        if theirs != self._core.block_config:
            ours = self._core.block_config
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"watcher uses block_size={theirs.block_size} hash_seed={theirs.hash_seed}, "
                f"registry uses block_size={ours.block_size} hash_seed={ours.hash_seed}",
            )
        # Registered before the snapshot: a replica's changes queue from the moment its own
        # snapshot is taken (one step each, so none falls between), later ones are dropped
        # before (`Watcher.pending`). The event loop is held for one replica at a time.
        watcher = Watcher(self._core.exact_replicas(), self._watch_backlog)
        if not self._watchers:
            self._core.on_exact_changes(self._broadcast)
        self._watchers.add(watcher)
        task = asyncio.current_task()
        if task is not None:
            self._streams.add(task)
        watcher.writer = task
        try:
            for rid in sorted(watcher.pending):
                snapshot = self._core.exact_snapshot(rid)
                watcher.pending.discard(rid)
                for msg, _ in update_messages(snapshot):
                    if watcher.overflowed:
                        break
                    await _write(context, watcher, msg)
            if not watcher.overflowed:
                await _write(context, watcher, pb.ExactIndexUpdate(synced=True))
            while True:
                await watcher.ready.wait()
                if watcher.overflowed:
                    await context.abort(
                        grpc.StatusCode.RESOURCE_EXHAUSTED,
                        f"watcher fell more than {self._watch_backlog} blocks behind; watch again",
                    )
                if not watcher.backlog:
                    watcher.ready.clear()
                    continue
                await _write(context, watcher, watcher.take())
        except asyncio.CancelledError:
            if not self.draining():
                # The caller went away, or fell behind while not reading (`Watcher.end`): no
                # status can pass the write it left pending; the call is cancelled.
                raise
            await context.abort(grpc.StatusCode.UNAVAILABLE, "kv_registry is draining")
        finally:
            self._watchers.discard(watcher)
            if not self._watchers:
                self._core.on_exact_changes(None)
            if task is not None:
                self._streams.discard(task)

    def _broadcast(self, changes: list[ExactChange]) -> None:
        broadcast(self._watchers, changes)

    @property
    def watchers(self) -> int:
        return len(self._watchers)

    def draining(self) -> bool:
        """`end_streams` was called."""
        return self._ending

    @property
    def open_streams(self) -> int:
        return len(self._streams)

    async def end_streams(self) -> None:
        """End every open LookupStream and WatchExact (UNAVAILABLE), now and as they open: a draining registry
        holds no caller for the whole grace period; callers fail over to another replica."""
        self._ending = True
        for task in list(self._streams):
            task.cancel()

    async def _lookup(self, request: pb.LookupRequest, context: Ctx) -> pb.LookupResponse:
        try:
            if len(request.block_hashes):
                hashes = prompt_hashes(self._core, request.token_ids, request.block_hashes)
                res = self._core.lookup_hashes(hashes)
            else:
                self._core.check_prompt(len(request.token_ids), 0)
                res = self._core.lookup(request.token_ids)
        except ServiceError as err:
            await abort(context, err)
            raise
        bs = self._core.block_config.block_size
        return pb.LookupResponse(
            block_size=bs,
            prompt_blocks=res.prompt_blocks,
            matches=[
                pb.ReplicaMatch(
                    replica_id=m.replica_id,
                    matched_blocks=m.matched_blocks,
                    matched_tokens=m.matched_blocks * bs,
                    source=SOURCE_PB[m.source],
                )
                for m in res.matches
            ],
        )

    async def RecordRouting(
        self, request: pb.RecordRoutingRequest, context: Ctx
    ) -> pb.RecordRoutingResponse:
        return await _answer(self._record_routing, request, context)

    def _record_routing(self, request: pb.RecordRoutingRequest) -> pb.RecordRoutingResponse:
        hashes = prompt_hashes(self._core, request.token_ids, request.block_hashes)
        ttl = request.ttl_s if request.HasField("ttl_s") else None
        res = self._core.record_routing(request.replica_id, hashes, ttl_s=ttl)
        return pb.RecordRoutingResponse(
            prompt_blocks=res.prompt_blocks,
            predicted_blocks=res.predicted_blocks,
            source=SOURCE_PB[res.source],
            recorded_blocks=res.recorded_blocks,
        )

    async def ReportReuse(
        self, request: pb.ReportReuseRequest, context: Ctx
    ) -> pb.ReportReuseResponse:
        return await _answer(self._report_reuse, request, context)

    def _report_reuse(self, request: pb.ReportReuseRequest) -> pb.ReportReuseResponse:
        hashes = prompt_hashes(self._core, request.token_ids, request.block_hashes)
        if len(request.token_ids):
            prompt_tokens: int | None = len(request.token_ids)
        elif request.HasField("prompt_tokens"):
            prompt_tokens = request.prompt_tokens
        else:
            prompt_tokens = None
        predicted = request.predicted_blocks if request.HasField("predicted_blocks") else None
        res = self._core.report_reuse(
            request.replica_id,
            hashes,
            request.reported_reused_blocks,
            prompt_tokens=prompt_tokens,
            predicted_blocks=predicted,
        )
        return pb.ReportReuseResponse(
            reusable_blocks=res.reusable_blocks,
            predicted_blocks=res.predicted_blocks,
            reported_reused_blocks=res.reported_reused_blocks,
            source=SOURCE_PB[res.source],
            predicted_capacity=res.predicted_capacity,
            dropped_blocks=res.dropped_blocks,
        )

    async def DropReplica(
        self, request: pb.DropReplicaRequest, context: Ctx
    ) -> pb.DropReplicaResponse:
        return await _answer(self._drop_replica, request, context)

    def _drop_replica(self, request: pb.DropReplicaRequest) -> pb.DropReplicaResponse:
        if not request.replica_id:
            raise InvalidArgument("must be non-empty", field="replica_id")
        return pb.DropReplicaResponse(dropped=self._core.drop_replica(request.replica_id))

    async def UpdateBatch(
        self, request: pb.UpdateBatchRequest, context: Ctx
    ) -> pb.UpdateBatchResponse:
        """Each update in order, as its own RPC would apply it; refused ones are counted. The
        loop is yielded to every `YIELD_BLOCKS` hashes applied: a batch of long prompts does not
        hold up the lookups beside it (their budget is tens of milliseconds). A batch begun is
        applied whole, whatever becomes of its call (a deadline passing at a yield, the caller
        cancelling): its sender does not send it again, and a batch cut short would leave this
        registry without its tail (a replica's drop, the reuse reports that correct
        predictions), behind the other registries that applied it all."""
        batch = asyncio.ensure_future(self._update_batch(request))
        self._batches.add(batch)
        batch.add_done_callback(self._batch_done)
        return await asyncio.shield(batch)

    async def applied(self) -> None:
        """Return once every update batch begun is applied (those whose calls ended too)."""
        while self._batches:
            await asyncio.wait(list(self._batches))

    def _batch_done(self, batch: asyncio.Future[pb.UpdateBatchResponse]) -> None:
        self._batches.discard(batch)
        if not batch.cancelled() and batch.exception() is not None:  # its call may be gone
            log.error("update batch failed", exc_info=batch.exception())

    async def _update_batch(self, request: pb.UpdateBatchRequest) -> pb.UpdateBatchResponse:
        predicted: list[int] = []
        rejected = 0
        applied = 0
        for update in request.updates:
            if applied >= YIELD_BLOCKS:
                applied = 0
                await asyncio.sleep(0)
            kind = update.WhichOneof("kind")
            applied += _blocks(update, kind)
            try:
                if kind == "routing":
                    predicted.append(self._record_routing(update.routing).predicted_blocks)
                elif kind == "reuse":
                    self._report_reuse(update.reuse)
                elif kind == "drop":
                    self._drop_replica(update.drop)
                else:
                    raise InvalidArgument("update has no kind", field="updates")
            except ServiceError:
                rejected += 1
                if kind == "routing":
                    predicted.append(0)
        return pb.UpdateBatchResponse(predicted_blocks=predicted, rejected=rejected)


async def run_maintenance(core: KvRegistry, interval_s: float, batch: int) -> None:
    """Background steps until cancelled: each holds the event loop for at most `batch` entries;
    steps repeat without sleeping while there is a backlog."""
    while True:
        try:
            busy = core.maintain(batch) >= batch
        except Exception:  # a bug here must not stop cleanup forever
            log.exception("kv_registry maintenance step failed")
            busy = False
        await asyncio.sleep(0 if busy else interval_s)
