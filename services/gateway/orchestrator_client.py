"""The gateway's one boundary with the orchestrator: `AdmissionClient` over gRPC.

The only gateway module that imports the orchestrator's stubs. It converts domain ↔ protobuf
(one function per message) and maps failed calls to the gateway's errors by status code and
typed reason (`google.rpc.ErrorInfo` in the status details), never by message text.

Invariant: every report handed to `complete` is sent (up to `COMPLETE_ATTEMPTS` tries) by a
background task, so a cancelled request still releases its lease; `drain` waits for them. The
orchestrator reclaims a lease it never hears about after its lease timeout. Reports leave in
order, as CompleteBatch calls (`llmmesh.common.batching`): one call in flight at a time, each `COMPLETE_LINGER_S` after the
previous one (the first, after the report that found none queued) and carrying what came
meanwhile, up to `COMPLETE_BATCH`: under load one call releases many leases instead of a call
per request (each costs both processes a gRPC call's CPU). An orchestrator that refuses
CompleteBatch (`errors.NOT_OFFERED`: an older version, or a mesh policy without it) gets one Complete
per report, all of a batch at once. The queue is bounded (`COMPLETE_QUEUE`).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from typing import Final

import grpc

from llmmesh.common.batching import LingerBatcher
from llmmesh.common.channels import KEEPALIVE_OPTIONS, RECONNECT_OPTIONS
from llmmesh.common.errors import (
    NOT_OFFERED,
    Reason,
    ResourceExhausted,
    ServiceError,
    from_rpc_error,
)
from llmmesh.common.sojourn import call_metadata
from llmmesh.common.telemetry import inject_trace_metadata
from llmmesh.common.topology import Priority, ReplicaAddress
from llmmesh.generated.orchestrator.v1 import orchestrator_pb2 as pb
from llmmesh.generated.orchestrator.v1 import orchestrator_pb2_grpc as pb_grpc
from llmmesh.kvblocks import token_bytes
from services.gateway.admission import (
    AdmissionRequest,
    AdmissionStatus,
    KnownReplica,
    Lease,
    LeaseReport,
    Outcome,
)
from services.gateway.errors import NoReplica, OrchestratorUnavailable

log = logging.getLogger(__name__)

COMPLETE_ATTEMPTS: Final = 3
COMPLETE_TIMEOUT_S: Final = 5.0
# A report waits at most this long for others to share its call: a lease's capacity is freed
# this much later (against requests lasting seconds), for one call per linger under load.
COMPLETE_LINGER_S: Final = 0.005
COMPLETE_BATCH: Final = 256  # reports per CompleteBatch call (~25 KB)
# Reports queued for one orchestrator at most (one per lease it granted, so reached only when
# it stopped answering); beyond it the oldest is dropped and its lease reclaimed by timeout.
COMPLETE_QUEUE: Final = 65_536
# Shortest Admit deadline sent: a spent deadline still makes a call that fails as expired.
_MIN_TIMEOUT_S: Final = 0.001

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
# offset from theirs is learnt per caller.
CALLER_ID: Final = f"gateway-{uuid.uuid4().hex[:12]}"
_NO_REPLICA_REASONS: Final = frozenset({Reason.NO_REPLICA, Reason.ACTIVATION_TIMEOUT})


# -- conversions: one function per message -------------------------------------------------
def admit_request_to_pb(request: AdmissionRequest) -> pb.AdmitRequest:
    return pb.AdmitRequest(
        request_id=request.request_id,
        model=request.model,
        prompt_tokens_le32=token_bytes(request.prompt_token_ids),
        max_tokens=request.max_tokens,
        priority=_PRIORITY[request.priority],
        tenant=request.tenant,
        model_version=request.model_version,
        exclude_replicas=sorted(request.exclude_replicas),
    )


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
    )


def status_from_pb(response: pb.ListReplicasResponse) -> AdmissionStatus:
    known = tuple(known_replica_from_pb(r) for r in response.replicas)
    return AdmissionStatus(
        replicas=len(known),
        ready_replicas=sum(1 for r in known if r.routable),
        queue_depth=response.queue_depth,
        known=known,
    )


def _dropped(report: pb.CompleteRequest) -> None:
    """The queue was full: its lease is reclaimed by the orchestrator's lease timeout."""
    log.warning("complete queue full: oldest dropped", extra={"lease_id": report.lease_id})


def admit_error(err: grpc.aio.AioRpcError) -> ServiceError:
    """A failed Admit as a gateway error. UNAVAILABLE is told apart by its typed reason: none
    means the orchestrator itself was not reached."""
    if err.code() == grpc.StatusCode.CANCELLED:
        # Not this caller's cancel (that ends the call with CancelledError here): the
        # orchestrator's gRPC dropped the call unstarted (held too long behind the calls it had
        # not started) or it is stopping. Another orchestrator may serve it; the orchestrator
        # set fills in the retry-after when every one refused.
        return ResourceExhausted(
            f"admission: the orchestrator dropped the call ({err.details()})",
            reason=Reason.DROPPED,
        )
    mapped = from_rpc_error(err, "admission")
    if err.code() == grpc.StatusCode.UNAVAILABLE:
        if mapped.reason is None:
            return OrchestratorUnavailable(f"orchestrator: {err.details()}")
        if mapped.reason in _NO_REPLICA_REASONS:
            return NoReplica(str(mapped), retry_after_s=mapped.retry_after_s, reason=mapped.reason)
    return mapped


# -- client ---------------------------------------------------------------------------------
class OrchestratorClient:
    """`AdmissionClient` on an orchestrator channel (`connect` opens and owns one)."""

    def __init__(
        self,
        stub: pb_grpc.OrchestratorServiceAsyncStub,
        channel: grpc.aio.Channel | None = None,
        address: str = "",
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._stub = stub
        self._wall_clock = wall_clock  # stamps each Admit's send time (`call_metadata`)
        self._channel = channel  # closed by `close` when this client opened it
        self._reports: LingerBatcher[pb.CompleteRequest] = LingerBatcher(
            self._deliver,
            max_batch=COMPLETE_BATCH,
            max_queue=COMPLETE_QUEUE,
            linger_s=COMPLETE_LINGER_S,
            on_drop=_dropped,
            name="lease reports",
        )
        self._batches = True  # False once CompleteBatch was refused (`NOT_OFFERED`)
        self._closed = False
        self.address = address  # for logs: which orchestrator this client reaches

    @classmethod
    def connect(
        cls, address: str, authority: str = "", wall_clock: Callable[[], float] = time.time
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
        return cls(pb_grpc.OrchestratorServiceStub(channel), channel, address, wall_clock)

    @property
    def pending(self) -> int:
        """Reports handed to `complete` and not yet delivered or given up on."""
        return self._reports.queued + self._reports.in_call

    async def admit(self, request: AdmissionRequest, *, timeout_s: float) -> Lease:
        try:
            response = await self._stub.Admit(
                admit_request_to_pb(request),
                timeout=max(timeout_s, _MIN_TIMEOUT_S),
                # The orchestrator reads how long the call waited for it from the time sent.
                metadata=tuple(
                    inject_trace_metadata([*call_metadata(CALLER_ID, self._wall_clock())])
                ),
            )
        except grpc.aio.AioRpcError as err:
            raise admit_error(err) from err
        return lease_from_pb(response)

    def complete(self, report: LeaseReport) -> None:
        if self._closed:
            log.warning("complete after close: not sent", extra={"lease_id": report.lease_id})
            return
        self._reports.put(complete_request_to_pb(report))

    async def _deliver(self, batch: list[pb.CompleteRequest]) -> None:
        """One batch: a CompleteBatch call, or one Complete per report where it is refused."""
        if not (self._batches and await self._send_batch(batch)):
            await asyncio.gather(*(self._send(req) for req in batch))

    async def _send_batch(self, batch: list[pb.CompleteRequest]) -> bool:
        """False: the orchestrator (or the mesh's policy in front of it) does not take
        CompleteBatch: the reports go one Complete each, from now on."""
        req = pb.CompleteBatchRequest(reports=batch)
        for attempt in range(COMPLETE_ATTEMPTS):
            try:
                await self._stub.CompleteBatch(req, timeout=COMPLETE_TIMEOUT_S)
                return True
            except grpc.aio.AioRpcError as err:
                if err.code() in NOT_OFFERED:
                    log.warning(
                        "CompleteBatch refused; one Complete per report",
                        extra={"orchestrator": self.address, "error": err.code().name},
                    )
                    self._batches = False
                    return False
                log.warning(
                    "complete failed",
                    extra={"leases": len(batch), "attempt": attempt, "error": err.code().name},
                )
        return True  # given up on, as a single report is

    async def _send(self, req: pb.CompleteRequest) -> None:
        for attempt in range(COMPLETE_ATTEMPTS):
            try:
                await self._stub.Complete(req, timeout=COMPLETE_TIMEOUT_S)
                return
            except grpc.aio.AioRpcError as err:
                log.warning(
                    "complete failed",
                    extra={"lease_id": req.lease_id, "attempt": attempt, "error": err.code().name},
                )

    async def status(self, *, timeout_s: float) -> AdmissionStatus:
        try:
            response = await self._stub.ListReplicas(
                pb.ListReplicasRequest(), timeout=max(timeout_s, _MIN_TIMEOUT_S)
            )
        except grpc.aio.AioRpcError as err:
            raise OrchestratorUnavailable(
                f"orchestrator: {err.code().name}: {err.details()}"
            ) from err
        return status_from_pb(response)

    async def drain(self) -> None:
        """Wait until every report handed to `complete` was delivered or given up on (a
        cancelled drain leaves the sender running)."""
        await self._reports.drain()

    async def close(self) -> None:
        """Drain the reports, then close the channel this client opened; later reports are
        not sent."""
        await self.drain()
        self._closed = True
        if self._channel is not None:
            await self._channel.close(None)
