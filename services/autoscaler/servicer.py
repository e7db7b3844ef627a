"""gRPC adapter: protobuf ↔ autoscaler core."""

from __future__ import annotations

import grpc

from llmmesh.autoscaler.v1 import autoscaler_pb2 as pb
from llmmesh.autoscaler.v1 import autoscaler_pb2_grpc as pb_grpc
from services.autoscaler.core import Autoscaler

Ctx = grpc.aio.ServicerContext[object, object]


class AutoscalerServicer(pb_grpc.AutoscalerServiceServicer):
    def __init__(self, core: Autoscaler):
        self._core = core

    async def GetRecommendations(
        self, request: pb.GetRecommendationsRequest, context: Ctx
    ) -> pb.GetRecommendationsResponse:
        out = pb.GetRecommendationsResponse()
        for rec in self._core.latest():
            signals = pb.PoolSignals(
                active_requests=rec.signals.active,
                waiting_requests=rec.signals.waiting,
                reporting_replicas=rec.signals.reporting,
            )
            if rec.signals.kv_utilization is not None:
                signals.kv_utilization = rec.signals.kv_utilization
            out.pools.append(
                pb.PoolRecommendation(
                    pool=rec.pool,
                    model_version=rec.model_version,
                    current_replicas=rec.current,
                    desired_replicas=rec.desired,
                    reason=rec.reason,
                    signals=signals,
                    computed_at=rec.computed_at,
                )
            )
        return out
