"""KEDA external scaler (`externalscaler.ExternalScaler`) over the autoscaler core.

A ScaledObject's trigger metadata names the pool and model version. The metric is the
recommended replica count with a per-replica target of 1, so the HPA that KEDA drives computes
desired = ceil(value / 1) = the recommendation; IsActive is true while it is above zero.
A pool the autoscaler has no signal for yet holds at `min_replicas`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc

from llmmesh.common.errors import InvalidArgument, ServiceError, abort
from llmmesh.keda import externalscaler_pb2 as pb
from llmmesh.keda import externalscaler_pb2_grpc as pb_grpc
from services.autoscaler.core import Autoscaler
from services.autoscaler.settings import AutoscalerSettings

Ctx = grpc.aio.ServicerContext[object, object]


def pool_key(ref: pb.ScaledObjectRef) -> tuple[str, str]:
    pool = ref.scalerMetadata.get("pool", "")
    version = ref.scalerMetadata.get("model_version", "")
    if not pool:
        raise InvalidArgument("trigger metadata must name the pool", field="scalerMetadata.pool")
    if not version:
        raise InvalidArgument(
            "trigger metadata must name the model version", field="scalerMetadata.model_version"
        )
    return pool, version


def metric_name(pool: str, version: str) -> str:
    return f"llmmesh-{pool}-{version}-desired-replicas"


class KedaScalerServicer(pb_grpc.ExternalScalerServicer):
    def __init__(self, core: Autoscaler, settings: AutoscalerSettings):
        self._core = core
        self._settings = settings

    def _desired(self, key: tuple[str, str]) -> int:
        for rec in self._core.latest():
            if (rec.pool, rec.model_version) == key:
                return rec.desired
        return self._settings.min_replicas

    async def IsActive(self, request: pb.ScaledObjectRef, context: Ctx) -> pb.IsActiveResponse:
        try:
            return pb.IsActiveResponse(result=self._desired(pool_key(request)) > 0)
        except ServiceError as err:
            await abort(context, err)
            raise

    async def StreamIsActive(
        self, request: pb.ScaledObjectRef, context: Ctx
    ) -> AsyncIterator[pb.IsActiveResponse]:
        try:
            key = pool_key(request)
        except ServiceError as err:
            await abort(context, err)
            raise
        last: bool | None = None
        while True:
            active = self._desired(key) > 0
            if active != last:
                yield pb.IsActiveResponse(result=active)
                last = active
            await asyncio.sleep(self._settings.interval_s)

    async def GetMetricSpec(
        self, request: pb.ScaledObjectRef, context: Ctx
    ) -> pb.GetMetricSpecResponse:
        try:
            pool, version = pool_key(request)
        except ServiceError as err:
            await abort(context, err)
            raise
        return pb.GetMetricSpecResponse(
            metricSpecs=[
                pb.MetricSpec(
                    metricName=metric_name(pool, version), targetSize=1, targetSizeFloat=1.0
                )
            ]
        )

    async def GetMetrics(
        self, request: pb.GetMetricsRequest, context: Ctx
    ) -> pb.GetMetricsResponse:
        try:
            pool, version = pool_key(request.scaledObjectRef)
        except ServiceError as err:
            await abort(context, err)
            raise
        desired = self._desired((pool, version))
        return pb.GetMetricsResponse(
            metricValues=[
                pb.MetricValue(
                    metricName=metric_name(pool, version),
                    metricValue=desired,
                    metricValueFloat=float(desired),
                )
            ]
        )
