"""Request migration with a real LLM: two Triton replicas serving SmolLM2-135M-Instruct on CPU
(`model_repository/smollm2`). A greedy stream whose replica is killed with SIGKILL mid-stream
continues on the other replica from the prompt plus the tokens generated so far, and its text
equals the uninterrupted greedy answer."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import cast

import grpc
import pytest
import pytest_asyncio

from llmmesh.generated.gateway.v1 import gateway_pb2 as pb
from llmmesh.generated.orchestrator.v1 import orchestrator_pb2 as orch_pb
from llmmesh.localmesh import MODEL_NAME
from tests.integration.conftest import Mesh, start_mesh

pytestmark = [
    pytest.mark.integration,
    pytest.mark.asyncio(loop_scope="session"),
    # Two replicas load torch and the weights (~30 s each alone, more on a busy machine).
    pytest.mark.timeout(600),
]

N = 24  # a CPU decodes slowly: short, killed after a third
KILL_AFTER = 8
PROMPT = "The first ten prime numbers, in words, are"


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def real_mesh(tokenizer_path: Path) -> AsyncIterator[Mesh]:
    m = await start_mesh(tokenizer_path, replicas=2, engine="smollm2", context_length=2048)
    yield m
    await m.close()
    await m.mesh.stop()


def request(rid: str) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        model=MODEL_NAME,
        text=PROMPT,
        sampling=pb.SamplingParams(max_tokens=N, temperature=0),
        request_id=rid,
    )


def ids_and_text(msgs: list[pb.GenerateResponse]) -> tuple[list[int], str]:
    deltas = [m.delta for m in msgs if m.HasField("delta")]
    return [t for d in deltas for t in d.token_ids], "".join(d.text for d in deltas)


async def test_migrated_greedy_text_equals_the_uninterrupted_answer(real_mesh: Mesh) -> None:
    reference = [m async for m in real_mesh.gateway.Generate(request("reference"), timeout=300)]
    ref_ids, ref_text = ids_and_text(reference)
    assert len(ref_ids) == N, "the reference must not stop early (no end id before N tokens)"

    call = real_mesh.gateway.Generate(request("migrated"), timeout=300)
    msgs: list[pb.GenerateResponse] = []
    killed = ""
    while (msg := await call.read()) is not grpc.aio.EOF:  # type: ignore[attr-defined]
        msgs.append(cast(pb.GenerateResponse, msg))
        if not killed and len(ids_and_text(msgs)[0]) >= KILL_AFTER:
            resp = await real_mesh.orchestrator.ListReplicas(
                orch_pb.ListReplicasRequest(), timeout=5
            )
            [killed] = [r.replica.id for r in resp.replicas if r.in_flight > 0]
            real_mesh.mesh.tritons[real_mesh.mesh.replica_ids.index(killed)].kill()
    assert killed
    ids, text = ids_and_text(msgs)
    assert (ids, text) == (ref_ids, ref_text)
    final = msgs[-1].complete
    assert final.replica_id != killed
    assert final.usage.completion_tokens == N
    assert final.usage.prompt_tokens == reference[-1].complete.usage.prompt_tokens
