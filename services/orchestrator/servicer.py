"""gRPC adapter: protobuf ↔ orchestrator core."""

from __future__ import annotations

import time

import grpc
from opentelemetry import trace
from pydantic import ValidationError

from llmmesh.common.errors import ServiceError, abort
from llmmesh.common.telemetry import extract_trace_context, request_id_var
from llmmesh.generated.orchestrator.v1 import orchestrator_pb2 as pb
from llmmesh.generated.orchestrator.v1 import orchestrator_pb2_grpc as pb_grpc
from services.orchestrator.core import AdmissionRequest, Orchestrator, Outcome, Priority
from services.orchestrator.errors import BadReplicaSpec
from services.orchestrator.settings import ReplicaSpec

Ctx = grpc.aio.ServicerContext[object, object]

_PRIORITY = {
    pb.PRIORITY_UNSPECIFIED: Priority.STANDARD,
    pb.PRIORITY_INTERACTIVE: Priority.INTERACTIVE,
    pb.PRIORITY_STANDARD: Priority.STANDARD,
    pb.PRIORITY_BATCH: Priority.BATCH,
}
_OUTCOME = {
    pb.OUTCOME_UNSPECIFIED: Outcome.REQUEST_ERROR,
    pb.OUTCOME_SUCCESS: Outcome.SUCCESS,
    pb.OUTCOME_CANCELLED: Outcome.CANCELLED,
    pb.OUTCOME_REPLICA_ERROR: Outcome.REPLICA_ERROR,
    pb.OUTCOME_REQUEST_ERROR: Outcome.REQUEST_ERROR,
}
_tracer = trace.get_tracer("llmmesh.orchestrator")


def replica_to_pb(spec: ReplicaSpec) -> pb.Replica:
    return pb.Replica(
        id=spec.id,
        grpc_address=spec.grpc_address,
        pool=spec.pool,
        model_version=spec.model_version,
        authority=spec.authority,
    )


def spec_from_pb(replica: pb.ReplicaSpec) -> ReplicaSpec:
    """RegisterReplica's spec, validated as a static one is; errors name `replica.<field>`."""
    try:
        return ReplicaSpec(
            id=replica.id,
            grpc_address=replica.grpc_address,
            metrics_url=replica.metrics_url,
            pool=replica.pool,
            model_version=replica.model_version,
            models=list(replica.models),
            authority=replica.authority,
        )
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(x) for x in first["loc"] if isinstance(x, str))
        raise BadReplicaSpec(first["msg"], field=f"replica.{where}") from None


class OrchestratorServicer(pb_grpc.OrchestratorServiceServicer):
    def __init__(self, core: Orchestrator):
        self._core = core

    async def Admit(self, request: pb.AdmitRequest, context: Ctx) -> pb.AdmitResponse:
        request_id_var.set(request.request_id)
        parent = extract_trace_context(context.invocation_metadata())
        with _tracer.start_as_current_span("orchestrator.admit", context=parent) as span:
            req = AdmissionRequest(
                request_id=request.request_id,
                model=request.model,
                prompt_token_ids=request.prompt_token_ids,
                max_tokens=request.max_tokens,
                priority=_PRIORITY.get(request.priority, Priority.STANDARD),
                tenant=request.tenant,
                model_version=request.model_version,
            )
            try:
                lease = await self._core.admit(req, context.time_remaining())
            except ServiceError as err:
                span.set_attribute("llmmesh.rejected", type(err).__name__)
                await abort(context, err)
                raise
            span.set_attribute("llmmesh.replica", lease.replica.id)
            span.set_attribute("llmmesh.queue_ms", lease.queue_s * 1000)
        return pb.AdmitResponse(
            lease_id=lease.lease_id,
            replica=pb.Replica(
                id=lease.replica.id,
                grpc_address=lease.replica.grpc_address,
                pool=lease.replica.pool,
            ),
            queue_ms=lease.queue_s * 1000.0,
        )

    async def Complete(self, request: pb.CompleteRequest, context: Ctx) -> pb.CompleteResponse:
        outcome = _OUTCOME.get(request.outcome, Outcome.REQUEST_ERROR)
        ran_prompt = outcome is Outcome.SUCCESS or request.HasField("time_to_first_token_ms")
        self._core.complete(
            request.lease_id, outcome, request.kv_cache_reused_blocks if ran_prompt else None
        )
        return pb.CompleteResponse()

    async def ListReplicas(
        self, request: pb.ListReplicasRequest, context: Ctx
    ) -> pb.ListReplicasResponse:
        now = time.monotonic()
        out = pb.ListReplicasResponse(queue_depth=self._core.queue_depth)
        for st in self._core.replicas():
            status = pb.ReplicaStatus(
                replica=replica_to_pb(st.spec),
                healthy=st.healthy(now),
                in_flight=st.in_flight,
                completed=st.completed,
                failures=st.failures,
                consecutive_errors=st.consecutive_errors,
                draining=st.draining,
                registered=st.registered,
            )
            if st.ejected(now):
                status.ejected_for_s = st.ejected_until - now
            out.replicas.append(status)
        return out

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
