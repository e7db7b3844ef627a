"""Faults on real processes: a replica dying mid-stream, no replica left, graceful drain."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import cast

import grpc
import pytest
import pytest_asyncio

from llmmesh.generated.gateway.v1 import gateway_pb2 as pb
from llmmesh.generated.orchestrator.v1 import orchestrator_pb2 as orch_pb
from llmmesh.localmesh import MODEL_NAME
from tests.integration.conftest import Mesh, eventually, gateway_process, start_mesh

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="session")]

MODEL = MODEL_NAME


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def fmesh(tokenizer_path: Path) -> AsyncIterator[Mesh]:
    # Dead replicas stay dead here: these tests are about the failure, not the restart.
    m = await start_mesh(tokenizer_path, replicas=2, time_scale=1.0, supervise=False)
    yield m
    await m.close()
    await m.mesh.stop()


async def read_one(call: object) -> pb.GenerateResponse | None:
    """Next message of a server-streaming call, None at the end of the stream."""
    msg = await call.read()  # type: ignore[attr-defined]
    return None if msg is grpc.aio.EOF else cast(pb.GenerateResponse, msg)  # type: ignore[attr-defined]


async def read_all(call: object) -> list[pb.GenerateResponse]:
    out = []
    while (msg := await read_one(call)) is not None:
        out.append(msg)
    return out


def long_request() -> pb.GenerateRequest:
    return pb.GenerateRequest(
        model=MODEL, text="Count slowly", sampling=pb.SamplingParams(max_tokens=3000)
    )


async def test_graceful_drain_finishes_in_flight_stream(fmesh: Mesh, tokenizer_path: Path) -> None:
    # Drain is tested on a second gateway process so the rest of the module keeps one.
    (fmesh.mesh.workdir / "gw2").mkdir()
    gw2 = gateway_process(fmesh, fmesh.mesh.workdir / "gw2", tokenizer_path, drain_seconds=30.0)
    await gw2.start()
    async with grpc.aio.insecure_channel(gw2.address) as ch:
        from llmmesh.generated.gateway.v1 import gateway_pb2_grpc

        stub = gateway_pb2_grpc.GatewayServiceStub(ch)
        req = pb.GenerateRequest(
            model=MODEL, text="Drain me", sampling=pb.SamplingParams(max_tokens=60)
        )
        call = stub.Generate(req, timeout=60)
        first = await read_one(call)
        assert first is not None
        assert first.HasField("delta")
        gw2.signal(signal.SIGTERM)
        rest = await read_all(call)
        assert rest[-1].HasField("complete")
        assert rest[-1].complete.usage.completion_tokens == 60
        # A new request after SIGTERM is refused, not hung.
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in stub.Generate(req, timeout=10):
                pass
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert gw2.proc is not None
    assert await asyncio.wait_for(gw2.proc.wait(), 30) == 0


async def test_replica_dying_mid_stream_gives_clear_error(
    fmesh: Mesh, tokenizer_path: Path
) -> None:
    # A gateway without request migration (with it, tests/integration/test_migration.py, the
    # stream would continue on the other replica).
    (fmesh.mesh.workdir / "gw-no-migration").mkdir()
    gw = gateway_process(
        fmesh, fmesh.mesh.workdir / "gw-no-migration", tokenizer_path, max_migrations=0
    )
    await gw.start()
    try:
        async with grpc.aio.insecure_channel(gw.address) as ch:
            from llmmesh.generated.gateway.v1 import gateway_pb2_grpc

            call = gateway_pb2_grpc.GatewayServiceStub(ch).Generate(long_request(), timeout=60)
            first = await read_one(call)
            assert first is not None
            assert first.HasField("delta")
            resp = await fmesh.orchestrator.ListReplicas(orch_pb.ListReplicasRequest(), timeout=5)
            busy = next(r.replica.id for r in resp.replicas if r.in_flight > 0)
            idx = fmesh.mesh.replica_ids.index(busy)
            fmesh.mesh.tritons[idx].kill()
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await read_all(call)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert busy in (info.value.details() or "")
    finally:
        gw.signal(signal.SIGTERM)
        if gw.proc is not None:
            await asyncio.wait_for(gw.proc.wait(), 30)

    async def marked_unhealthy() -> bool:
        r = await fmesh.orchestrator.ListReplicas(orch_pb.ListReplicasRequest(), timeout=5)
        return any(x.replica.id == busy and not x.healthy for x in r.replicas)

    await eventually(marked_unhealthy, what="orchestrator marks the dead replica unhealthy")
    # The surviving replica still serves.
    req = pb.GenerateRequest(
        model=MODEL, text="still there?", sampling=pb.SamplingParams(max_tokens=4)
    )
    msgs = [m async for m in fmesh.gateway.Generate(req, timeout=30)]
    assert msgs[-1].complete.replica_id != busy


async def test_no_replica_ready_is_unavailable(fmesh: Mesh) -> None:
    for t in fmesh.mesh.tritons:
        if t.is_running:
            t.kill()

    async def none_healthy() -> bool:
        r = await fmesh.orchestrator.ListReplicas(orch_pb.ListReplicasRequest(), timeout=5)
        return not any(x.healthy for x in r.replicas)

    await eventually(none_healthy, what="no healthy replica")
    req = pb.GenerateRequest(model=MODEL, text="anyone?", sampling=pb.SamplingParams(max_tokens=4))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in fmesh.gateway.Generate(req, timeout=10):
            pass
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
