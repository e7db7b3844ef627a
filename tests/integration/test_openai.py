"""The gateway's OpenAI-compatible HTTP API on real processes, through the official `openai`
SDK, unmodified (AsyncOpenAI with base_url pointing at the gateway)."""

from __future__ import annotations

import asyncio
import io
import json
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import grpc
import openai
import pytest
import pytest_asyncio
from openai import AsyncOpenAI
from openai.types.chat import ChatCompletionMessageParam

from llmmesh.common import metric_names as names
from llmmesh.emulator.settings import EmulatorSettings
from llmmesh.emulator.tokens import expected_output_ids
from llmmesh.generated.gateway.v1 import gateway_pb2 as pb
from llmmesh.generated.gateway.v1 import gateway_pb2_grpc
from llmmesh.generated.orchestrator.v1 import orchestrator_pb2 as orch_pb
from llmmesh.localmesh import MODEL_NAME, ServiceProcess
from services.gateway.auth import hash_key
from services.gateway.models import ServedModel
from services.gateway.settings import ModelSettings
from tests.integration.conftest import Mesh, eventually, gateway_process, metric, start_mesh

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="session")]

MODEL = MODEL_NAME
CONTEXT = 2048


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def omesh(tokenizer_path: Path) -> AsyncIterator[Mesh]:
    m = await start_mesh(tokenizer_path, replicas=2, time_scale=1.0, context_length=CONTEXT)
    yield m
    await m.close()
    await m.mesh.stop()


@pytest_asyncio.fixture(loop_scope="session")
async def client(omesh: Mesh) -> AsyncIterator[AsyncOpenAI]:
    base = omesh.mesh.services["gateway"].http_base_url
    c = AsyncOpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=60)
    yield c
    await c.close()


@pytest.fixture(scope="module")
def model(tokenizer_path: Path) -> ServedModel:
    return ServedModel.load(ModelSettings(name=MODEL, tokenizer_path=tokenizer_path))


def expected_text(model: ServedModel, prompt_ids: list[int], seed: int, n: int) -> str:
    ids = expected_output_ids(seed, prompt_ids, n, EmulatorSettings(), model.end_id)
    return model.decode(ids)


def chat_prompt_ids(model: ServedModel, messages: list[ChatCompletionMessageParam]) -> list[int]:
    assert model.chat_template is not None
    plain = [{"role": str(m["role"]), "content": str(m.get("content"))} for m in messages]
    return model.encode(model.chat_template.render(plain, add_generation_prompt=True))


MESSAGES: list[ChatCompletionMessageParam] = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name a colour."},
]


async def test_models(client: AsyncOpenAI) -> None:
    page = await client.models.list()
    assert [m.id for m in page.data] == [MODEL]
    assert page.data[0].object == "model"
    card = await client.models.retrieve(MODEL)
    assert card.id == MODEL
    with pytest.raises(openai.NotFoundError) as info:
        await client.models.retrieve("nope")
    assert info.value.code == "model_not_found"


async def test_chat_completion_uses_the_chat_template(
    client: AsyncOpenAI, model: ServedModel
) -> None:
    resp = await client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        max_tokens=12,
        seed=42,
        temperature=0.5,
        top_p=0.9,
        user="alice",
    )
    prompt = chat_prompt_ids(model, MESSAGES)
    assert resp.object == "chat.completion"
    assert resp.id.startswith("chatcmpl-")
    assert resp.model == MODEL
    assert resp.created > 0
    (choice,) = resp.choices
    assert choice.message.role == "assistant"
    assert choice.message.content == expected_text(model, prompt, 42, 12)
    assert choice.finish_reason == "length"
    assert resp.usage is not None
    assert resp.usage.prompt_tokens == len(prompt)
    assert resp.usage.completion_tokens == 12
    assert resp.usage.total_tokens == len(prompt) + 12


async def test_chat_stream_with_usage_matches_non_stream(
    client: AsyncOpenAI, model: ServedModel
) -> None:
    stream = await client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        max_completion_tokens=10,
        seed=7,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [c async for c in stream]
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected_text(model, chat_prompt_ids(model, MESSAGES), 7, 10)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length"
    assert all(f is None for f in finishes[:-1])
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None
    assert last.usage.completion_tokens == 10
    assert all(c.usage is None for c in chunks[:-1])


async def test_chat_stream_without_usage_has_no_usage_chunk(client: AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=3,
        stream=True,
    )
    chunks = [c async for c in stream]
    assert all(c.choices for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "length"


async def test_completion_with_token_ids_matches_emulator(
    client: AsyncOpenAI, model: ServedModel
) -> None:
    prompt = list(range(1000, 1040))
    resp = await client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, seed=1234)
    assert resp.object == "text_completion"
    assert resp.id.startswith("cmpl-")
    assert resp.choices[0].text == expected_text(model, prompt, 1234, 16)
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage is not None
    assert resp.usage.prompt_tokens == 40


async def test_completion_stream(client: AsyncOpenAI, model: ServedModel) -> None:
    stream = await client.completions.create(
        model=MODEL,
        prompt="The capital of France is",
        max_tokens=8,
        seed=3,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [c async for c in stream]
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    prompt = model.with_text_prefix(model.encode("The capital of France is"))
    assert text == expected_text(model, prompt, 3, 8)
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 8


@pytest.mark.parametrize("stream", [False, True])
async def test_stop_string_ends_the_completion(
    client: AsyncOpenAI, model: ServedModel, stream: bool
) -> None:
    prompt = list(range(3000, 3020))
    full = expected_text(model, prompt, 11, 40)
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    cut = full.find(stop)
    if stream:
        chunks = [
            c
            async for c in await client.completions.create(
                model=MODEL, prompt=prompt, max_tokens=40, seed=11, stop=[stop], stream=True
            )
        ]
        text = "".join(c.choices[0].text for c in chunks)
        finish = chunks[-1].choices[0].finish_reason
    else:
        resp = await client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=40, seed=11, stop=stop
        )
        text, finish = resp.choices[0].text, resp.choices[0].finish_reason
    assert text == full[:cut]
    assert finish == "stop"


async def test_request_id_is_echoed(client: AsyncOpenAI) -> None:
    raw = await client.chat.completions.with_raw_response.create(
        model=MODEL,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=2,
        extra_headers={"x-request-id": "my-request-1"},
    )
    assert raw.headers["x-request-id"] == "my-request-1"
    assert raw.parse().id == "chatcmpl-my-request-1"


@pytest.mark.parametrize(
    ("kwargs", "param", "code"),
    [
        ({"temperature": 5.0}, "temperature", None),
        ({"top_p": 1.5}, "top_p", None),
        ({"max_tokens": 0}, "max_tokens", None),
        ({"max_completion_tokens": 100_000}, "max_completion_tokens", None),
        ({"n": 2}, "n", None),
        ({"stop": ["a", ""]}, "stop", None),
        ({"seed": 2**64}, "seed", None),
        ({"logprobs": True}, "logprobs", None),
        ({"extra_body": {"foo": 1}}, "foo", None),
        ({"extra_body": {"max_tokens": "12"}}, "max_tokens", None),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role", None),
        ({"messages": []}, "messages", None),
        (
            {"messages": [{"role": "user", "content": "word " * (CONTEXT + 10)}]},
            "messages",
            "context_length_exceeded",
        ),
        ({"max_tokens": CONTEXT - 5}, "max_tokens", "context_length_exceeded"),
        ({"extra_headers": {"x-request-timeout": "soon"}}, "x-request-timeout", None),
        ({"stream_options": {"include_usage": True}}, "stream_options", None),
    ],
)
async def test_bad_parameters_are_400_naming_the_param(
    client: AsyncOpenAI, kwargs: dict[str, object], param: str, code: str | None
) -> None:
    args: dict[str, object] = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    args.update(kwargs)
    with pytest.raises(openai.BadRequestError) as info:
        await client.chat.completions.create(**args)  # type: ignore[call-overload]
    assert info.value.param == param
    assert info.value.code == code
    assert info.value.type == "invalid_request_error"
    assert param in info.value.message


async def test_bad_parameter_on_a_stream_is_a_400_not_a_broken_stream(
    client: AsyncOpenAI,
) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        await client.completions.create(model=MODEL, prompt="x", temperature=-1, stream=True)
    assert info.value.param == "temperature"


async def test_unknown_model_is_404(client: AsyncOpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        await client.chat.completions.create(
            model="gpt-nope", messages=[{"role": "user", "content": "hi"}]
        )
    assert (info.value.param, info.value.code) == ("model", "model_not_found")
    with pytest.raises(openai.NotFoundError):
        await client.completions.create(model="gpt-nope", prompt="hi")


async def test_deadline_header_bounds_the_request(client: AsyncOpenAI) -> None:
    with pytest.raises(openai.InternalServerError) as info:
        await client.completions.create(
            model=MODEL,
            prompt="count slowly",
            max_tokens=2000,
            extra_headers={"x-request-timeout": "0.3"},
        )
    assert info.value.status_code == 504
    assert info.value.code == "timeout"


async def test_client_disconnect_cancels_generation(client: AsyncOpenAI, omesh: Mesh) -> None:
    gw_metrics = f"http://127.0.0.1:{omesh.mesh.services['gateway'].metrics_port}/metrics"
    cancelled_before = metric(gw_metrics, names.GATEWAY_REQUESTS, outcome="cancelled")
    stream = await client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Tell me a very long story"}],
        max_tokens=2000,
        stream=True,
    )
    got = 0
    async for _ in stream:
        got += 1
        if got >= 3:
            break
    await stream.close()

    async def released() -> bool:
        resp = await omesh.orchestrator.ListReplicas(orch_pb.ListReplicasRequest(), timeout=5)
        return all(r.in_flight == 0 for r in resp.replicas)

    await eventually(released, what="orchestrator in-flight back to 0 after the disconnect")

    async def engines_idle() -> bool:
        return all(
            metric(t.metrics_url, names.TRTLLM_REQUEST_METRICS, request_type="active") == 0
            for t in omesh.mesh.tritons
        )

    await eventually(engines_idle, what="engines report 0 active requests")

    async def counted() -> bool:
        now = metric(gw_metrics, names.GATEWAY_REQUESTS, outcome="cancelled")
        return now > cancelled_before

    await eventually(counted, what="the gateway counts the request as cancelled")


async def test_errors_are_json_for_unknown_routes_and_bad_bodies(omesh: Mesh) -> None:
    base = omesh.mesh.services["gateway"].http_base_url
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{base}/v1/nothing-here") as r:
            assert r.status == 404
            assert (await r.json())["error"]["type"] == "invalid_request_error"
        async with s.get(f"{base}/v1/chat/completions") as r:
            assert r.status == 405
            assert "error" in await r.json()
        for body in (b"", b"{", b"[]", b"\xff\xfe", b'{"model": "\\ud800"}', b"[" * 10_000):
            async with s.post(f"{base}/v1/chat/completions", data=body) as r:
                assert r.status == 400, body
                err = (await r.json())["error"]
                assert err["type"] == "invalid_request_error"
        too_big = b'{"model": "' + b"x" * (9 * 1024 * 1024) + b'"}'
        async with s.post(f"{base}/v1/completions", data=io.BytesIO(too_big)) as r:
            assert r.status == 413
            assert (await r.json())["error"]["type"] == "invalid_request_error"


async def test_undecodable_request_id_header_is_400(omesh: Mesh) -> None:
    port = omesh.mesh.services["gateway"].http_port
    body = b'{"model": "%s", "prompt": "hi", "max_tokens": 2}' % MODEL.encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        b"POST /v1/completions HTTP/1.1\r\nHost: gw\r\nx-request-id: ab\xff\xfe\r\n"
        b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body)
    )
    await writer.drain()
    answer = await reader.read()
    writer.close()
    await writer.wait_closed()
    head, _, payload = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ")
    assert json.loads(payload)["error"]["param"] == "x-request-id"


async def test_http_and_grpc_drain_together(omesh: Mesh, tokenizer_path: Path) -> None:
    """SIGTERM: an HTTP stream in flight finishes with [DONE]; then the process exits 0."""
    workdir = omesh.mesh.workdir / "gw-drain"
    workdir.mkdir()
    gw = gateway_process(omesh, workdir, tokenizer_path, drain_seconds=30.0)
    await gw.start()
    assert gw.http_port
    body = {"model": MODEL, "prompt": "Drain me", "max_tokens": 60, "stream": True}
    async with (
        aiohttp.ClientSession() as s,
        s.post(f"{gw.http_base_url}/v1/completions", json=body) as r,
    ):
        assert r.status == 200
        first = await r.content.readline()
        assert first.startswith(b"data: {")
        gw.signal(signal.SIGTERM)
        rest = await r.content.read()
    assert rest.rstrip().endswith(b"data: [DONE]")
    assert rest.count(b'"finish_reason":"length"') == 1
    assert gw.proc is not None
    assert await asyncio.wait_for(gw.proc.wait(), 30) == 0


# -- tenants and API keys (a second gateway with a tenants file, same orchestrator) ---------


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def tenant_gateway(omesh: Mesh, tokenizer_path: Path) -> AsyncIterator[ServiceProcess]:
    workdir = omesh.mesh.workdir / "gw-tenants"
    workdir.mkdir()
    tenants_file = workdir / "tenants.yaml"
    tenants_file.write_text(
        json.dumps(
            {
                "tenants": [
                    {
                        "name": "greedy",
                        "priority": "batch",
                        "requests_per_minute": 5,
                        "api_keys_sha256": [hash_key("sk-greedy")],
                    },
                    {
                        "name": "polite",
                        "priority": "interactive",
                        "requests_per_minute": 5,
                        "tokens_per_minute": 100_000,
                        "api_keys_sha256": [hash_key("sk-polite")],
                    },
                ]
            }
        )
    )
    gw = gateway_process(
        omesh, workdir, tokenizer_path, tenants_file=tenants_file, drain_seconds=5.0
    )
    await gw.start()
    yield gw
    await gw.stop()


def tenant_client(gw: ServiceProcess, key: str) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=f"{gw.http_base_url}/v1", api_key=key, max_retries=0, timeout=60)


async def test_api_key_required_on_both_fronts(tenant_gateway: ServiceProcess) -> None:
    bad = tenant_client(tenant_gateway, "sk-wrong")
    try:
        with pytest.raises(openai.AuthenticationError) as info:
            await bad.completions.create(model=MODEL, prompt="hi", max_tokens=1)
        assert info.value.code == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            await bad.models.list()
    finally:
        await bad.close()
    async with grpc.aio.insecure_channel(tenant_gateway.address) as ch:
        stub = gateway_pb2_grpc.GatewayServiceStub(ch)
        req = pb.GenerateRequest(model=MODEL, text="hi", sampling=pb.SamplingParams(max_tokens=2))
        with pytest.raises(grpc.aio.AioRpcError) as rpc:
            async for _ in stub.Generate(req, timeout=10):
                pass
        assert rpc.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.aio.AioRpcError) as rpc:
            await stub.ListModels(pb.ListModelsRequest(), timeout=10)
        assert rpc.value.code() == grpc.StatusCode.UNAUTHENTICATED
        msgs = [
            m
            async for m in stub.Generate(
                req, timeout=10, metadata=(("authorization", "Bearer sk-polite"),)
            )
        ]
        assert msgs[-1].complete.usage.completion_tokens == 2


async def test_one_tenant_cannot_spend_anothers_quota(tenant_gateway: ServiceProcess) -> None:
    greedy = tenant_client(tenant_gateway, "sk-greedy")
    polite = tenant_client(tenant_gateway, "sk-polite")
    # The gRPC test above spent one of polite's 5 requests; the buckets refill 1 per 12 s.
    try:

        async def ask(c: AsyncOpenAI) -> object:
            try:
                return await c.chat.completions.create(
                    model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4
                )
            except openai.RateLimitError as err:
                return err

        results = await asyncio.gather(
            *(ask(greedy) for _ in range(20)), *(ask(polite) for _ in range(4))
        )
        g, p = results[:20], results[20:]
        assert all(not isinstance(r, openai.RateLimitError) for r in p)
        assert sum(not isinstance(r, openai.RateLimitError) for r in g) == 5
        refused = [r for r in g if isinstance(r, openai.RateLimitError)]
        assert len(refused) == 15
        headers = refused[0].response.headers
        assert int(headers["retry-after"]) >= 1
        assert headers["x-ratelimit-limit-requests"] == "5"
        assert headers["x-ratelimit-remaining-requests"] == "0"
        assert refused[0].code == "rate_limit_exceeded"
    finally:
        await greedy.close()
        await polite.close()
