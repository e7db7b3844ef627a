"""Token parity of the gateway's per-token path in process: the emulator's expected tokens go
through the Triton wire format (each response serialized and parsed as `TritonPool.stream`
does), the core and its StreamState, and come out as the same tokens, contiguous offsets, and
text equal to the tokenizer's decode of them. The same on real processes:
tests/integration/test_token_parity.py."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from pathlib import Path

import pytest
from tritonclient.grpc import service_pb2

from llmmesh.emulator.settings import EmulatorSettings
from llmmesh.emulator.tokens import expected_output_ids
from services.gateway.core import (
    Completion,
    Delta,
    FinishReason,
    GatewayCore,
    GenerationRequest,
    Sampling,
)
from services.gateway.models import ServedModel
from services.gateway.settings import GatewaySettings, ModelSettings
from services.gateway.triton_stream import EngineChunk, EngineRequest, parse_response
from tests.gateway.conftest import MODEL, FakeAdmission

PROMPT = list(range(3000, 3064))
LONG = 3000


@pytest.fixture(scope="module")
def model(tokenizer_path: Path) -> ServedModel:
    return ServedModel.load(ModelSettings(name=MODEL, tokenizer_path=tokenizer_path))


def wire(tokens: list[int], final: bool) -> EngineChunk:
    """One streamed response as Triton sends it, parsed back."""
    resp = service_pb2.ModelInferResponse()
    resp.outputs.add().name = "output_ids"
    resp.raw_output_contents.append(b"".join(t.to_bytes(4, "little") for t in tokens))
    resp.parameters["triton_final_response"].bool_param = final
    return parse_response(service_pb2.ModelInferResponse.FromString(resp.SerializeToString()))


class EmulatedEngine:
    """Streams the emulator's tokens for the request in chunks of `sizes` (cycled), then the
    empty final response."""

    def __init__(self, end_id: int, sizes: Sequence[int] = (1,)) -> None:
        self._end_id = end_id
        self._sizes = sizes

    async def stream(
        self,
        address: str,
        authority: str,
        request: EngineRequest,
        *,
        timeout_s: float | None,
        metadata: Sequence[tuple[str, str]] = (),
    ) -> AsyncGenerator[EngineChunk, None]:
        seed = 0 if request.seed is None else request.seed
        out = expected_output_ids(
            seed, request.input_ids, request.max_tokens, EmulatorSettings(), self._end_id
        )
        i = k = 0
        while i < len(out):
            n = self._sizes[k % len(self._sizes)]
            yield wire(out[i : i + n], False)
            i, k = i + n, k + 1
        yield wire([], True)


async def generate(
    model: ServedModel, engine: EmulatedEngine, n: int, seed: int, stop: tuple[str, ...] = ()
) -> tuple[list[Delta], Completion]:
    settings = GatewaySettings(models=[model.settings.model_copy(update={"context_length": 8192})])
    core = GatewayCore(settings, [model], FakeAdmission(), engine, 32)
    req = GenerationRequest(
        model=MODEL,
        request_id="parity",
        prompt_ids=PROMPT,
        sampling=Sampling(max_tokens=n, seed=seed, stop=stop),
    )
    events = [ev async for ev in core.generate(req, 60.0)]
    final = events[-1]
    assert isinstance(final, Completion)
    return [ev for ev in events if isinstance(ev, Delta)], final


@pytest.mark.parametrize("sizes", [(1,), (1, 3, 2, 7)])
async def test_long_stream_equals_the_emulators_tokens_and_text(
    model: ServedModel, sizes: tuple[int, ...]
) -> None:
    deltas, final = await generate(model, EmulatedEngine(model.end_id, sizes), LONG, seed=5)
    expected = expected_output_ids(5, PROMPT, LONG, EmulatorSettings(), model.end_id)
    assert [t for d in deltas for t in d.token_ids] == expected
    assert [d.offset for d in deltas] == [
        sum(len(d.token_ids) for d in deltas[:i]) for i in range(len(deltas))
    ]
    assert "".join(d.text for d in deltas) == model.decode(expected)
    assert final.finish_reason is FinishReason.LENGTH
    assert final.completion_tokens == LONG


async def test_stop_string_cuts_the_text_right_before_it(model: ServedModel) -> None:
    expected = expected_output_ids(9, PROMPT, 600, EmulatorSettings(), model.end_id)
    full = model.decode(expected)
    stop = full[len(full) // 2 : len(full) // 2 + 5]
    deltas, final = await generate(model, EmulatedEngine(model.end_id), 600, seed=9, stop=(stop,))
    assert "".join(d.text for d in deltas) == full[: full.index(stop)]
    tokens = [t for d in deltas for t in d.token_ids]
    assert tokens == expected[: len(tokens)]
    assert final.finish_reason is FinishReason.STOP
