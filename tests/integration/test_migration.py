"""Request migration on real processes: the Triton replica serving a stream is killed with
SIGKILL mid-stream; the gateway continues the request on another replica and the client's one
stream equals the uninterrupted one token for token (the emulator's tokens, like a greedy
model's, are a function of the context so far)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import cast

import grpc
import pytest
import pytest_asyncio

from llmmesh.common import metric_names as names
from llmmesh.emulator.settings import EmulatorSettings
from llmmesh.emulator.tokens import expected_output_ids
from llmmesh.generated.gateway.v1 import gateway_pb2 as pb
from llmmesh.generated.orchestrator.v1 import orchestrator_pb2 as orch_pb
from llmmesh.localmesh import MODEL_NAME
from tests.integration.conftest import Mesh, metric, start_mesh

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="session")]

PROMPT = list(range(2000, 2040))
SEED = 4242
N = 400  # a few seconds of decoding at the emulator's H100-like speed
KILL_AFTER = 40


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def mmesh(tokenizer_path: Path) -> AsyncIterator[Mesh]:
    m = await start_mesh(tokenizer_path, replicas=3, time_scale=1.0)
    yield m
    await m.close()
    await m.mesh.stop()


async def serving_replica(mesh: Mesh) -> str:
    resp = await mesh.orchestrator.ListReplicas(orch_pb.ListReplicasRequest(), timeout=5)
    [busy] = [r.replica.id for r in resp.replicas if r.in_flight > 0]
    return busy


def kill_replica(mesh: Mesh, replica_id: str) -> None:
    mesh.mesh.tritons[mesh.mesh.replica_ids.index(replica_id)].kill()


async def test_killed_replica_mid_stream_the_stream_continues_exactly(mmesh: Mesh) -> None:
    gateway_metrics = mmesh.mesh.services["gateway"].metrics_url
    before = metric(gateway_metrics, names.GATEWAY_MIGRATIONS, phase="mid_stream")
    req = pb.GenerateRequest(
        model=MODEL_NAME,
        token_ids=pb.TokenIds(ids=PROMPT),
        sampling=pb.SamplingParams(max_tokens=N, seed=SEED, temperature=0),
        request_id="migrate-1",
    )
    call = mmesh.gateway.Generate(req, timeout=120)
    msgs: list[pb.GenerateResponse] = []
    killed = ""
    while (msg := await call.read()) is not grpc.aio.EOF:  # type: ignore[attr-defined]
        msgs.append(cast(pb.GenerateResponse, msg))
        got = sum(len(m.delta.token_ids) for m in msgs if m.HasField("delta"))
        if not killed and got >= KILL_AFTER:
            killed = await serving_replica(mmesh)
            kill_replica(mmesh, killed)
    assert killed
    deltas = [m.delta for m in msgs if m.HasField("delta")]
    tokens = [t for d in deltas for t in d.token_ids]
    expected = expected_output_ids(SEED, PROMPT, N, EmulatorSettings())
    assert len(tokens) == N, "no token lost or duplicated"
    assert tokens == expected
    offsets = [d.offset for d in deltas]
    assert offsets == [sum(len(d.token_ids) for d in deltas[:i]) for i in range(len(deltas))]
    final = msgs[-1].complete
    assert final.finish_reason == pb.FINISH_REASON_LENGTH
    assert (final.usage.prompt_tokens, final.usage.completion_tokens) == (len(PROMPT), N)
    assert final.replica_id != killed
    assert metric(gateway_metrics, names.GATEWAY_MIGRATIONS, phase="mid_stream") == before + 1
    assert (
        metric(gateway_metrics, names.GATEWAY_MIGRATIONS, phase="mid_stream", outcome="migrated")
        >= 1
    )

    # The idempotency store followed the migration: resuming replays the rest, nothing new.
    resume = pb.GenerateRequest()
    resume.CopyFrom(req)
    resume.resume_from = deltas[9].offset + len(deltas[9].token_ids)
    again = [m async for m in mmesh.gateway.Generate(resume, timeout=30)]
    rest = [t for m in again if m.HasField("delta") for t in m.delta.token_ids]
    assert rest == expected[resume.resume_from :]
    assert again[-1].complete.usage.completion_tokens == N
