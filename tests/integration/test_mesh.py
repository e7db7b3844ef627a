"""End to end on real processes: tritonserver with the emulator, and the four services."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from llmmesh.common import metric_names as names
from llmmesh.emulator.settings import EmulatorSettings
from llmmesh.emulator.tokens import expected_output_ids
from llmmesh.generated.gateway.v1 import gateway_pb2 as pb
from llmmesh.generated.kvregistry.v1 import kvregistry_pb2 as kv_pb
from llmmesh.generated.orchestrator.v1 import orchestrator_pb2 as orch_pb
from llmmesh.localmesh import MODEL_NAME
from tests.integration.conftest import Mesh, eventually, metric

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="session")]

MODEL = MODEL_NAME


async def collect(
    mesh: Mesh, request: pb.GenerateRequest, deadline_s: float = 60
) -> list[pb.GenerateResponse]:
    return [m async for m in mesh.gateway.Generate(request, timeout=deadline_s)]


async def test_list_models(mesh: Mesh) -> None:
    resp = await mesh.gateway.ListModels(pb.ListModelsRequest(), timeout=5)
    assert [m.name for m in resp.models] == [MODEL]


async def test_stream_matches_emulator_tokens(mesh: Mesh) -> None:
    prompt = list(range(1000, 1040))
    req = pb.GenerateRequest(
        model=MODEL,
        token_ids=pb.TokenIds(ids=prompt),
        sampling=pb.SamplingParams(max_tokens=24, seed=1234),
        request_id="parity-1",
    )
    msgs = await collect(mesh, req)
    deltas = [m.delta for m in msgs if m.HasField("delta")]
    tokens = [t for d in deltas for t in d.token_ids]
    assert tokens == expected_output_ids(1234, prompt, 24, EmulatorSettings())
    assert [d.offset for d in deltas] == sorted(d.offset for d in deltas)
    assert all(m.request_id == "parity-1" for m in msgs)
    final = msgs[-1].complete
    assert final.finish_reason == pb.FINISH_REASON_LENGTH
    assert final.usage.prompt_tokens == 40
    assert final.usage.completion_tokens == 24
    assert final.timings.time_to_first_token_ms > 0
    assert final.replica_id.startswith("replica-")
    assert deltas[-1].finish_reason == pb.FINISH_REASON_LENGTH


async def test_text_prompt_streams_text(mesh: Mesh) -> None:
    req = pb.GenerateRequest(
        model=MODEL, text="The capital of France is", sampling=pb.SamplingParams(max_tokens=12)
    )
    msgs = await collect(mesh, req)
    text = "".join(m.delta.text for m in msgs if m.HasField("delta"))
    assert text.strip()
    assert msgs[-1].complete.usage.completion_tokens == 12
    assert msgs[-1].request_id  # generated when the client sent none


@pytest.mark.parametrize(
    ("request_", "code", "field"),
    [
        (pb.GenerateRequest(model="nope", text="hi"), grpc.StatusCode.NOT_FOUND, "model"),
        (pb.GenerateRequest(model=MODEL, text=""), grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
        (pb.GenerateRequest(model=MODEL), grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
        (
            pb.GenerateRequest(model=MODEL, text="hi " * 9000),
            grpc.StatusCode.INVALID_ARGUMENT,
            "prompt",
        ),
        (
            pb.GenerateRequest(model=MODEL, text="hi", sampling=pb.SamplingParams(max_tokens=0)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "sampling.max_tokens",
        ),
        (
            pb.GenerateRequest(
                model=MODEL, text="hi", sampling=pb.SamplingParams(max_tokens=100000)
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "sampling.max_tokens",
        ),
        (
            pb.GenerateRequest(model=MODEL, text="hi", sampling=pb.SamplingParams(temperature=3.0)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "sampling.temperature",
        ),
        (
            pb.GenerateRequest(model=MODEL, text="hi", sampling=pb.SamplingParams(top_p=1.5)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "sampling.top_p",
        ),
    ],
)
async def test_bad_input(
    mesh: Mesh, request_: pb.GenerateRequest, code: grpc.StatusCode, field: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await collect(mesh, request_, deadline_s=10)
    assert info.value.code() == code
    assert field in (info.value.details() or "")


async def test_kv_events_reach_registry_and_repeat_hits_cache(mesh: Mesh) -> None:
    # 6 full blocks + a partial one: an exact multiple would leave the last block to compute.
    prompt = list(range(2000, 2000 + 32 * 6 + 5))
    req = pb.GenerateRequest(
        model=MODEL, token_ids=pb.TokenIds(ids=prompt), sampling=pb.SamplingParams(max_tokens=4)
    )
    first = (await collect(mesh, req))[-1].complete

    async def indexed() -> bool:
        resp = await mesh.kv_registry.Lookup(kv_pb.LookupRequest(token_ids=prompt), timeout=5)
        return any(m.replica_id == first.replica_id and m.matched_blocks == 6 for m in resp.matches)

    await eventually(indexed, what="registry holds the prompt's 6 blocks on the serving replica")
    # Repeat until the same replica serves it again; the engine then reuses the cached prefix.
    for _ in range(4):
        again = (await collect(mesh, req))[-1].complete
        if again.replica_id == first.replica_id:
            assert again.usage.cached_prompt_tokens == 6 * 32
            break
    else:
        pytest.fail("the repeated prompt never returned to the replica holding its prefix")


async def test_cancel_frees_replica_slot(mesh: Mesh) -> None:
    req = pb.GenerateRequest(
        model=MODEL, text="Tell me a long story", sampling=pb.SamplingParams(max_tokens=4000)
    )
    call = mesh.gateway.Generate(req, timeout=120)
    got = 0
    async for msg in call:
        if msg.HasField("delta"):
            got += 1
        if got >= 3:
            break
    call.cancel()

    async def released() -> bool:
        resp = await mesh.orchestrator.ListReplicas(orch_pb.ListReplicasRequest(), timeout=5)
        return all(r.in_flight == 0 for r in resp.replicas)

    await eventually(released, what="orchestrator in-flight back to 0")

    async def engines_idle() -> bool:
        return all(
            metric(t.metrics_url, names.TRTLLM_REQUEST_METRICS, request_type="active") == 0
            for t in mesh.mesh.tritons
        )

    await eventually(engines_idle, what="engines report 0 active requests")


async def test_concurrent_streams_spread_over_replicas(mesh: Mesh) -> None:
    req = pb.GenerateRequest(model=MODEL, text="Hello", sampling=pb.SamplingParams(max_tokens=8))
    results = await asyncio.gather(*(collect(mesh, req) for _ in range(8)))
    replicas = {r[-1].complete.replica_id for r in results}
    assert replicas == set(mesh.mesh.replica_ids)
    assert all(r[-1].complete.usage.completion_tokens == 8 for r in results)


async def test_repeated_long_prefix_returns_to_its_replica_and_ttft_drops(mesh: Mesh) -> None:
    # 4000 tokens: ~125 blocks; the cost model prices this prefill at ~130 ms on the emulated H100.
    system = [100 + (i * 31) % 40000 for i in range(4000)]
    first = pb.GenerateRequest(
        model=MODEL,
        token_ids=pb.TokenIds(ids=[*system, 7, 8, 9]),
        sampling=pb.SamplingParams(max_tokens=4),
    )
    orch_metrics = mesh.mesh.services["orchestrator"].metrics_url
    mirrored_before = metric(orch_metrics, names.ORCH_KV_MIRROR_BLOCKS)
    cold = (await collect(mesh, first))[-1].complete

    async def indexed() -> bool:
        resp = await mesh.kv_registry.Lookup(kv_pb.LookupRequest(token_ids=system), timeout=5)
        return any(
            m.replica_id == cold.replica_id and m.matched_blocks == len(system) // 32
            for m in resp.matches
        )

    await eventually(indexed, what="the long prefix is indexed on the replica that served it")

    # The orchestrator routes by its own copy of the index, fed over a WatchExact stream.
    async def mirrored() -> bool:
        copied = metric(orch_metrics, names.ORCH_KV_MIRROR_BLOCKS)
        return copied >= mirrored_before + len(system) // 32

    await eventually(mirrored, what="the orchestrator's copy of the index holds the prefix")
    second = pb.GenerateRequest(
        model=MODEL,
        token_ids=pb.TokenIds(ids=[*system, 10, 11, 12]),
        sampling=pb.SamplingParams(max_tokens=4),
    )
    warm = (await collect(mesh, second))[-1].complete
    assert warm.replica_id == cold.replica_id
    assert warm.usage.cached_prompt_tokens == (len(system) // 32) * 32
    assert warm.timings.time_to_first_token_ms < cold.timings.time_to_first_token_ms

    # Prefix reuse acts after admission: the engine-side part of TTFT at least halves.
    def engine_ms(t: pb.Timings) -> float:
        return t.time_to_first_token_ms - t.queue_ms

    assert engine_ms(warm.timings) < 0.5 * engine_ms(cold.timings)
