"""gRPC adapter: protobuf ↔ the director, through `convert.py`.

AdmitStream: one task per Admit read (its answer queued for the call's one writer), so a slow
decision never holds up the next message. Invariants: every Admit read gets exactly one answer
unless its caller cancels it or the stream ends first; a lease that cannot be delivered (its
Admit cancelled after the grant, the stream gone before the answer was written) is released at
once as CANCELLED, not left to the lease timeout; a stream holds at most `STREAM_MAX_OPEN`
unanswered Admits.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Collection
from typing import Final

import grpc
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import SpanKind

from llmmesh.common.errors import Internal, ServiceError, abort
from llmmesh.common.sojourn import CallerBaselines, caller_of, read_call, read_sent
from llmmesh.common.telemetry import extract_trace_context, request_id_var
from llmmesh.generated.orchestrator.v1 import orchestrator_pb2 as pb
from llmmesh.generated.orchestrator.v1 import orchestrator_pb2_grpc as pb_grpc
from services.orchestrator.convert import (
    admission_from_pb,
    lease_to_pb,
    outcome_from_pb,
    refusal_to_pb,
    spec_from_pb,
    status_to_pb,
)
from services.orchestrator.director import Orchestrator
from services.orchestrator.domain import Lease, Outcome
from services.orchestrator.errors import BadAdmission, Draining, StreamFull

Ctx = grpc.aio.ServicerContext[object, object]

log = logging.getLogger(__name__)

_tracer = trace.get_tracer("llmmesh.orchestrator")

# Unanswered Admits one AdmitStream may hold (as the proto says): each is a task and a place in
# the admission queue; the queue's own bound refuses most long before.
STREAM_MAX_OPEN: Final = 4096


class _Stream:
    """One AdmitStream call: its Admits being decided and the answers waiting to be written."""

    __slots__ = ("answers", "caller", "closed", "open", "reading", "room", "wake")

    def __init__(self, caller: str | None) -> None:
        self.caller = caller
        self.open: dict[int, asyncio.Task[None]] = {}
        self.answers: deque[pb.AdmitStreamResponse] = deque()
        self.reading = True  # False once the caller half-closed or the orchestrator drains
        self.closed = False  # the call ended: an answer can no longer be written
        self.wake = asyncio.Event()  # an answer to write, or the stream may be done
        self.room = asyncio.Event()  # an answer was written: the reader may go on

    def answer(self, response: pb.AdmitStreamResponse) -> None:
        self.answers.append(response)
        self.wake.set()


class OrchestratorServicer(pb_grpc.OrchestratorServiceServicer):
    def __init__(self, core: Orchestrator, wall_clock: Callable[[], float] = time.time):
        self._core = core
        self._wall_clock = wall_clock  # against the callers' send times (`read_call`)
        self._baselines = CallerBaselines()
        self._streams: set[_Stream] = set()
        self._draining = False
        # Open AdmitStreams per caller process, and the pending release of the leases of a
        # caller whose last stream ended (`_orphaned`).
        self._callers: dict[str, int] = {}
        # Per caller with a stream open or within its orphan grace: the highest `held.stream`
        # read (an older stream's `held` read later is stale).
        self._stream_numbers: dict[str, int] = {}
        self._orphan_timers: dict[str, asyncio.TimerHandle] = {}

    def _waited(self, call: tuple[str, float] | None, wall_now: float) -> float:
        """Feed the shedder a call's reading, taken at `wall_now`; the wait it shows (0
        without one)."""
        if call is None:
            return 0.0
        caller, reading = call
        sojourn = self._baselines.sojourn(caller, reading, self._core.now(), wall_now)
        self._core.observe_sojourn(sojourn)
        return sojourn

    async def _admit(
        self, request: pb.AdmitRequest, timeout_s: float | None, parent: otel_context.Context
    ) -> Lease:
        request_id_var.set(request.request_id)
        with _tracer.start_as_current_span(
            "orchestrator.admit", context=parent, kind=SpanKind.SERVER
        ) as span:
            try:
                lease = await self._core.admit(admission_from_pb(request), timeout_s)
            except ServiceError as err:
                span.set_attribute("llmmesh.rejected", type(err).__name__)
                raise
            span.set_attribute("llmmesh.replica", lease.replica.id)
            span.set_attribute("llmmesh.queue_ms", lease.queue_s * 1000)
        return lease

    async def Admit(self, request: pb.AdmitRequest, context: Ctx) -> pb.AdmitResponse:
        metadata = context.invocation_metadata()
        wall_now = self._wall_clock()
        self._waited(read_call(metadata, wall_now), wall_now)
        try:
            lease = await self._admit(
                request, _answer_by(context.time_remaining()), extract_trace_context(metadata)
            )
        except ServiceError as err:
            await abort(context, err)
            raise
        if context.cancelled():
            # The call ended as the lease was granted: no one receives it.
            self._core.complete(lease.lease_id, Outcome.CANCELLED)
        return lease_to_pb(lease)

    async def AdmitStream(  # type: ignore[override]  # writes through the context
        self, request_iterator: AsyncIterator[pb.AdmitStreamRequest], context: Ctx
    ) -> None:
        # A coroutine, not an async generator: its `finally` runs when the call ends however
        # it ends (a generator left at a failed write would wait for the collector).
        caller = caller_of(context.invocation_metadata())
        stream = _Stream(caller)
        stream.reading = not self._draining
        self._streams.add(stream)
        if caller is not None:
            self._callers[caller] = self._callers.get(caller, 0) + 1
            timer = self._orphan_timers.pop(caller, None)
            if timer is not None:
                timer.cancel()  # back within the grace: its leases stand
        reader = asyncio.create_task(self._read(request_iterator, stream))
        try:
            while True:
                while stream.answers and not stream.closed:
                    # Popped once written: an answer the write failed on stays to be released.
                    await context.write(stream.answers[0])
                    stream.answers.popleft()
                    stream.room.set()
                if stream.closed:
                    await context.abort(
                        grpc.StatusCode.ABORTED, "a newer stream of this caller replaced this one"
                    )
                if not (stream.reading or stream.open or stream.answers):
                    return
                stream.wake.clear()
                await stream.wake.wait()
        finally:
            stream.closed = True
            self._streams.discard(stream)
            reader.cancel()
            for task in stream.open.values():
                task.cancel()  # the director releases a lease granted meanwhile
            for undelivered in stream.answers:
                self._release(undelivered)
            if caller is not None:
                self._stream_ended(caller)

    def _stream_ended(self, caller: str) -> None:
        left = self._callers[caller] - 1
        if left:
            self._callers[caller] = left
            return
        del self._callers[caller]
        if not self._draining:
            self._orphan_timers[caller] = asyncio.get_running_loop().call_later(
                self._core.orphan_lease_grace_s, self._orphaned, caller
            )

    def _orphaned(self, caller: str) -> None:
        """`caller`'s last stream ended `orphan_lease_grace_s` ago and none opened since: its
        process is gone (a gateway holding leases opens a stream again at once), so the leases
        it held will never be completed; they end now, not at `lease_timeout_s`."""
        self._orphan_timers.pop(caller, None)  # a stream opened since would have cancelled it
        self._stream_numbers.pop(caller, None)
        self._release_owned(caller, frozenset(), "leases of a caller gone released")

    def _supersede(self, stream: _Stream, caller: str, held: pb.HeldLeases) -> None:
        """`caller` opened `stream` and holds `held`: its other streams are gone (it keeps one
        open here; one this process has not seen end yet may lie behind a dead connection).
        Their Admits are no longer decided, and every lease granted over them that is not
        held ends now: its answer was lost with the connection (its Admit was sent to another
        orchestrator), and no Complete will come. Otherwise it would hold its replica's slot
        until the lease timeout: the orphan release does not apply while the caller keeps a
        stream open. A stale `held` (an older stream's, read after a newer one's) ends its own
        stream instead."""
        if held.stream:
            if held.stream <= self._stream_numbers.get(caller, 0):
                _end(stream)
                return
            self._stream_numbers[caller] = held.stream
        for old in [s for s in self._streams if s.caller == caller and s is not stream]:
            _end(old)
        self._release_owned(
            caller,
            frozenset(held.lease_ids),
            "leases answered over a caller's lost stream released",
        )

    def _release_owned(self, caller: str, keep: Collection[str], why: str) -> None:
        """End the leases granted to `caller` but those in `keep`; logged when there were some."""
        released = self._core.release_owned(caller, keep=keep)
        if released:
            log.warning(why, extra={"caller": caller, "leases": released})

    def _release(self, answer: pb.AdmitStreamResponse) -> None:
        """An answer that will not be written: its lease, if any, ends now."""
        if answer.HasField("lease"):
            self._core.complete(answer.lease.lease_id, Outcome.CANCELLED)

    async def _read(
        self,
        requests: AsyncIterator[pb.AdmitStreamRequest],
        stream: _Stream,
    ) -> None:
        caller = stream.caller
        try:
            first = True
            async for msg in requests:
                kind = msg.WhichOneof("kind")
                # `held` counts only first: later, leases answered over this stream and not yet
                # read by the caller would be listed nowhere.
                held, first = first and kind == "held", False
                if kind == "held":
                    if held and caller is not None:
                        self._supersede(stream, caller, msg.held)
                    continue
                if kind == "cancel":
                    task = stream.open.pop(msg.call_id, None)
                    if task is not None:
                        task.cancel()
                        stream.wake.set()  # the stream may have nothing left to answer
                    continue
                refusal = self._refusal(stream, msg, kind)
                if refusal is None:
                    stream.open[msg.call_id] = asyncio.create_task(self._admit_one(stream, msg))
                else:
                    stream.answer(_refused(msg.call_id, refusal))
                # A caller that sends without reading its answers is not read either: the
                # answers waiting to be written stay under STREAM_MAX_OPEN (the open Admits are
                # bounded by the refusal above).
                while len(stream.answers) >= STREAM_MAX_OPEN:
                    stream.room.clear()
                    await stream.room.wait()
        except asyncio.CancelledError:
            raise
        except Exception as err:  # the call broke: its handler ends with it
            log.debug("admit stream read ended", extra={"error": repr(err)})
        finally:
            stream.reading = False
            stream.wake.set()

    def _refusal(
        self, stream: _Stream, msg: pb.AdmitStreamRequest, kind: str | None
    ) -> ServiceError | None:
        """Why an Admit message read is not decided (None: it is). Cancels are still read
        while draining, until the stream ends; an Admit then goes elsewhere."""
        if not stream.reading:
            return Draining("orchestrator is draining")
        if kind != "admit":
            return BadAdmission("neither admit nor cancel set")
        if msg.call_id in stream.open:
            return BadAdmission(f"{msg.call_id} is unanswered already", field="call_id")
        if not 0 <= msg.timeout_s < math.inf:  # NaN too
            return BadAdmission(
                f"must be finite and >= 0 (0: the default wait), got {msg.timeout_s}",
                field="timeout_s",
            )
        if len(stream.open) >= STREAM_MAX_OPEN:
            return StreamFull(
                f"{STREAM_MAX_OPEN} Admits unanswered on this stream",
                retry_after_s=self._core.shed_retry_after_s,
            )
        return None

    async def _admit_one(self, stream: _Stream, msg: pb.AdmitStreamRequest) -> None:
        call_id, caller = msg.call_id, stream.caller
        try:
            wall_now = self._wall_clock()
            waited = self._waited(read_sent(caller, msg.sent_at_unix_s, wall_now), wall_now)
            # As a unary Admit's: answered a moment before the caller's own expiry.
            timeout_s = _answer_by(max(msg.timeout_s - waited, 0.0)) if msg.timeout_s > 0 else None
            lease = await self._admit(
                msg.admit, timeout_s, extract_trace_context(msg.trace_context.items())
            )
            if caller is not None:
                self._core.own(lease.lease_id, caller)
            answer = pb.AdmitStreamResponse(call_id=call_id, lease=lease_to_pb(lease))
        except ServiceError as err:
            answer = _refused(call_id, err)
        except Exception:
            log.exception("admit failed", extra={"request_id": msg.admit.request_id})
            answer = _refused(call_id, Internal("admission failed"))
        finally:
            if stream.open.get(call_id) is asyncio.current_task():
                del stream.open[call_id]
        if stream.closed:
            # Granted as the call ended (a cancel that came after the grant is not raised).
            self._release(answer)
            return
        stream.answer(answer)

    async def drain(self) -> None:
        """Stop reading Admits on every stream: each ends once the Admits it read are answered
        (the server's own stop bounds how long that may take)."""
        self._draining = True
        for timer in self._orphan_timers.values():
            timer.cancel()  # this process's leases end with it
        self._orphan_timers.clear()
        for stream in self._streams:
            stream.reading = False
            stream.wake.set()

    async def Complete(self, request: pb.CompleteRequest, context: Ctx) -> pb.CompleteResponse:
        outcome, reused_blocks = outcome_from_pb(request)
        self._core.complete(request.lease_id, outcome, reused_blocks)
        return pb.CompleteResponse()

    async def CompleteBatch(
        self, request: pb.CompleteBatchRequest, context: Ctx
    ) -> pb.CompleteBatchResponse:
        self._core.complete_many(
            (report.lease_id, *outcome_from_pb(report)) for report in request.reports
        )
        return pb.CompleteBatchResponse()

    async def ListReplicas(
        self, request: pb.ListReplicasRequest, context: Ctx
    ) -> pb.ListReplicasResponse:
        now = self._core.now()
        return pb.ListReplicasResponse(
            queue_depth=self._core.queue_depth,
            replicas=[status_to_pb(st, now) for st in self._core.replicas()],
        )

    async def RegisterReplica(
        self, request: pb.RegisterReplicaRequest, context: Ctx
    ) -> pb.RegisterReplicaResponse:
        try:
            reg = await self._core.register_replica(spec_from_pb(request.replica))
        except ServiceError as err:
            await abort(context, err)
            raise
        return pb.RegisterReplicaResponse(ready=reg.ready, created=reg.created)

    async def DrainReplica(
        self, request: pb.DrainReplicaRequest, context: Ctx
    ) -> pb.DrainReplicaResponse:
        wait_s = _answer_by(context.time_remaining())
        if wait_s is None:
            wait_s = self._core.drain_max_wait_s
        try:
            result = await self._core.drain_replica(request.replica_id, wait_s)
        except ServiceError as err:
            await abort(context, err)
            raise
        return pb.DrainReplicaResponse(in_flight=result.in_flight, drained=result.drained)

    async def DeregisterReplica(
        self, request: pb.DeregisterReplicaRequest, context: Ctx
    ) -> pb.DeregisterReplicaResponse:
        try:
            in_flight = self._core.deregister_replica(request.replica_id)
        except ServiceError as err:
            await abort(context, err)
            raise
        return pb.DeregisterReplicaResponse(in_flight=in_flight)


def _end(stream: _Stream) -> None:
    """A stream its caller replaced: no Admit of it is decided any more (a lease granted
    meanwhile is released, `_admit_one`), and it ends ABORTED once no answer is being written."""
    stream.closed = True
    stream.reading = False
    for task in stream.open.values():
        task.cancel()
    stream.wake.set()


def _answer_by(remaining_s: float | None) -> float | None:
    """How long a call may wait with `remaining_s` left before its deadline (None: none): until a
    moment before it (a tenth, at most 1 s), so the caller gets the answer, not an expiry. An
    Admit granted after its caller gave up would hold a lease no one knows of until the lease
    timeout (a unary call's answer carries the only copy of its id)."""
    return None if remaining_s is None else max(remaining_s - min(1.0, remaining_s * 0.1), 0.0)


def _refused(call_id: int, err: ServiceError) -> pb.AdmitStreamResponse:
    return pb.AdmitStreamResponse(call_id=call_id, refusal=refusal_to_pb(err))
