"""KEDA external scaler (`externalscaler.ExternalScaler`) over the autoscaler core.

A ScaledObject's trigger metadata names the pool and model version. The metric is the core's
desired replica count with a per-replica target of 1 (KEDA's default metric type AverageValue), so
the HPA that KEDA drives computes desired = ceil(value / 1) = the core's decision; IsActive is true
while it is above zero (KEDA scales 0 <-> 1 on it). A pool not decided yet (`Autoscaler.desired`)
is answered UNAVAILABLE: the HPA keeps its count until, past the ScaledObject's
`failureThreshold`, KEDA applies its `fallback` replicas. StreamIsActive pushes a change after
the evaluation that made it, until the autoscaler drains: then it ends UNAVAILABLE (KEDA opens it
again, on a replica that serves).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import grpc

from llmmesh.common.errors import InvalidArgument, ServiceError, Unavailable, abort
from llmmesh.common.topology import PoolKey
from llmmesh.generated.keda import externalscaler_pb2 as pb
from llmmesh.generated.keda import externalscaler_pb2_grpc as pb_grpc
from services.autoscaler.core import Autoscaler

Ctx = grpc.aio.ServicerContext[object, object]


def pool_key(ref: pb.ScaledObjectRef) -> PoolKey:
    pool = ref.scalerMetadata.get("pool", "")
    version = ref.scalerMetadata.get("model_version", "")
    if not pool:
        raise InvalidArgument("trigger metadata must name the pool", field="scalerMetadata.pool")
    if not version:
        raise InvalidArgument(
            "trigger metadata must name the model version", field="scalerMetadata.model_version"
        )
    return PoolKey(pool, version)


def metric_name(pool: str, version: str) -> str:
    return f"llmmesh-{pool}-{version}-desired-replicas"


class KedaScalerServicer(pb_grpc.ExternalScalerServicer):
    def __init__(self, core: Autoscaler):
        self._core = core
        self._draining = asyncio.Event()

    async def drain(self) -> None:
        """End every StreamIsActive now and as they open (they never end on their own: the
        server's drain would wait its whole bound, then cut them)."""
        self._draining.set()

    def _desired(self, key: PoolKey) -> int:
        return self._core.desired(key)

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
        while not self._draining.is_set():
            with contextlib.suppress(Unavailable):  # not decided yet: nothing to push
                active = self._desired(key) > 0
                if active != last:
                    yield pb.IsActiveResponse(result=active)
                    last = active
            update = asyncio.ensure_future(self._core.wait_for_update())
            drained = asyncio.ensure_future(self._draining.wait())
            try:
                await asyncio.wait((update, drained), return_when=asyncio.FIRST_COMPLETED)
            finally:
                update.cancel()
                drained.cancel()
        await context.abort(grpc.StatusCode.UNAVAILABLE, "autoscaler is draining")

    async def GetMetricSpec(
        self, request: pb.ScaledObjectRef, context: Ctx
    ) -> pb.GetMetricSpecResponse:
        try:
            key = pool_key(request)
        except ServiceError as err:
            await abort(context, err)
            raise
        return pb.GetMetricSpecResponse(
            metricSpecs=[
                pb.MetricSpec(
                    metricName=metric_name(key.pool, key.model_version),
                    targetSize=1,
                    targetSizeFloat=1.0,
                )
            ]
        )

    async def GetMetrics(
        self, request: pb.GetMetricsRequest, context: Ctx
    ) -> pb.GetMetricsResponse:
        try:
            key = pool_key(request.scaledObjectRef)
            desired = self._desired(key)
        except ServiceError as err:
            await abort(context, err)
            raise
        return pb.GetMetricsResponse(
            metricValues=[
                pb.MetricValue(
                    metricName=metric_name(key.pool, key.model_version),
                    metricValue=desired,
                    metricValueFloat=float(desired),
                )
            ]
        )
