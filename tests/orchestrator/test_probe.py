"""TritonProbe against a fake Triton health API on an ephemeral port: one ModelReady call per
model and round, and Triton's refusals while its server is not ready read as not ready."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import AsyncIterator

import grpc
import pytest
from tritonclient.grpc import service_pb2, service_pb2_grpc

from services.orchestrator.probe import IDLE_CLOSE_S, TritonProbe
from services.orchestrator.settings import ReplicaSpec
from tests.helpers import grpc_served


class FakeTriton(service_pb2_grpc.GRPCInferenceServiceServicer):  # type: ignore[misc]
    """Triton's readiness answers: `server_ready` False answers ModelReady as Triton does while
    starting or exiting (UNAVAILABLE "Server not ready"); `unready` models answer not ready."""

    def __init__(self) -> None:
        self.server_ready = True
        self.unready: set[str] = set()
        self.calls: list[str] = []

    async def ServerReady(
        self,
        request: service_pb2.ServerReadyRequest,
        context: grpc.aio.ServicerContext[object, object],
    ) -> service_pb2.ServerReadyResponse:
        self.calls.append("ServerReady")
        return service_pb2.ServerReadyResponse(ready=self.server_ready)

    async def ModelReady(
        self,
        request: service_pb2.ModelReadyRequest,
        context: grpc.aio.ServicerContext[object, object],
    ) -> service_pb2.ModelReadyResponse:
        self.calls.append(f"ModelReady:{request.name}")
        if not self.server_ready:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "Server not ready")
        return service_pb2.ModelReadyResponse(ready=request.name not in self.unready)


@contextlib.asynccontextmanager
async def triton() -> AsyncIterator[tuple[FakeTriton, str]]:
    fake = FakeTriton()
    register = functools.partial(service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server, fake)
    async with grpc_served(register) as address:
        yield fake, address


@pytest.fixture
async def probe() -> AsyncIterator[TritonProbe]:
    p = TritonProbe()
    yield p
    await p.close()


async def test_a_ready_replica_costs_one_call_per_model(probe: TritonProbe) -> None:
    async with triton() as (fake, address):
        spec = ReplicaSpec(id="r0", grpc_address=address, models=["a", "b"])
        assert await probe.ready(spec, spec.models, 5.0)
        assert fake.calls == ["ModelReady:a", "ModelReady:b"]


async def test_a_model_not_ready_is_not_ready(probe: TritonProbe) -> None:
    async with triton() as (fake, address):
        fake.unready = {"b"}
        spec = ReplicaSpec(id="r0", grpc_address=address, models=["a", "b"])
        assert not await probe.ready(spec, spec.models, 5.0)


async def test_a_server_not_ready_fails_the_probe(probe: TritonProbe) -> None:
    """Triton refuses ModelReady while the server starts or exits: the probe raises, which
    `Health.probe` counts as not ready."""
    async with triton() as (fake, address):
        fake.server_ready = False
        spec = ReplicaSpec(id="r0", grpc_address=address)
        with pytest.raises(Exception, match="Server not ready"):
            await probe.ready(spec, spec.models, 5.0)


async def test_no_models_asks_the_server(probe: TritonProbe) -> None:
    async with triton() as (fake, address):
        spec = ReplicaSpec(id="r0", grpc_address=address)
        fake.server_ready = False
        assert not await probe.ready(spec, (), 5.0)
        assert fake.calls == ["ServerReady"]


async def test_the_clients_of_replicas_gone_are_closed() -> None:
    """Pods come and go, each at its own address: the probe keeps a client for the replicas
    probed lately, not for every address it ever probed."""
    now = [0.0]
    probe = TritonProbe(clock=lambda: now[0])
    try:
        async with triton() as (_, address):
            for i in range(20):  # replicas gone since: their addresses refuse (no server)
                spec = ReplicaSpec(id=f"gone-{i}", grpc_address=f"127.0.0.1:{i + 1}")
                with contextlib.suppress(Exception):
                    await probe.ready(spec, (), 0.05)
            assert probe.clients == 20
            live = ReplicaSpec(id="r0", grpc_address=address, models=["a"])
            now[0] = IDLE_CLOSE_S / 2
            assert await probe.ready(live, live.models, 5.0)
            now[0] = IDLE_CLOSE_S + 1
            assert await probe.ready(live, live.models, 5.0)
            assert probe.clients == 1
    finally:
        await probe.close()
