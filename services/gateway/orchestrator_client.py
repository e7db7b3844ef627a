"""The gateway's one boundary with the orchestrator: `AdmissionClient` over gRPC.

The only gateway module that imports the orchestrator's stubs. It converts domain ↔ protobuf
(one function per message) and maps failed calls to the gateway's errors by status code and
typed reason (`google.rpc.ErrorInfo` in the status details), never by message text.

Invariant: every report handed to `complete` is sent by a background task, so a cancelled
request still releases its lease; `drain` waits for them. A failed call is tried again with
exponential backoff (`COMPLETE_BACKOFF_S`, jittered), waiting for the channel to be ready, for
`complete_retry_s` (`COMPLETE_RETRY_S`) when it failed for a reason that passes
(`_TRANSIENT`): a lease report outlives a restart of the orchestrator's sidecar or a few seconds
of overload (reports are idempotent per lease). A call is tried only `COMPLETE_ATTEMPTS` times,
failing at once on a channel not ready, for any other failure, once `drain` began (the last
reports at shutdown, or to an orchestrator that left: neither is held by an orchestrator that
is gone), and after a call was given up on, until one succeeds (one outage costs one window,
not one per batch). The orchestrator reclaims a lease it never hears about after
its lease timeout. Reports leave in
order, as CompleteBatch calls (`llmmesh.common.batching`): one call in flight at a time, each `COMPLETE_LINGER_S` after the
previous one (the first, after the report that found none queued) and carrying what came
meanwhile, up to `COMPLETE_BATCH`: under load one call releases many leases instead of a call
per request (each costs both processes a gRPC call's CPU). An orchestrator that refuses
CompleteBatch (`errors.NOT_OFFERED`: an older version, or a mesh policy without it) gets one Complete
per report, all of a batch at once, for `NOT_OFFERED_RETRY_S`; then a batch tries it again. The queue is bounded (`COMPLETE_QUEUE`).

Admits travel on one AdmitStream call per orchestrator (`_AdmitStream`): a message each way
instead of a call, each Admit with its own deadline, trace context and send time, its refusal as
fields mapped exactly as the unary call's status would be (`admission_error`). The stream opens
with the first Admit and again after it ends. An Admit whose stream ends unanswered fails as the
unary call to an orchestrator not reached would (`OrchestratorUnavailable`; DROPPED when the
orchestrator cancelled it), so the orchestrator set sends it to another: the orchestrator
answers every Admit it read before it ends a stream, so an unanswered one was never decided,
unless the connection broke, when a lease it granted ends by the lease timeout (as with the unary
call), or sooner when this process's streams to that orchestrator stay gone for its
`orphan_lease_grace_s` (the orchestrator then releases every lease it granted over them): so
while it holds leases granted over a stream, a stream that ended is opened again at once. An Admit given up on (its caller's cancel, its deadline) is withdrawn by a cancel message,
and a lease answered for it all the same is released at once. An orchestrator that refuses the
method (`errors.NOT_OFFERED`) gets unary Admits, the refused ones included, for
`NOT_OFFERED_RETRY_S`; then an Admit tries the stream again (a policy that allows it later, or
an orchestrator upgraded in place, gets streams back; one refusal in a policy's rollout does
not cost every later Admit a call for the process's life).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import random
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Final

import grpc

from llmmesh.common.batching import LingerBatcher
from llmmesh.common.channels import KEEPALIVE_OPTIONS, RECONNECT_OPTIONS
from llmmesh.common.errors import (
    NOT_OFFERED,
    DeadlineExceeded,
    Reason,
    ResourceExhausted,
    ServiceError,
    from_fields,
    from_rpc_error,
    status_code,
)
from llmmesh.common.sojourn import CALLER_KEY, call_metadata
from llmmesh.common.telemetry import inject_trace_metadata, trace_carrier
from llmmesh.common.topology import Priority, ReplicaAddress
from llmmesh.generated.orchestrator.v1 import orchestrator_pb2 as pb
from llmmesh.generated.orchestrator.v1 import orchestrator_pb2_grpc as pb_grpc
from llmmesh.kvblocks import ChunkedHashes, token_bytes
from services.gateway.admission import (
    AdmissionRequest,
    AdmissionStatus,
    KnownReplica,
    Lease,
    LeaseReport,
    Outcome,
)
from services.gateway.errors import NoReplica, OrchestratorTimedOut, OrchestratorUnavailable

log = logging.getLogger(__name__)

COMPLETE_ATTEMPTS: Final = 3  # tries of a report call once the client is closing
COMPLETE_TIMEOUT_S: Final = 5.0
# How long a report call is tried again while its orchestrator does not take it, and the first
# and longest pause between tries (doubling, each drawn from its upper half).
COMPLETE_RETRY_S: Final = 60.0
# How long a method refused as such (`NOT_OFFERED`) goes unasked before it is tried again: a
# refused try costs the call it falls back to one round trip more.
NOT_OFFERED_RETRY_S: Final = 60.0
COMPLETE_BACKOFF_S: Final = (0.05, 2.0)
# Failures that pass: the orchestrator (or its sidecar) restarting, overloaded or slow.
_TRANSIENT: Final = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.ABORTED,
    }
)
# A report waits at most this long for others to share its call: a lease's capacity is freed
# this much later (against requests lasting seconds), for one call per linger under load.
COMPLETE_LINGER_S: Final = 0.005
COMPLETE_BATCH: Final = 256  # reports per CompleteBatch call (~25 KB)
# Reports queued for one orchestrator at most (one per lease it granted, so reached only when
# it stopped answering); beyond it the oldest is dropped and its lease reclaimed by timeout.
COMPLETE_QUEUE: Final = 65_536
# Shortest Admit deadline sent: a spent deadline still makes a call that fails as expired.
_MIN_TIMEOUT_S: Final = 0.001
# Messages waiting for an AdmitStream's writer at most (reached only when the orchestrator stopped
# reading); beyond it an Admit fails as not reached, and the set sends it to another.
STREAM_OUTBOX: Final = 65_536
# How soon an AdmitStream that ended is opened again while leases granted over it are held
# (well within the orchestrator's `orphan_lease_grace_s`).
STREAM_REOPEN_S: Final = 1.0

_PRIORITY: Final = {
    Priority.INTERACTIVE: pb.PRIORITY_INTERACTIVE,
    Priority.STANDARD: pb.PRIORITY_STANDARD,
    Priority.BATCH: pb.PRIORITY_BATCH,
}
_OUTCOME: Final = {
    Outcome.SUCCESS: pb.OUTCOME_SUCCESS,
    Outcome.CANCELLED: pb.OUTCOME_CANCELLED,
    Outcome.REPLICA_ERROR: pb.OUTCOME_REPLICA_ERROR,
    Outcome.REQUEST_ERROR: pb.OUTCOME_REQUEST_ERROR,
}
# This process, to the orchestrators' sojourn reading (`llmmesh.common.sojourn`): its clock's
# offset from theirs is learnt per caller. Each client is a caller of its own (`CALLER_ID`.n):
# an orchestrator takes a caller's new stream as the end of its earlier ones (`_AdmitStream`).
CALLER_ID: Final = f"gateway-{uuid.uuid4().hex[:12]}"
_CLIENTS = itertools.count(1)
_NO_REPLICA_REASONS: Final = frozenset({Reason.NO_REPLICA, Reason.ACTIVATION_TIMEOUT})
# Statuses that end an AdmitStream and are read as a unary Admit's would be (`admit_error`).
_STREAM_STATUS_AS_IS: Final = frozenset(
    {grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE, *NOT_OFFERED}
)


# -- conversions: one function per message -------------------------------------------------
def admit_request_to_pb(
    request: AdmissionRequest,
    out: pb.AdmitRequest | None = None,
    hasher: ChunkedHashes | None = None,
) -> pb.AdmitRequest:
    """The request as an AdmitRequest; filled into `out` when given (a stream message's field,
    so a long prompt's bytes are not copied again). With `hasher`, the prompt goes as its length
    and block hashes (8 bytes a block instead of 4 a token, and no hashing at the orchestrator):
    for an orchestrator that reads them (one serving AdmitStream)."""
    msg = pb.AdmitRequest() if out is None else out
    msg.request_id = request.request_id
    msg.model = request.model
    body = token_bytes(request.prompt_token_ids)
    if hasher is None:
        msg.prompt_tokens_le32 = body
    else:
        msg.prompt_tokens = len(request.prompt_token_ids)
        msg.hash_block_size = hasher.config.block_size
        msg.hash_seed = hasher.config.hash_seed
        msg.prompt_block_hashes_le64 = hasher.le64(body)
    msg.max_tokens = request.max_tokens
    msg.priority = _PRIORITY[request.priority]
    msg.tenant = request.tenant
    msg.model_version = request.model_version
    msg.exclude_replicas.extend(sorted(request.exclude_replicas))
    return msg


def replica_from_pb(replica: pb.Replica) -> ReplicaAddress:
    """Every field of `Replica`: the authority above all (without it a mesh sidecar sees a bare
    pod address and the stream bypasses the Service's mTLS)."""
    return ReplicaAddress(
        id=replica.id,
        grpc_address=replica.grpc_address,
        pool=replica.pool,
        model_version=replica.model_version,
        authority=replica.authority,
    )


def lease_from_pb(response: pb.AdmitResponse) -> Lease:
    return Lease(
        lease_id=response.lease_id,
        replica=replica_from_pb(response.replica),
        queue_ms=response.queue_ms,
    )


def complete_request_to_pb(report: LeaseReport) -> pb.CompleteRequest:
    req = pb.CompleteRequest(
        lease_id=report.lease_id,
        outcome=_OUTCOME[report.outcome],
        prompt_tokens=report.prompt_tokens,
        completion_tokens=report.completion_tokens,
        kv_cache_reused_blocks=report.kv_cache_reused_blocks,
        error_message=report.error,
    )
    if report.ttft_ms is not None:
        req.time_to_first_token_ms = report.ttft_ms
    return req


def known_replica_from_pb(status: pb.ReplicaStatus) -> KnownReplica:
    return KnownReplica(
        replica=replica_from_pb(status.replica),
        routable=status.healthy and not status.draining,
        in_flight=status.in_flight,
        models=frozenset(status.models),
    )


def status_from_pb(response: pb.ListReplicasResponse) -> AdmissionStatus:
    known = tuple(known_replica_from_pb(r) for r in response.replicas)
    return AdmissionStatus(
        replicas=len(known),
        ready_replicas=sum(1 for r in known if r.routable),
        queue_depth=response.queue_depth,
        known=known,
    )


def admission_error(code: grpc.StatusCode, details: str, mapped: ServiceError) -> ServiceError:
    """A refused Admit as a gateway error, from its status (a unary call's) or its refusal
    fields (a stream answer's): `mapped` is the status as the common mapping reads it.
    UNAVAILABLE is told apart by its typed reason: none means the orchestrator itself was not
    reached."""
    if code == grpc.StatusCode.CANCELLED:
        # Not this caller's cancel (that ends the call with CancelledError here): the
        # orchestrator's gRPC dropped the call unstarted (held too long behind the calls it had
        # not started) or it is stopping. Another orchestrator may serve it; the orchestrator
        # set fills in the retry-after when every one refused.
        return ResourceExhausted(
            f"admission: the orchestrator dropped the call ({details})", reason=Reason.DROPPED
        )
    if code == grpc.StatusCode.UNAVAILABLE:
        if mapped.reason is None:
            return OrchestratorUnavailable(f"orchestrator: {details}")
        if mapped.reason in _NO_REPLICA_REASONS:
            return NoReplica(str(mapped), retry_after_s=mapped.retry_after_s, reason=mapped.reason)
    return mapped


def admit_error(err: grpc.aio.AioRpcError) -> ServiceError:
    """A failed Admit call as a gateway error (`admission_error`)."""
    return admission_error(err.code(), err.details() or "", from_rpc_error(err, "admission"))


def refusal_error(refusal: pb.AdmitRefusal) -> ServiceError:
    """An AdmitStream refusal as a gateway error (`admission_error`)."""
    code = status_code(refusal.code)
    retry = refusal.retry_after_s if refusal.HasField("retry_after_s") else None
    mapped = from_fields(code, f"admission: {refusal.message}", refusal.reason, retry)
    return admission_error(code, refusal.message, mapped)


class StreamEnded(Exception):
    """The Admit's stream ended before its answer; `error`: how (None: the orchestrator ended
    it, draining, after answering what it had read); `admitted`: whether an Admit was written
    on it (else the orchestrator granted nothing over it)."""

    def __init__(self, error: BaseException | None, *, admitted: bool = False) -> None:
        super().__init__(repr(error))
        self.error = error
        self.admitted = admitted

    @property
    def not_offered(self) -> bool:
        """The orchestrator (or the mesh's policy in front of it) refused the method itself."""
        err = self.error
        return isinstance(err, grpc.aio.AioRpcError) and err.code() in NOT_OFFERED

    def as_admission_error(self) -> ServiceError:
        err = self.error
        if isinstance(err, grpc.aio.AioRpcError):
            if err.code() in _STREAM_STATUS_AS_IS:
                return admit_error(err)
            # A stream's refusals are answer fields: any other status ending it is the call
            # failing (grpc reports a write cut by the connection's drop as INTERNAL), so the
            # Admit goes to another orchestrator.
            return OrchestratorUnavailable(
                f"orchestrator: admit stream ended {err.code().name}: {err.details()}"
            )
        if err is None:
            return OrchestratorUnavailable("orchestrator: it ended the admit stream (draining)")
        return OrchestratorUnavailable(f"orchestrator: admit stream failed ({err!r})")


class _AdmitStream:
    """Admits multiplexed on one AdmitStream call. One writer task sends the messages in order
    (a gRPC call takes one write at a time); one reader task hands each answer to its Admit.
    The first message of a stream after one the orchestrator took lists the leases the caller
    holds from it (`held`): a caller opens one stream at a time, so the orchestrator releases
    the leases answered over earlier ones that are not listed (their answers were lost with the
    connection). Before that (a caller id is a client's own) there is nothing to list, and a
    stream sends nothing before its first Admit: a write racing a refusal of the method can end
    the call INTERNAL, hiding the refusal.

    Invariants: an Admit is in `_pending` from its send until its answer, deadline, caller's
    cancel or the stream's end, whichever is first; one that leaves before its message was
    written is never written (`_unsent`), one that leaves after is withdrawn by a cancel
    message; a lease answered for an Admit no longer pending goes to `release` at once. Once
    the stream ended, every pending Admit fails with `StreamEnded` and nothing more is sent."""

    def __init__(
        self,
        stub: pb_grpc.OrchestratorServiceAsyncStub,
        caller: str,
        release: Callable[[pb.AdmitResponse], None],
        hasher: ChunkedHashes | None,
        on_end: Callable[[StreamEnded], None],
        held: pb.HeldLeases | None,
        on_lease: Callable[[str], None],
    ) -> None:
        self._call = stub.AdmitStream(None, metadata=((CALLER_KEY, caller),))
        self._release = release
        self._on_end = on_end
        self._on_lease = on_lease
        self._hasher = hasher
        self._pending: dict[int, asyncio.Future[pb.AdmitStreamResponse]] = {}
        self._unsent: set[int] = set()
        self._outbox: deque[pb.AdmitStreamRequest] = deque()
        self._wake = asyncio.Event()
        if held is not None:
            self._put(pb.AdmitStreamRequest(held=held))
        self._ids = itertools.count(1)
        self._admitted = False  # an Admit was written
        self.ended: StreamEnded | None = None
        self._reader = asyncio.ensure_future(self._read())
        self._writer = asyncio.ensure_future(self._write())

    async def admit(
        self, request: AdmissionRequest, timeout_s: float, sent_at: float
    ) -> pb.AdmitResponse:
        if self.ended is not None:
            raise self.ended
        if len(self._outbox) >= STREAM_OUTBOX:
            raise OrchestratorUnavailable("orchestrator: its admit stream is not being read")
        call_id = next(self._ids)
        msg = pb.AdmitStreamRequest(call_id=call_id, timeout_s=timeout_s, sent_at_unix_s=sent_at)
        admit_request_to_pb(request, msg.admit, self._hasher)
        msg.trace_context.update(trace_carrier())
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[pb.AdmitStreamResponse] = loop.create_future()
        self._pending[call_id] = fut
        self._unsent.add(call_id)
        self._put(msg)
        timer = loop.call_later(timeout_s, self._expire, call_id)
        try:
            answer = await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                answered = fut.result()  # answered, then cancelled before this task resumed
                if answered.HasField("lease"):
                    self._release(answered.lease)
            else:
                self._withdraw(call_id)
            raise
        finally:
            timer.cancel()
        if answer.HasField("lease"):
            return answer.lease
        raise refusal_error(answer.refusal)

    def _put(self, msg: pb.AdmitStreamRequest) -> None:
        self._outbox.append(msg)
        self._wake.set()

    def _withdraw(self, call_id: int) -> None:
        if self._pending.pop(call_id, None) is None or self.ended is not None:
            return
        if call_id in self._unsent:
            self._unsent.discard(call_id)  # never written: nothing to cancel
        else:
            self._put(pb.AdmitStreamRequest(call_id=call_id, cancel=True))

    def _expire(self, call_id: int) -> None:
        """The Admit's deadline passed unanswered: as the unary call's client-side expiry."""
        fut = self._pending.get(call_id)
        self._withdraw(call_id)
        if fut is not None and not fut.done():
            fut.set_exception(DeadlineExceeded("admission: Deadline Exceeded"))

    async def _write(self) -> None:
        try:
            while True:
                while self._outbox:
                    msg = self._outbox.popleft()
                    if msg.HasField("admit"):
                        if msg.call_id not in self._unsent:
                            continue  # withdrawn before it was written
                        self._unsent.discard(msg.call_id)
                        await self._call.write(msg)
                        self._admitted = True
                        continue
                    await self._call.write(msg)
                self._wake.clear()
                await self._wake.wait()
        except asyncio.CancelledError:
            raise
        except Exception as err:
            if self._call.done():
                return  # the call ended: the reader ends the stream with its status
            self._end(err)

    async def _read(self) -> None:
        error: BaseException | None = None
        try:
            async for answer in self._call:
                fut = self._pending.pop(answer.call_id, None)
                if fut is not None and not fut.done():
                    if answer.HasField("lease"):
                        # Held from now: a stream opened before its Admit resumes lists it.
                        self._on_lease(answer.lease.lease_id)
                    fut.set_result(answer)
                elif answer.HasField("lease"):
                    self._release(answer.lease)  # its Admit was given up on meanwhile
        except asyncio.CancelledError:
            raise
        except Exception as err:
            error = err
        self._end(error)

    def _end(self, error: BaseException | None) -> None:
        if self.ended is not None:
            return
        self.ended = ended = StreamEnded(error, admitted=self._admitted)
        pending, self._pending = self._pending, {}
        self._unsent.clear()
        self._outbox.clear()
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(StreamEnded(error))  # one each: a traceback each
        self._call.cancel()
        current = asyncio.current_task()
        for task in (self._reader, self._writer):
            if task is not current:
                task.cancel()
        self._on_end(ended)

    def close(self) -> None:
        self._end(asyncio.CancelledError())


# -- client ---------------------------------------------------------------------------------
class OrchestratorClient:
    """`AdmissionClient` on an orchestrator channel (`connect` opens and owns one)."""

    def __init__(
        self,
        stub: pb_grpc.OrchestratorServiceAsyncStub,
        channel: grpc.aio.Channel | None = None,
        address: str = "",
        wall_clock: Callable[[], float] = time.time,
        *,
        admit_stream: bool = True,
        hasher: ChunkedHashes | None = None,
        complete_retry_s: float = COMPLETE_RETRY_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`clock`: when a refused method is tried again (`NOT_OFFERED_RETRY_S`)."""
        self._stub = stub
        self._clock = clock
        self._complete_retry_s = complete_retry_s
        self._draining = False  # the last reports: each tried COMPLETE_ATTEMPTS times
        self._gave_up = False  # a report call was given up on, and none succeeded since
        self._streams_admits = admit_stream  # False: unary Admits (configured)
        # Until when AdmitStream, and CompleteBatch, go unasked after a refusal (`NOT_OFFERED`).
        self._stream_refused_until = -math.inf
        self._batch_refused_until = -math.inf
        self._stream: _AdmitStream | None = None
        # Hashes prompts for the stream's Admits (None: the prompt itself is sent).
        self._hasher = hasher
        self._wall_clock = wall_clock  # stamps each Admit's send time (`call_metadata`)
        self._channel = channel  # closed by `close` when this client opened it
        self._reports: LingerBatcher[pb.CompleteRequest] = LingerBatcher(
            self._deliver,
            max_batch=COMPLETE_BATCH,
            max_queue=COMPLETE_QUEUE,
            linger_s=COMPLETE_LINGER_S,
            on_drop=self._dropped,
            name="lease reports",
        )
        # Leases granted over the stream and not yet reported: while any is held, a stream
        # that ended is opened again (`_stream_ended`), as the orchestrator releases the
        # leases of a caller with no stream open for its `orphan_lease_grace_s`.
        self._held: set[str] = set()
        # Leases whose report is queued or being sent: still held, to a stream opened meanwhile
        # (its `held`; bounded by the report queue).
        self._reporting: set[str] = set()
        self.caller = f"{CALLER_ID}.{next(_CLIENTS)}"
        self._streams_opened = 0
        # Whether an orchestrator took one of its streams (answered a lease over it, or ended
        # it, after an Admit was written, otherwise than by refusing the method): from then on
        # each stream sends `held`.
        self._accepted = False
        self._reopen: asyncio.TimerHandle | None = None
        self._releasing: set[asyncio.Task[None]] = set()  # `_release_answer`s running
        self._closing = False  # no stream opens once `close` began
        self._closed = False
        self.address = address  # for logs: which orchestrator this client reaches

    @classmethod
    def connect(
        cls,
        address: str,
        authority: str = "",
        wall_clock: Callable[[], float] = time.time,
        *,
        admit_stream: bool = True,
        hasher: ChunkedHashes | None = None,
        complete_retry_s: float = COMPLETE_RETRY_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> OrchestratorClient:
        """A client on a channel of its own to `address`; `authority` (a headless Service's
        host:port when `address` is one of its pod IPs) is the :authority sent, so a mesh
        sidecar applies that Service's mTLS and policies."""
        # An orchestrator that comes back is reached again within a second (not degraded for
        # gRPC's default backoff); a hung one fails its waiting Admits within keepalive time +
        # timeout, and the set retries them on another orchestrator.
        options: list[tuple[str, str | int]] = [*RECONNECT_OPTIONS, *KEEPALIVE_OPTIONS]
        if authority:
            options.append(("grpc.default_authority", authority))
        channel = grpc.aio.insecure_channel(address, options=options)
        return cls(
            pb_grpc.OrchestratorServiceStub(channel),
            channel,
            address,
            wall_clock,
            admit_stream=admit_stream,
            hasher=hasher,
            complete_retry_s=complete_retry_s,
            clock=clock,
        )

    @property
    def pending(self) -> int:
        """Reports handed to `complete` and not yet delivered or given up on."""
        return self._reports.queued + self._reports.in_call

    async def admit(self, request: AdmissionRequest, *, timeout_s: float) -> Lease:
        timeout_s = max(timeout_s, _MIN_TIMEOUT_S)
        if self._streams() and not self._closing:
            stream = self._open_stream()
            loop = asyncio.get_running_loop()
            start = loop.time()
            try:
                # Held from its answer on (`_AdmitStream`'s on_lease).
                return lease_from_pb(await stream.admit(request, timeout_s, self._wall_clock()))
            except StreamEnded as ended:
                if not ended.not_offered:
                    raise ended.as_admission_error() from ended
                # Refused: `_stream_ended` stopped streams for a while; this one goes as a call.
                timeout_s = max(timeout_s - (loop.time() - start), _MIN_TIMEOUT_S)
        return await self._admit_call(request, timeout_s)

    def _streams(self) -> bool:
        """Admits go on the stream: configured so, and not refused lately."""
        return self._streams_admits and self._clock() >= self._stream_refused_until

    def _open_stream(self) -> _AdmitStream:
        """The open AdmitStream, opened (again) when there is none."""
        stream = self._stream
        if stream is None or stream.ended is not None:
            stream = self._stream = _AdmitStream(
                self._stub,
                self.caller,
                self._release,
                self._hasher,
                self._stream_ended,
                pb.HeldLeases(
                    lease_ids=self._held | self._reporting, stream=self._streams_opened + 1
                )
                if self._accepted
                else None,
                self._leased,
            )
            self._streams_opened += 1
        return stream

    def _leased(self, lease_id: str) -> None:
        """A lease answered over the stream: held from now on."""
        self._held.add(lease_id)
        self._accepted = True

    def _stream_ended(self, ended: StreamEnded) -> None:
        """While leases granted over it are held, a stream that ended is opened again soon
        (`STREAM_REOPEN_S`, again each time it fails): the orchestrator keeps a caller's
        leases while the caller holds a stream open. One refused as such (`NOT_OFFERED`,
        whether an Admit was waiting on it or not) stops streams for `NOT_OFFERED_RETRY_S`:
        Admits go as calls, and nothing is opened again meanwhile."""
        # Taken: it may have granted what was lost with it (not one that failed before any
        # Admit reached it: an orchestrator not up yet, a dropped call).
        self._accepted = self._accepted or (ended.admitted and not ended.not_offered)
        if ended.not_offered:
            if self._streams():
                log.warning(
                    "AdmitStream refused; one Admit call each for a while",
                    extra={
                        "orchestrator": self.address,
                        "error": repr(ended.error),
                        "retry_s": NOT_OFFERED_RETRY_S,
                    },
                )
            self._stream_refused_until = self._clock() + NOT_OFFERED_RETRY_S
            return
        if ended.error is None:
            return  # the orchestrator ended it (it drains): its leases end with it
        if self._holds_stream_leases() and self._reopen is None:
            self._reopen = asyncio.get_running_loop().call_later(
                STREAM_REOPEN_S, self._reopen_stream
            )

    def _reopen_stream(self) -> None:
        self._reopen = None
        if self._holds_stream_leases():
            self._open_stream()

    def _holds_stream_leases(self) -> bool:
        """Leases granted over the stream are held and streams are still in use."""
        return bool(self._held) and not self._closing and self._streams()

    def _release(self, lease: pb.AdmitResponse) -> None:
        """A lease granted for an Admit given up on: its capacity back at once."""
        self.complete(LeaseReport.unused(lease.lease_id))

    async def _admit_call(self, request: AdmissionRequest, timeout_s: float) -> Lease:
        call = self._stub.Admit(
            admit_request_to_pb(request),
            timeout=timeout_s,
            # The orchestrator reads how long the call waited for it from the time sent.
            metadata=tuple(
                inject_trace_metadata([*call_metadata(self.caller, self._wall_clock())])
            ),
        )
        try:
            response = await call
        except grpc.aio.AioRpcError as err:
            raise admit_error(err) from err
        except asyncio.CancelledError:
            if call.done() and not call.cancelled():
                # Answered in the tick this Admit was given up on: a lease it brought goes
                # back now, not at the orchestrator's lease timeout (a call cancelled before
                # its answer, which grpc cancels here, is the orchestrator's to release).
                task = asyncio.ensure_future(self._release_answer(call))
                self._releasing.add(task)
                task.add_done_callback(self._releasing.discard)
            raise
        return lease_from_pb(response)

    async def _release_answer(self, call: Awaitable[pb.AdmitResponse]) -> None:
        try:
            response = await call  # answered: no wait
        except (grpc.aio.AioRpcError, asyncio.CancelledError):
            return  # refused, or cancelled before its answer: no lease
        self._release(response)

    def complete(self, report: LeaseReport) -> None:
        self._held.discard(report.lease_id)
        if self._closed:
            log.warning("complete after close: not sent", extra={"lease_id": report.lease_id})
            return
        self._reporting.add(report.lease_id)
        self._reports.put(complete_request_to_pb(report))

    def _dropped(self, report: pb.CompleteRequest) -> None:
        """The queue was full: its lease is reclaimed by the orchestrator (the next stream's
        `held` leaves it out, else its lease timeout)."""
        self._reporting.discard(report.lease_id)
        log.warning("complete queue full: oldest dropped", extra={"lease_id": report.lease_id})

    async def _deliver(self, batch: list[pb.CompleteRequest]) -> None:
        """One batch: a CompleteBatch call, or one Complete per report where it is refused."""
        try:
            batches = self._clock() >= self._batch_refused_until
            if not (batches and await self._send_batch(batch)):
                await asyncio.gather(*(self._send(req) for req in batch))
        finally:  # delivered, or given up on
            self._reporting.difference_update(req.lease_id for req in batch)

    async def _send_batch(self, batch: list[pb.CompleteRequest]) -> bool:
        """False: the orchestrator (or the mesh's policy in front of it) does not take
        CompleteBatch: the reports go one Complete each, for `NOT_OFFERED_RETRY_S`."""
        req = pb.CompleteBatchRequest(reports=batch)

        async def call() -> None:
            await self._stub.CompleteBatch(
                req, timeout=COMPLETE_TIMEOUT_S, wait_for_ready=not self._quick
            )

        try:
            await self._retried(call, len(batch))
        except grpc.aio.AioRpcError as err:  # refused: not offered
            log.warning(
                "CompleteBatch refused; one Complete per report for a while",
                extra={
                    "orchestrator": self.address,
                    "error": err.code().name,
                    "retry_s": NOT_OFFERED_RETRY_S,
                },
            )
            self._batch_refused_until = self._clock() + NOT_OFFERED_RETRY_S
            return False
        return True  # delivered, or given up on

    async def _send(self, req: pb.CompleteRequest) -> None:
        async def call() -> None:
            await self._stub.Complete(
                req, timeout=COMPLETE_TIMEOUT_S, wait_for_ready=not self._quick
            )

        with contextlib.suppress(grpc.aio.AioRpcError):  # Complete is offered by every version
            await self._retried(call, 1)

    @property
    def _quick(self) -> bool:
        """Report calls are tried `COMPLETE_ATTEMPTS` times, failing at once on a channel that
        is not ready (module docstring)."""
        return self._draining or self._gave_up

    async def _retried(self, call: Callable[[], Awaitable[None]], leases: int) -> None:
        """`call` until it succeeds, tried again with backoff for `complete_retry_s` while it
        fails for a reason that passes (else, or `_quick`, `COMPLETE_ATTEMPTS` times); a
        refusal as not offered is raised."""
        loop = asyncio.get_running_loop()
        give_up_at = loop.time() + self._complete_retry_s
        pause, longest = COMPLETE_BACKOFF_S
        attempt = 0
        while True:
            try:
                await call()
                self._gave_up = False
                return
            except grpc.aio.AioRpcError as err:
                if err.code() in NOT_OFFERED:
                    raise
                attempt += 1
                quick = self._quick or err.code() not in _TRANSIENT
                spent = loop.time() + pause > give_up_at
                if (quick and attempt >= COMPLETE_ATTEMPTS) or spent:
                    # A window spent on an orchestrator that does not come back: the next
                    # reports are tried quickly until one is taken.
                    self._gave_up = self._gave_up or spent
                    log.error(
                        "gave up reporting leases; the orchestrator reclaims them after its "
                        "lease timeout",
                        extra={"orchestrator": self.address, "leases": leases, "attempts": attempt},
                    )
                    return
                if attempt == 1:
                    log.warning(
                        "lease report failed; retrying",
                        extra={"orchestrator": self.address, "error": err.code().name},
                    )
            await asyncio.sleep(random.uniform(pause / 2, pause))  # backoff, not a sync
            pause = min(2 * pause, longest)

    async def status(self, *, timeout_s: float) -> AdmissionStatus:
        try:
            response = await self._stub.ListReplicas(
                pb.ListReplicasRequest(), timeout=max(timeout_s, _MIN_TIMEOUT_S)
            )
        except grpc.aio.AioRpcError as err:
            message = f"orchestrator: {err.code().name}: {err.details()}"
            if err.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise OrchestratorTimedOut(message) from err
            if err.code() == grpc.StatusCode.UNAVAILABLE:
                raise OrchestratorUnavailable(message) from err
            # An answer (a mesh policy's PERMISSION_DENIED, an older orchestrator's
            # UNIMPLEMENTED, ...): the orchestrator is up, and its Admits are not abandoned.
            raise from_rpc_error(err, "orchestrator") from err
        return status_from_pb(response)

    async def drain(self) -> None:
        """Wait until every report handed to `complete` was delivered or given up on, each
        tried `COMPLETE_ATTEMPTS` times from now on (a cancelled drain leaves the sender
        running)."""
        self._draining = True
        await self._reports.drain()

    async def close(self) -> None:
        """Drain the reports, then close the channel this client opened; later reports are
        not sent."""
        self._closing = True
        if self._reopen is not None:
            self._reopen.cancel()
        if self._stream is not None:
            self._stream.close()  # its unanswered Admits fail as not reached
        await self.drain()
        self._closed = True
        if self._channel is not None:
            await self._channel.close(None)
