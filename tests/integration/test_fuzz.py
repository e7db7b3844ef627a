"""Fuzzing the gateway's two fronts on real processes: generated JSON bodies (near-valid and
arbitrary, plus raw bytes) to the OpenAI HTTP API and generated GenerateRequest protos to gRPC.

Whatever arrives, the answer is a client error or a success, never a 5xx / INTERNAL / UNKNOWN,
never a hung response; and the gateway still serves afterwards. Bounded: a few hundred examples
per front on an emulator that does not wait (time_scale 0) and a small context window.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
import pytest_asyncio
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from llmmesh.generated.gateway.v1 import gateway_pb2 as pb
from llmmesh.localmesh import MODEL_NAME
from tests.integration.conftest import Mesh, start_mesh

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="session")]

MODEL = MODEL_NAME
CONTEXT = 128
REQUEST_TIMEOUT_S = 30.0
FUZZ = settings(
    max_examples=400,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def fmesh(tokenizer_path: Path) -> AsyncIterator[Mesh]:
    m = await start_mesh(tokenizer_path, replicas=1, time_scale=0.0, context_length=CONTEXT)
    yield m
    await m.close()
    await m.mesh.stop()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def http(fmesh: Mesh) -> AsyncIterator[aiohttp.ClientSession]:
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    async with aiohttp.ClientSession(
        base_url=fmesh.mesh.services["gateway"].http_base_url, timeout=timeout
    ) as s:
        yield s


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def channel(fmesh: Mesh) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(fmesh.mesh.services["gateway"].address) as ch:
        yield ch


# -- strategies -----------------------------------------------------------------------------

# Text with the awkward parts of Unicode: lone surrogates (JSON escapes), NUL, combining marks,
# the template's own special tokens.
texts = st.one_of(
    st.text(max_size=40),
    st.text(st.characters(categories=["Cs", "Cc", "Mn", "So"]), max_size=8),
    st.sampled_from(["<|im_start|>", "<|im_end|>", "{{ x }}", "{% if %}", "\x00", "hi"]),
)
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False)
    | texts,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=4),
    max_leaves=12,
)
# Near-valid requests: a valid body, then perhaps one field replaced by anything JSON can hold
# (or an unknown field added), so the checks past the first one are reached too.
content_parts = st.lists(
    st.fixed_dictionaries({"type": st.just("text"), "text": texts}), max_size=3
)
valid_messages = st.lists(
    st.fixed_dictionaries(
        {
            "role": st.sampled_from(["system", "user", "assistant", "developer"]),
            "content": texts | content_parts,
        },
        optional={"name": texts},
    ),
    min_size=1,
    max_size=4,
)
valid_common: dict[str, st.SearchStrategy[Any]] = {
    "max_tokens": st.integers(min_value=1, max_value=16),
    "temperature": st.floats(min_value=0, max_value=2),
    "top_p": st.floats(min_value=0.01, max_value=1),
    "stop": texts.filter(bool) | st.lists(texts.filter(bool), max_size=4),
    "seed": st.integers(min_value=0, max_value=2**64 - 1),
    "user": st.text(max_size=20),
    "n": st.just(1),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({}, optional={"include_usage": st.booleans()}),
    "logprobs": st.just(False),
    "frequency_penalty": st.just(0),
}


def _streaming_if_options(body: dict[str, Any]) -> dict[str, Any]:
    if "stream_options" in body:
        body["stream"] = True
    return body


valid_chat = st.fixed_dictionaries(
    {"model": st.just(MODEL), "messages": valid_messages}, optional=valid_common
).map(_streaming_if_options)
valid_completion = st.fixed_dictionaries(
    {
        "model": st.just(MODEL),
        "prompt": texts
        | st.lists(st.integers(min_value=0, max_value=49_151), min_size=1, max_size=20),
    },
    optional={k: v for k, v in valid_common.items() if k != "logprobs"},
).map(_streaming_if_options)
KEYS = [
    "model",
    "messages",
    "prompt",
    "max_completion_tokens",
    "echo",
    "suffix",
    "tools",
    "response_format",
    *valid_common,
]


def mutated(base: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[dict[str, Any]]:
    def apply(args: tuple[dict[str, Any], str, object, bool]) -> dict[str, Any]:
        body, key, value, drop = args
        out = dict(body)
        if drop:
            out.pop(key, None)
        else:
            out[key] = value
        return out

    return st.tuples(
        base, st.sampled_from(KEYS) | texts, json_values | messages_like, st.booleans()
    ).map(apply)


messages_like = st.lists(
    st.dictionaries(
        st.sampled_from(["role", "content", "name", "tool_calls"]) | texts, json_values
    ),
    max_size=3,
)


def encode(body: object) -> st.SearchStrategy[bytes]:
    data = json.dumps(body).encode()
    return st.sampled_from([data, data[: len(data) // 2], data + b"}", data.replace(b'"', b"'", 1)])


bodies = st.one_of(
    st.tuples(st.just("/v1/chat/completions"), valid_chat.map(lambda b: json.dumps(b).encode())),
    st.tuples(st.just("/v1/completions"), valid_completion.map(lambda b: json.dumps(b).encode())),
    st.tuples(st.just("/v1/chat/completions"), mutated(valid_chat).flatmap(encode)),
    st.tuples(st.just("/v1/completions"), mutated(valid_completion).flatmap(encode)),
    st.tuples(
        st.sampled_from(["/v1/chat/completions", "/v1/completions"]),
        json_values.map(lambda v: json.dumps(v).encode()) | st.binary(max_size=64),
    ),
)
header_text = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=20)
headers = st.fixed_dictionaries(
    {},
    optional={
        "x-request-id": header_text,
        # Valid deadlines are long enough never to expire here: a 504 would be the client's
        # choice, not a fault.
        "x-request-timeout": header_text.filter(lambda v: not _short_deadline(v)),
        "Content-Type": st.sampled_from(["application/json", "text/plain", "x/y"]),
    },
)


def _short_deadline(value: str) -> bool:
    try:
        return 0 < float(value) < REQUEST_TIMEOUT_S
    except ValueError:
        return False


async def check_http_answer(resp: aiohttp.ClientResponse) -> None:
    raw = await resp.read()  # the whole answer arrives within the client timeout: no hang
    event(f"HTTP {resp.status}")  # --hypothesis-show-statistics shows the spread
    assert resp.status < 500, raw[:500]
    if resp.status != 200:
        err = json.loads(raw)["error"]
        assert isinstance(err["message"], str)
        assert err["type"] == "invalid_request_error" or resp.status in (404, 413)
        return
    if resp.headers["Content-Type"].startswith("text/event-stream"):
        events = raw.decode().split("\n\n")
        assert events[-1] == "", raw[-200:]
        assert events[-2] == "data: [DONE]", raw[-500:]
        for e in events[:-2]:
            # Streams of keyed requests (x-request-id) carry an `id:` line per event.
            data = e.split("\n")[-1] if e.startswith("id: ") else e
            assert "error" not in json.loads(data.removeprefix("data: "))
    else:
        body = json.loads(raw)
        assert body["choices"][0]["finish_reason"] in ("stop", "length")


@FUZZ
@given(target=bodies, hdrs=headers)
async def test_http_fuzz(
    http: aiohttp.ClientSession, target: tuple[str, bytes], hdrs: dict[str, str]
) -> None:
    path, data = target
    async with http.post(path, data=data, headers=hdrs) as resp:
        await check_http_answer(resp)


# -- gRPC -----------------------------------------------------------------------------------

u32 = st.integers(min_value=0, max_value=2**32 - 1)
f32 = st.floats(width=32)


@st.composite
def generate_requests(draw: st.DrawFn) -> pb.GenerateRequest:
    def pick(good: st.SearchStrategy[Any], bad: st.SearchStrategy[Any]) -> Any:
        """Mostly a valid value, sometimes anything of the field's wire type."""
        return draw(bad) if draw(st.integers(min_value=0, max_value=5)) == 0 else draw(good)

    req = pb.GenerateRequest(
        model=pick(st.just(MODEL), st.sampled_from(["nope", ""]) | st.text(max_size=10)),
        priority=pick(st.integers(min_value=0, max_value=3), u32.map(lambda v: v % 2**31)),
        request_id=pick(
            st.text(st.characters(categories=["L", "N", "P"]), max_size=20),
            st.text(max_size=20) | st.text(min_size=250, max_size=300),
        ),
    )
    prompt = draw(st.sampled_from(["text", "text", "token_ids", "none"]))
    if prompt == "text":
        req.text = pick(st.text(min_size=1, max_size=200), st.text(max_size=2000))
    elif prompt == "token_ids":
        req.token_ids.ids.extend(
            pick(
                st.lists(st.integers(min_value=0, max_value=49_151), min_size=1, max_size=200),
                st.lists(u32, max_size=300),
            )
        )
    if draw(st.booleans()):
        sp = req.sampling
        if draw(st.booleans()):
            sp.max_tokens = pick(st.integers(min_value=1, max_value=16), u32)
        if draw(st.booleans()):
            sp.temperature = pick(st.floats(min_value=0, max_value=2, width=32), f32)
        if draw(st.booleans()):
            sp.top_p = pick(st.floats(min_value=2**-7, max_value=1, width=32), f32)
        if draw(st.booleans()):
            sp.top_k = pick(st.integers(min_value=0, max_value=50), u32)
        if draw(st.booleans()):
            sp.seed = draw(st.integers(min_value=0, max_value=2**64 - 1))
        sp.stop.extend(
            pick(
                st.lists(st.text(min_size=1, max_size=6), max_size=4),
                st.lists(st.text(), max_size=12),
            )
        )
    return req


_OK_CODES = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    # A request id drawn again with another body: the id is an idempotency key.
    grpc.StatusCode.ALREADY_EXISTS,
}


@settings(FUZZ, max_examples=150)  # each valid request streams up to the context window
@given(request=generate_requests())
async def test_grpc_fuzz(fmesh: Mesh, request: pb.GenerateRequest) -> None:
    code, details = grpc.StatusCode.OK, ""
    msgs: list[pb.GenerateResponse] = []
    try:
        msgs = [m async for m in fmesh.gateway.Generate(request, timeout=REQUEST_TIMEOUT_S)]
    except grpc.aio.AioRpcError as err:
        code, details = err.code(), err.details() or ""
    event(f"gRPC {code.name}")
    assert code in _OK_CODES, (code, details)
    if code == grpc.StatusCode.OK:
        assert msgs[-1].HasField("complete")


@FUZZ
@given(data=st.binary(max_size=64) | generate_requests().map(lambda r: r.SerializeToString()[:-1]))
async def test_grpc_undecodable_bytes_fuzz(channel: grpc.aio.Channel, data: bytes) -> None:
    """Raw bytes (truncated messages, invalid UTF-8 in strings): INVALID_ARGUMENT, not UNKNOWN."""
    generate = channel.unary_stream(
        "/llmmesh.gateway.v1.GatewayService/Generate",
        request_serializer=lambda b: b,
        response_deserializer=pb.GenerateResponse.FromString,
    )
    code = grpc.StatusCode.OK
    try:
        async for _ in generate(data, timeout=REQUEST_TIMEOUT_S):
            pass
    except grpc.aio.AioRpcError as err:
        code = err.code()
    event(f"gRPC raw {code.name}")
    assert code in _OK_CODES


async def test_gateway_still_serves_after_fuzzing(fmesh: Mesh, http: aiohttp.ClientSession) -> None:
    assert fmesh.mesh.services["gateway"].proc is not None
    assert fmesh.mesh.services["gateway"].proc.returncode is None
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "still there?"}],
        "max_tokens": 3,
    }
    async with http.post("/v1/chat/completions", json=body) as resp:
        assert resp.status == 200
        assert (await resp.json())["usage"]["completion_tokens"] == 3
    msgs = [
        m
        async for m in fmesh.gateway.Generate(
            pb.GenerateRequest(model=MODEL, text="hi", sampling=pb.SamplingParams(max_tokens=3)),
            timeout=10,
        )
    ]
    assert msgs[-1].complete.usage.completion_tokens == 3
