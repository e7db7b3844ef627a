"""KEDA external scaler conformance over a real gRPC channel (settings → core → server → stub)."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator

import grpc
import pytest
import pytest_asyncio

from llmmesh.common.server import ManagedServer, ServiceRegistration
from llmmesh.common.topology import PoolKey
from llmmesh.generated.keda import externalscaler_pb2 as pb
from llmmesh.generated.keda import externalscaler_pb2_grpc as pb_grpc
from services.autoscaler.core import Autoscaler
from services.autoscaler.keda import KedaScalerServicer, metric_name
from services.autoscaler.settings import AutoscalerSettings
from tests.autoscaler.fakes import FakeClock, FakeSource
from tests.autoscaler.test_policy import BASE, sig

SOURCE = FakeSource()
CLOCK = FakeClock()
CORE: list[Autoscaler] = []
SERVICER: list[KedaScalerServicer] = []


@pytest_asyncio.fixture
async def stub() -> AsyncIterator[pb_grpc.ExternalScalerAsyncStub]:
    settings = AutoscalerSettings(
        default_policy={**BASE, "min_replicas": 0, "scale_to_zero_idle_s": 0}, interval_s=0.01
    )
    # short: one replica carrying 40 requests (target 10) -> 4; long: idle at 1 -> 0.
    SOURCE.signals = {
        PoolKey("short", "v1"): sig(CLOCK.t, 1, load=35, engine_waiting=5.0),
        PoolKey("long", "v1"): sig(CLOCK.t, 1),
    }
    core = Autoscaler(settings, SOURCE, clock=CLOCK, timer=CLOCK)
    await core.evaluate()
    CORE[:] = [core]
    servicer = KedaScalerServicer(core)
    SERVICER[:] = [servicer]
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


@pytest.mark.parametrize(("pool", "desired", "active"), [("short", 4, True), ("long", 0, False)])
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


async def test_a_pool_not_decided_is_answered_unavailable(
    stub: pb_grpc.ExternalScalerAsyncStub,
) -> None:
    """A pool the autoscaler knows nothing of (not decided yet, or a trigger naming a pool no
    source reads): no count is made up (a 0 would scale it to its ScaledObject's minimum). KEDA
    counts the failure, the HPA keeps its count, and past `failureThreshold` KEDA applies the
    ScaledObject's fallback; StreamIsActive sends nothing until the pool is decided."""
    unknown = ref("unknown")
    for call in (
        stub.GetMetrics(
            pb.GetMetricsRequest(scaledObjectRef=unknown, metricName=metric_name("unknown", "v1"))
        ),
        stub.IsActive(unknown),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    stream = stub.StreamIsActive(unknown)
    SOURCE.signals[PoolKey("unknown", "v1")] = sig(CLOCK.t, 1, load=35)
    await CORE[0].evaluate()  # now decided: its state is pushed
    pushed = await stream.read()
    assert isinstance(pushed, pb.IsActiveResponse)
    assert pushed.result is True
    stream.cancel()


async def test_stream_is_active_sends_current_state(stub: pb_grpc.ExternalScalerAsyncStub) -> None:
    call = stub.StreamIsActive(ref("short"))
    first = await call.read()
    assert isinstance(first, pb.IsActiveResponse)
    assert first.result is True
    call.cancel()


async def test_hpa_with_target_one_yields_exactly_desired(
    stub: pb_grpc.ExternalScalerAsyncStub,
) -> None:
    """KEDA's HPA (AverageValue target from GetMetricSpec) computes ceil(value / target)."""
    spec = (await stub.GetMetricSpec(ref("short"))).metricSpecs[0]
    value = (
        await stub.GetMetrics(
            pb.GetMetricsRequest(scaledObjectRef=ref("short"), metricName=spec.metricName)
        )
    ).metricValues[0]
    assert math.ceil(value.metricValueFloat / spec.targetSizeFloat) == 4


@pytest.mark.parametrize("metadata", [{}, {"pool": "short"}, {"model_version": "v1"}])
async def test_missing_metadata_is_invalid_argument(
    stub: pb_grpc.ExternalScalerAsyncStub, metadata: dict[str, str]
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.IsActive(pb.ScaledObjectRef(name="x", namespace="y", scalerMetadata=metadata))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "scalerMetadata" in (info.value.details() or "")


async def test_stream_is_active_pushes_a_change_after_an_evaluation(
    stub: pb_grpc.ExternalScalerAsyncStub,
) -> None:
    call = stub.StreamIsActive(ref("long"))
    first = await call.read()
    assert isinstance(first, pb.IsActiveResponse)
    assert first.result is False
    # Requests queue for the pool at zero replicas: the next evaluation scales it from zero.
    SOURCE.signals[PoolKey("long", "v1")] = sig(CLOCK.t, 0, queue_depth=2.0)
    # The stream is waiting for an evaluation; run them until it has answered.
    read = asyncio.ensure_future(call.read())
    while not read.done():
        await CORE[0].evaluate()
        await asyncio.wait({read}, timeout=0.05)
    second = read.result()
    assert isinstance(second, pb.IsActiveResponse)
    assert second.result is True
    call.cancel()


async def test_a_draining_autoscaler_ends_its_streams_unavailable(
    stub: pb_grpc.ExternalScalerAsyncStub,
) -> None:
    """The streams never end on their own: a drain waited its whole bound for them, then cut
    them. KEDA opens an ended one again, on a replica that serves."""
    call = stub.StreamIsActive(ref("short"))
    first = await call.read()
    assert isinstance(first, pb.IsActiveResponse)
    assert first.result is True
    await SERVICER[0].drain()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await asyncio.wait_for(call.read(), 5)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    with pytest.raises(grpc.aio.AioRpcError) as late:
        await asyncio.wait_for(stub.StreamIsActive(ref("long")).read(), 5)
    assert late.value.code() == grpc.StatusCode.UNAVAILABLE
