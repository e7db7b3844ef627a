"""Token parity of the gateway's streaming path on real processes: long streams through the
gateway (Triton wire format, StreamState, incremental detokenization, stop strings, the gRPC
front) equal the emulator's expected tokens, and their text equals the tokenizer's decode of
those tokens, at once and under concurrent streams."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from llmmesh.emulator.settings import EmulatorSettings
from llmmesh.emulator.tokens import expected_output_ids
from llmmesh.generated.gateway.v1 import gateway_pb2 as pb
from llmmesh.localmesh import MODEL_NAME
from services.gateway.models import ServedModel
from services.gateway.settings import ModelSettings
from tests.integration.conftest import Mesh, start_mesh

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="session")]

PROMPT = list(range(3000, 3064))
LONG = 2048


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def pmesh(tokenizer_path: Path) -> AsyncIterator[Mesh]:
    # A fast engine: the test is about what the gateway relays, not the engine's timing.
    m = await start_mesh(tokenizer_path, replicas=1, time_scale=0.02)
    yield m
    await m.close()
    await m.mesh.stop()


@pytest.fixture(scope="module")
def model(tokenizer_path: Path) -> ServedModel:
    return ServedModel.load(ModelSettings(name=MODEL_NAME, tokenizer_path=tokenizer_path))


async def stream(
    mesh: Mesh, prompt: list[int], n: int, seed: int, stop: tuple[str, ...] = ()
) -> tuple[list[pb.TokenDelta], pb.GenerationComplete]:
    req = pb.GenerateRequest(
        model=MODEL_NAME,
        token_ids=pb.TokenIds(ids=prompt),
        sampling=pb.SamplingParams(max_tokens=n, seed=seed, stop=list(stop)),
    )
    msgs = [m async for m in mesh.gateway.Generate(req, timeout=120)]
    assert msgs[-1].HasField("complete")
    return [m.delta for m in msgs if m.HasField("delta")], msgs[-1].complete


def check_stream(model: ServedModel, deltas: list[pb.TokenDelta], expected: list[int]) -> None:
    tokens = [t for d in deltas for t in d.token_ids]
    assert tokens == expected
    offsets = [d.offset for d in deltas]
    assert offsets == [sum(len(d.token_ids) for d in deltas[:i]) for i in range(len(deltas))]
    assert "".join(d.text for d in deltas) == model.decode(expected)


async def test_long_stream_equals_the_emulators_tokens_and_text(
    pmesh: Mesh, model: ServedModel
) -> None:
    deltas, complete = await stream(pmesh, PROMPT, LONG, seed=77)
    expected = expected_output_ids(77, PROMPT, LONG, EmulatorSettings(), model.end_id)
    check_stream(model, deltas, expected)
    assert complete.finish_reason == pb.FINISH_REASON_LENGTH
    assert complete.usage.completion_tokens == LONG
    assert deltas[-1].finish_reason == pb.FINISH_REASON_LENGTH


async def test_concurrent_streams_each_equal_their_expected_tokens(
    pmesh: Mesh, model: ServedModel
) -> None:
    seeds = range(100, 116)
    results = await asyncio.gather(*(stream(pmesh, PROMPT, 256, seed=s) for s in seeds))
    for seed, (deltas, _) in zip(seeds, results, strict=True):
        check_stream(
            model, deltas, expected_output_ids(seed, PROMPT, 256, EmulatorSettings(), model.end_id)
        )


async def test_stop_string_ends_the_text_right_before_it(pmesh: Mesh, model: ServedModel) -> None:
    expected = expected_output_ids(91, PROMPT, 512, EmulatorSettings(), model.end_id)
    full = model.decode(expected)
    # A stop string from the middle of the expected text: its first occurrence is the cut.
    stop = full[len(full) // 2 : len(full) // 2 + 6]
    cut = full.index(stop)
    deltas, complete = await stream(pmesh, PROMPT, 512, seed=91, stop=(stop,))
    assert "".join(d.text for d in deltas) == full[:cut]
    tokens = [t for d in deltas for t in d.token_ids]
    assert tokens == expected[: len(tokens)]
    assert complete.finish_reason == pb.FINISH_REASON_STOP
