"""A real LLM through the whole mesh: one Triton replica serving SmolLM2-135M-Instruct on CPU
(`model_repository/smollm2`, llmmesh.cpu_engine), asked through the gateway's OpenAI HTTP API
with the official `openai` SDK. The model loads once for the module."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from openai import AsyncOpenAI, Omit, omit

from llmmesh.common import metric_names as names
from llmmesh.localmesh import MODEL_NAME
from tests.integration.conftest import Mesh, eventually, metric, start_mesh

pytestmark = [
    pytest.mark.integration,
    pytest.mark.asyncio(loop_scope="session"),
    # The first test also waits for torch to import and the weights to load (~30 s alone, more
    # on a busy machine); generation itself runs at CPU speed.
    pytest.mark.timeout(600),
]

QUESTIONS = ["What is the capital of France?", "Name three colours.", "What is 2+2?"]
MAX_TOKENS = 16


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def real_mesh(tokenizer_path: Path) -> AsyncIterator[Mesh]:
    m = await start_mesh(tokenizer_path, replicas=1, engine="smollm2", context_length=2048)
    yield m
    await m.close()
    await m.mesh.stop()


@pytest_asyncio.fixture(loop_scope="session")
async def client(real_mesh: Mesh) -> AsyncIterator[AsyncOpenAI]:
    base = real_mesh.mesh.services["gateway"].http_base_url
    c = AsyncOpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=300)
    yield c
    await c.close()


async def ask(
    client: AsyncOpenAI,
    question: str,
    *,
    temperature: float,
    top_p: float | Omit = omit,
    seed: int | Omit = omit,
) -> tuple[str, str | None]:
    resp = await client.chat.completions.create(
        model=MODEL_NAME,
        messages=[{"role": "user", "content": question}],
        max_tokens=MAX_TOKENS,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
    )
    (choice,) = resp.choices
    return choice.message.content or "", choice.finish_reason


async def ask_streaming(client: AsyncOpenAI, question: str) -> str:
    stream = await client.chat.completions.create(
        model=MODEL_NAME,
        messages=[{"role": "user", "content": question}],
        max_tokens=MAX_TOKENS,
        temperature=0,
        stream=True,
    )
    return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])


async def test_the_capital_of_france_is_paris(client: AsyncOpenAI) -> None:
    text, finish = await ask(client, "What is the capital of France?", temperature=0)
    assert "Paris" in text
    assert finish == "stop", "the model ends its answer with its end-of-turn token"


async def test_concurrent_streams_equal_their_solo_greedy_answers(client: AsyncOpenAI) -> None:
    solo = [(await ask(client, q, temperature=0))[0] for q in QUESTIONS]
    assert all(solo), solo
    together = await asyncio.gather(*(ask_streaming(client, q) for q in QUESTIONS))
    assert list(together) == solo


async def test_seeded_sampling_is_reproducible(client: AsyncOpenAI) -> None:
    question = "Tell me a story about a cat."
    first, _ = await ask(client, question, temperature=0.9, top_p=0.95, seed=1234)
    second, _ = await ask(client, question, temperature=0.9, top_p=0.95, seed=1234)
    assert first
    assert first == second


async def test_a_closed_stream_frees_its_batch_slot(client: AsyncOpenAI, real_mesh: Mesh) -> None:
    url = real_mesh.mesh.tritons[0].metrics_url

    async def active_is(n: int) -> bool:
        return metric(url, names.TRTLLM_REQUEST_METRICS, request_type="active") == n

    stream = await client.chat.completions.create(
        model=MODEL_NAME,
        messages=[{"role": "user", "content": "Count from 1 to 2000, separated by commas."}],
        max_tokens=1900,  # minutes of decoding on a CPU: only cancellation ends it soon
        temperature=0,
        stream=True,
    )
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            break
    await eventually(lambda: active_is(1), what="the request is in the batch")
    await stream.close()  # the gateway cancels its Triton stream; the engine drops the sequence
    await eventually(lambda: active_is(0), timeout_s=60, what="the slot is freed")


async def test_the_replica_exports_the_tensorrt_llm_gauges(real_mesh: Mesh) -> None:
    url = real_mesh.mesh.tritons[0].metrics_url
    assert metric(url, names.TRTLLM_REQUEST_METRICS, request_type="max") == 8
    assert metric(url, names.TRTLLM_KV_CACHE_BLOCK_METRICS, kv_cache_block_type="max") > 0
    assert metric(url, names.TRTLLM_KV_CACHE_BLOCK_METRICS, kv_cache_block_type="tokens_per") > 0
