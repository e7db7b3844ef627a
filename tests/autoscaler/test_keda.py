"""KEDA external scaler conformance over a real gRPC channel (settings → core → server → stub)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
import pytest_asyncio

from llmmesh.common.server import ManagedServer, ServiceRegistration
from llmmesh.keda import externalscaler_pb2 as pb
from llmmesh.keda import externalscaler_pb2_grpc as pb_grpc
from services.autoscaler.core import Autoscaler
from services.autoscaler.keda import KedaScalerServicer, metric_name
from services.autoscaler.settings import AutoscalerSettings, ScrapeTarget
from tests.autoscaler.test_core import metrics

LOADS = {"http://r0/metrics": metrics(35, 5, 1, 100), "http://r1/metrics": metrics(0, 0, 0, 100)}


def fetch(url: str, host: str, timeout: float) -> str:
    return LOADS[url]


@pytest_asyncio.fixture
async def stub() -> AsyncIterator[pb_grpc.ExternalScalerAsyncStub]:
    settings = AutoscalerSettings(
        targets=[
            ScrapeTarget(
                replica_id="r0", metrics_url="http://r0/metrics", pool="short", model_version="v1"
            ),
            ScrapeTarget(
                replica_id="r1", metrics_url="http://r1/metrics", pool="long", model_version="v1"
            ),
        ],
        target_requests_per_replica=10,
        min_replicas=0,
        interval_s=0.01,
    )
    core = Autoscaler(settings, fetch)
    await core.evaluate()
    servicer = KedaScalerServicer(core, settings)
    server = ManagedServer(
        host="127.0.0.1",
        port=0,
        services=[
            ServiceRegistration(
                "externalscaler.ExternalScaler",
                lambda s: pb_grpc.add_ExternalScalerServicer_to_server(servicer, s),
            )
        ],
        drain_seconds=0,
    )
    port = await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield pb_grpc.ExternalScalerStub(channel)
    await server.stop()


def ref(pool: str, version: str = "v1") -> pb.ScaledObjectRef:
    return pb.ScaledObjectRef(
        name="triton", namespace="llmmesh", scalerMetadata={"pool": pool, "model_version": version}
    )


async def test_metric_spec_targets_one_per_replica(stub: pb_grpc.ExternalScalerAsyncStub) -> None:
    resp = await stub.GetMetricSpec(ref("short"))
    assert [(m.metricName, m.targetSize, m.targetSizeFloat) for m in resp.metricSpecs] == [
        (metric_name("short", "v1"), 1, 1.0)
    ]


@pytest.mark.parametrize(
    ("pool", "desired", "active"), [("short", 4, True), ("long", 0, False), ("unknown", 0, False)]
)
async def test_metrics_and_activity(
    stub: pb_grpc.ExternalScalerAsyncStub, pool: str, desired: int, active: bool
) -> None:
    resp = await stub.GetMetrics(
        pb.GetMetricsRequest(scaledObjectRef=ref(pool), metricName=metric_name(pool, "v1"))
    )
    assert [(v.metricValue, v.metricValueFloat) for v in resp.metricValues] == [
        (desired, float(desired))
    ]
    assert (await stub.IsActive(ref(pool))).result is active


async def test_stream_is_active_sends_current_state(stub: pb_grpc.ExternalScalerAsyncStub) -> None:
    call = stub.StreamIsActive(ref("short"))
    first = await call.read()
    assert isinstance(first, pb.IsActiveResponse)
    assert first.result is True
    call.cancel()


@pytest.mark.parametrize("metadata", [{}, {"pool": "short"}, {"model_version": "v1"}])
async def test_missing_metadata_is_invalid_argument(
    stub: pb_grpc.ExternalScalerAsyncStub, metadata: dict[str, str]
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.IsActive(pb.ScaledObjectRef(name="x", namespace="y", scalerMetadata=metadata))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "scalerMetadata" in (info.value.details() or "")
