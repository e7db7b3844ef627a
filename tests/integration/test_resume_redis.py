"""Gateways sharing the idempotency store in Redis (services/gateway/resume_redis.py), on real
processes: a keyed stream on gateway 1, gateway 1 killed with SIGKILL mid-stream, the client
resumes from its last offset through gateway 2 with the same request id. The concatenated stream
has no lost and no duplicated token and equals the emulator's tokens for (seed, prompt)."""

from __future__ import annotations

import signal
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import cast

import grpc
import pytest
import pytest_asyncio

from llmmesh.common import metric_names as names
from llmmesh.emulator.settings import EmulatorSettings
from llmmesh.emulator.tokens import expected_output_ids
from llmmesh.generated.gateway.v1 import gateway_pb2 as pb
from llmmesh.generated.gateway.v1 import gateway_pb2_grpc as pb_grpc
from llmmesh.localmesh import MODEL_NAME, ServiceProcess
from llmmesh.redis_server import RedisServer
from tests.integration.conftest import Mesh, gateway_process, metric, start_mesh

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="session")]

PROMPT = list(range(3000, 3040))
SEED = 777
N = 400  # a few seconds of decoding at the emulator's speed
KILL_AFTER = 60
LEASE_S = 1.0


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start_blocking()
    try:
        yield server
    finally:
        server.stop()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def rmesh(tokenizer_path: Path) -> AsyncIterator[Mesh]:
    m = await start_mesh(tokenizer_path, replicas=1, time_scale=1.0)
    yield m
    await m.close()
    await m.mesh.stop()


async def gateway(
    mesh: Mesh, name: str, tokenizer_path: Path, redis: RedisServer
) -> ServiceProcess:
    workdir = mesh.mesh.workdir / name
    workdir.mkdir()
    gw = gateway_process(
        mesh,
        workdir,
        tokenizer_path,
        resume_redis_url=redis.url,
        resume_redis_lease_s=LEASE_S,
    )
    await gw.start()
    return gw


def tokens(msgs: list[pb.GenerateResponse]) -> list[int]:
    return [t for m in msgs if m.HasField("delta") for t in m.delta.token_ids]


async def read_and_kill(call: object, got: list[pb.GenerateResponse], gw: ServiceProcess) -> None:
    """Read `call` into `got`; SIGKILL `gw` once KILL_AFTER tokens arrived."""
    killed = False
    while (msg := await call.read()) is not grpc.aio.EOF:  # type: ignore[attr-defined]
        got.append(cast(pb.GenerateResponse, msg))
        if not killed and len(tokens(got)) >= KILL_AFTER:
            gw.signal(signal.SIGKILL)
            await gw.wait()
            killed = True


async def test_a_client_resumes_through_another_gateway_after_its_gateway_was_killed(
    rmesh: Mesh, tokenizer_path: Path, redis_server: RedisServer
) -> None:
    gw1 = await gateway(rmesh, "gw1", tokenizer_path, redis_server)
    gw2 = await gateway(rmesh, "gw2", tokenizer_path, redis_server)
    req = pb.GenerateRequest(
        model=MODEL_NAME,
        token_ids=pb.TokenIds(ids=PROMPT),
        sampling=pb.SamplingParams(max_tokens=N, seed=SEED, temperature=0),
        request_id="resume-through-gw2",
    )
    try:
        first: list[pb.GenerateResponse] = []
        async with grpc.aio.insecure_channel(gw1.address) as ch:
            call = pb_grpc.GatewayServiceStub(ch).Generate(req, timeout=120)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await read_and_kill(call, first, gw1)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        sent = len(tokens(first))
        assert sent >= KILL_AFTER

        killed_at = time.monotonic()
        resume = pb.GenerateRequest()
        resume.CopyFrom(req)
        resume.resume_from = sent
        async with grpc.aio.insecure_channel(gw2.address) as ch:
            rest: list[pb.GenerateResponse] = []
            first_after_s = None
            async for msg in pb_grpc.GatewayServiceStub(ch).Generate(resume, timeout=120):
                if first_after_s is None:
                    first_after_s = time.monotonic() - killed_at
                rest.append(msg)

        stream = first + rest
        deltas = [m.delta for m in stream if m.HasField("delta")]
        got = tokens(stream)
        expected = expected_output_ids(SEED, PROMPT, N, EmulatorSettings())
        print(
            f"gateway 1 sent {sent} tokens before SIGKILL; gateway 2 sent {len(tokens(rest))}; "
            f"first resumed message {first_after_s:.2f} s after the kill (lease {LEASE_S} s)"
        )
        assert len(got) == N, "no token lost or duplicated"
        assert got == expected
        offsets = [d.offset for d in deltas]
        assert offsets == [sum(len(d.token_ids) for d in deltas[:i]) for i in range(len(deltas))]
        final = stream[-1].complete
        assert final.finish_reason == pb.FINISH_REASON_LENGTH
        assert final.usage.completion_tokens == N
        assert metric(gw2.metrics_url, names.GATEWAY_RESUME_REQUESTS, result="taken_over") == 1

        # Finished under gateway 2, it replays from Redis on either gateway: gateway 1 restarted.
        await gw1.restart()
        async with grpc.aio.insecure_channel(gw1.address) as ch:
            again = [m async for m in pb_grpc.GatewayServiceStub(ch).Generate(resume, timeout=30)]
        assert tokens(again) == expected[sent:]
        assert metric(gw1.metrics_url, names.GATEWAY_RESUME_REQUESTS, result="replayed") == 1
    finally:
        for gw in (gw1, gw2):
            await gw.stop()
