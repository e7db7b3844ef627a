"""gRPC adapter: protobuf ↔ autoscaler core."""

from __future__ import annotations

import grpc

from llmmesh.generated.autoscaler.v1 import autoscaler_pb2 as pb
from llmmesh.generated.autoscaler.v1 import autoscaler_pb2_grpc as pb_grpc
from services.autoscaler.core import Autoscaler, Recorded
from services.autoscaler.signals import PoolSignals

Ctx = grpc.aio.ServicerContext[object, object]


def signals_pb(s: PoolSignals) -> pb.PoolSignals:
    out = pb.PoolSignals(reporting_replicas=s.reporting_replicas or 0, sampled_at=s.sampled_at)
    if s.replicas_known is not None:
        out.known_replicas = s.replicas_known
    optional = {
        "active_requests": s.engine_active,
        "waiting_requests": s.engine_waiting,
        "kv_utilization": s.kv_utilization,
        "queue_depth": s.queue_depth,
        "queue_wait_p90_seconds": s.queue_wait_p90_s,
        "ttft_p90_seconds": s.ttft_p90_s,
        "itl_p90_seconds": s.itl_p90_s,
        "arrival_rate": s.arrival_rate,
        "prompt_tokens_rate": s.prompt_tokens_rate,
        "completion_tokens_rate": s.completion_tokens_rate,
    }
    for name, value in optional.items():
        if value is not None:
            setattr(out, name, value)
    return out


def recommendation_pb(r: Recorded) -> pb.PoolRecommendation:
    d = r.decision
    out = pb.PoolRecommendation(
        pool=r.key.pool,
        model_version=r.key.model_version,
        current_replicas=d.current,
        desired_replicas=d.desired,
        reason=d.reason,
        signals=signals_pb(d.signals),
        computed_at=r.decided_at,
        cause=d.cause.value,
        panic=d.panic,
        sequence=r.sequence,
    )
    if r.counts is not None:
        out.ready_replicas = r.counts.ready
        out.starting_replicas = r.counts.starting
        out.draining_replicas = r.counts.draining
    e = d.estimates
    for name, value in (
        ("capacity_replicas", e.capacity_replicas),
        ("target_replicas", e.target_replicas),
        ("correction", e.correction),
        ("forecast_arrival_rate", e.forecast_arrival_rate),
    ):
        if value is not None:
            setattr(out, name, value)
    return out


class AutoscalerServicer(pb_grpc.AutoscalerServiceServicer):
    def __init__(self, core: Autoscaler):
        self._core = core

    async def GetRecommendations(
        self, request: pb.GetRecommendationsRequest, context: Ctx
    ) -> pb.GetRecommendationsResponse:
        return pb.GetRecommendationsResponse(
            pools=[recommendation_pb(r) for r in self._core.latest()]
        )

    async def ListDecisions(
        self, request: pb.ListDecisionsRequest, context: Ctx
    ) -> pb.ListDecisionsResponse:
        found = self._core.decisions(
            pool=request.pool if request.HasField("pool") else None,
            model_version=request.model_version if request.HasField("model_version") else None,
            after_sequence=request.after_sequence,
            limit=request.limit,
            changes_only=request.changes_only,
        )
        return pb.ListDecisionsResponse(decisions=[recommendation_pb(r) for r in found])
