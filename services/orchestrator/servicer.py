"""gRPC adapter: protobuf ↔ the director, through `convert.py`."""

from __future__ import annotations

import time
from collections.abc import Callable

import grpc
from opentelemetry import trace
from opentelemetry.trace import SpanKind

from llmmesh.common.errors import ServiceError, abort
from llmmesh.common.sojourn import CallerBaselines, read_call
from llmmesh.common.telemetry import extract_trace_context, request_id_var
from llmmesh.generated.orchestrator.v1 import orchestrator_pb2 as pb
from llmmesh.generated.orchestrator.v1 import orchestrator_pb2_grpc as pb_grpc
from services.orchestrator.convert import (
    admission_from_pb,
    lease_to_pb,
    outcome_from_pb,
    spec_from_pb,
    status_to_pb,
)
from services.orchestrator.director import Orchestrator

Ctx = grpc.aio.ServicerContext[object, object]

_tracer = trace.get_tracer("llmmesh.orchestrator")


class OrchestratorServicer(pb_grpc.OrchestratorServiceServicer):
    def __init__(self, core: Orchestrator, wall_clock: Callable[[], float] = time.time):
        self._core = core
        self._wall_clock = wall_clock  # against the callers' send times (`read_call`)
        self._baselines = CallerBaselines()

    async def Admit(self, request: pb.AdmitRequest, context: Ctx) -> pb.AdmitResponse:
        request_id_var.set(request.request_id)
        metadata = context.invocation_metadata()
        call = read_call(metadata, self._wall_clock())
        if call is not None:
            caller, reading = call
            self._core.observe_sojourn(self._baselines.sojourn(caller, reading, self._core.now()))
        parent = extract_trace_context(metadata)
        with _tracer.start_as_current_span(
            "orchestrator.admit", context=parent, kind=SpanKind.SERVER
        ) as span:
            try:
                lease = await self._core.admit(admission_from_pb(request), context.time_remaining())
            except ServiceError as err:
                span.set_attribute("llmmesh.rejected", type(err).__name__)
                await abort(context, err)
                raise
            span.set_attribute("llmmesh.replica", lease.replica.id)
            span.set_attribute("llmmesh.queue_ms", lease.queue_s * 1000)
        return lease_to_pb(lease)

    async def Complete(self, request: pb.CompleteRequest, context: Ctx) -> pb.CompleteResponse:
        outcome, reused_blocks = outcome_from_pb(request)
        self._core.complete(request.lease_id, outcome, reused_blocks)
        return pb.CompleteResponse()

    async def CompleteBatch(
        self, request: pb.CompleteBatchRequest, context: Ctx
    ) -> pb.CompleteBatchResponse:
        complete = self._core.complete
        for report in request.reports:
            outcome, reused_blocks = outcome_from_pb(report)
            complete(report.lease_id, outcome, reused_blocks)
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
        remaining = context.time_remaining()
        # Answer a moment before the deadline so the caller gets the result, not an expiry.
        wait_s = (
            self._core.drain_max_wait_s
            if remaining is None
            else max(remaining - min(1.0, remaining * 0.1), 0.0)
        )
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
