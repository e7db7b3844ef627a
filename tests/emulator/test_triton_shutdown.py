"""A replica that served streaming traffic stops cleanly on SIGTERM (exit status 0).

Regression test for replicas that, after traffic, sat out Triton's 30 s exit timeout on SIGTERM
and exited 1. The clients here end every stream the way Triton 2.51 needs: read to the end of the
stream after the final response, or cancel *before* it. Cancelling a `ModelStreamInfer` call after
its final response, while Triton is already finishing the stream, can leave a gRPC-frontend state
(and with it the model) alive in Triton 2.51 whatever the model does: its log then shows
"Waiting for the callback to retrieve cancellation ... step CANCELLATION_ISSUED" and the model is
never unloaded, so finalize() is never called.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
from tritonclient.grpc import service_pb2, service_pb2_grpc

from llmmesh.common.settings import settings_of, to_env
from llmmesh.emulator.settings import EmulatorSettings
from llmmesh.generated.kvregistry.v1 import kvregistry_pb2_grpc
from llmmesh.triton.launcher import TritonPorts, TritonServer
from tests.emulator.test_triton_emulator import REPO, RecordingRegistry, build
from tests.helpers import grpc_served

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="session")]


@pytest_asyncio.fixture(loop_scope="session")
async def registry() -> AsyncIterator[tuple[RecordingRegistry, str]]:
    reg = RecordingRegistry()  # type: ignore[abstract]  # PublishEvents and Lookup only
    register = functools.partial(kvregistry_pb2_grpc.add_KvRegistryServiceServicer_to_server, reg)
    async with grpc_served(register) as address:
        yield reg, address


def replica(log: Path, registry_address: str) -> TritonServer:
    return TritonServer(
        REPO,
        TritonPorts.free(),
        env=to_env(
            settings_of(
                EmulatorSettings,
                replica_id="emu-shutdown",
                kv_registry_address=registry_address,
                time_scale=0.01,
                num_kv_blocks=2048,
                cancellation_check_period_ms=5.0,
                publish_interval_ms=5.0,
            )
        ),
        log_path=log,
    )


async def stream_to_end(
    stub: service_pb2_grpc.GRPCInferenceServiceStub, req: service_pb2.ModelInferRequest
) -> int:
    """Send one request and read every response up to the end of the stream; the count."""
    call = stub.ModelStreamInfer()
    await call.write(req)
    await call.done_writing()
    replies = 0
    async for msg in call:
        assert isinstance(msg, service_pb2.ModelStreamInferResponse)
        assert not msg.error_message, msg.error_message
        replies += 1
    return replies


async def cancel_mid_stream(stub: service_pb2_grpc.GRPCInferenceServiceStub) -> None:
    call = stub.ModelStreamInfer()
    await call.write(build(list(range(300, 340)), 20_000))
    await call.done_writing()
    for _ in range(3):
        msg = await call.read()
        assert isinstance(msg, service_pb2.ModelStreamInferResponse)
        assert not msg.error_message
    call.cancel()


async def test_replica_exits_0_on_sigterm_after_streaming(
    tmp_path: Path, registry: tuple[RecordingRegistry, str]
) -> None:
    reg, address = registry
    log = tmp_path / "tritonserver.log"
    server = replica(log, address)
    await server.start(ready_timeout_s=60)
    try:
        channel = grpc.aio.insecure_channel(server.grpc_address)
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        try:
            prompts = [list(range(1000 + 50 * i, 1040 + 50 * i)) for i in range(12)]
            counts = await asyncio.wait_for(
                asyncio.gather(
                    *(stream_to_end(stub, build(p, 16, seed=i)) for i, p in enumerate(prompts)),
                    stream_to_end(stub, build(prompts[0], 16, seed=0)),  # prefix reuse
                    stream_to_end(stub, build([7, 8, 9], 10, streaming=False)),
                    cancel_mid_stream(stub),
                ),
                timeout=60,
            )
            # 16 responses per streaming request (the last one final), 1 when not streaming.
            assert counts[:13] == [16] * 13
            assert counts[13] == 1
        finally:
            await channel.close(None)
        assert reg.stored, "KV events reached kv_registry"
    finally:
        rc = await server.stop()
    text = log.read_text(errors="replace")
    assert rc == 0, server.log_tail()
    assert server.returncode == 0
    assert "engine emulator stopped" in text, server.log_tail()  # finalize() ran to its end
    assert "Traceback" not in text, server.log_tail()
