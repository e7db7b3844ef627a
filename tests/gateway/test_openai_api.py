"""OpenAI request parsing and response shapes (pure functions, no server)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from llmmesh.common.errors import (
    DeadlineExceeded,
    ResourceExhausted,
    ServiceError,
    Unauthenticated,
    Unavailable,
)
from services.gateway.core import ChatMessage, Completion, FinishReason, Sampling
from services.gateway.errors import (
    ContextLengthExceeded,
    InvalidRequest,
    ModelNotFound,
    RateLimited,
)
from services.gateway.limits import LimitState, RateLimitSnapshot
from services.gateway.openai_api import (
    Kind,
    OpenAIRequest,
    Shapes,
    duration,
    error_body,
    error_headers,
    parse_chat_request,
    parse_completion_request,
)

M = "m"
HI = [{"role": "user", "content": "hi"}]


def chat(**kw: Any) -> bytes:
    return json.dumps({"model": M, "messages": HI, **kw}).encode()


def completion(**kw: Any) -> bytes:
    return json.dumps({"model": M, "prompt": "hi", **kw}).encode()


# -- valid requests -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "sampling", "stream", "include_usage"),
    [
        (chat(), Sampling(), False, False),
        (chat(max_tokens=5, temperature=0, top_p=1), Sampling(5, 0.0, 1.0), False, False),
        (chat(max_completion_tokens=7), Sampling(max_tokens=7), False, False),
        (chat(temperature=1.5, seed=3), Sampling(temperature=1.5, seed=3), False, False),
        (chat(stop="x"), Sampling(stop=("x",)), False, False),
        (chat(stop=["x", "yz"]), Sampling(stop=("x", "yz")), False, False),
        (chat(stop=None, n=1, user=None), Sampling(), False, False),
        (chat(stream=True), Sampling(), True, False),
        (chat(stream=True, stream_options={"include_usage": True}), Sampling(), True, True),
        (chat(stream=True, stream_options={"include_usage": False}), Sampling(), True, False),
        # Neutral values of unsupported parameters and ignored ones are accepted.
        (
            chat(
                frequency_penalty=0,
                presence_penalty=0.0,
                logprobs=False,
                logit_bias={},
                response_format={"type": "text"},
                tools=[],
                tool_choice="none",
                metadata={"k": "v"},
                store=False,
                parallel_tool_calls=True,
                service_tier="auto",
            ),
            Sampling(),
            False,
            False,
        ),
    ],
)
def test_valid_chat_requests(
    body: bytes, sampling: Sampling, stream: bool, include_usage: bool
) -> None:
    r = parse_chat_request(body, request_id="rid")
    assert r.kind is Kind.CHAT
    assert r.generation.model == M
    assert r.generation.request_id == "rid"
    assert r.generation.sampling == sampling
    assert (r.stream, r.include_usage) == (stream, include_usage)
    assert r.generation.messages == [ChatMessage("user", "hi")]


@pytest.mark.parametrize(
    ("messages", "parsed"),
    [
        (HI, [ChatMessage("user", "hi")]),
        (
            [{"role": "developer", "content": "be brief"}, {"role": "user", "content": "q"}],
            [ChatMessage("system", "be brief"), ChatMessage("user", "q")],
        ),
        (
            [
                {"role": "system", "content": "s", "name": "sys"},
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
                },
                {"role": "assistant", "content": "c", "tool_calls": None, "refusal": None},
                {"role": "user", "content": ""},
            ],
            [
                ChatMessage("system", "s"),
                ChatMessage("user", "a\nb"),
                ChatMessage("assistant", "c"),
                ChatMessage("user", ""),
            ],
        ),
    ],
)
def test_chat_messages(messages: list[dict[str, Any]], parsed: list[ChatMessage]) -> None:
    r = parse_chat_request(chat(messages=messages), request_id="r")
    assert r.generation.messages == parsed


def test_user_becomes_the_tenant_hint() -> None:
    r = parse_chat_request(chat(user="alice"), request_id="r")
    assert (r.user, r.generation.tenant) == ("alice", "alice")


@pytest.mark.parametrize(
    ("prompt", "text", "ids"),
    [
        ("hello", "hello", None),
        (["hello"], "hello", None),
        ([1, 2, 3], None, [1, 2, 3]),
        ([[4, 5]], None, [4, 5]),
        ("", "", None),  # the core rejects it, naming prompt
    ],
)
def test_completion_prompts(prompt: object, text: str | None, ids: list[int] | None) -> None:
    r = parse_completion_request(completion(prompt=prompt), request_id="r")
    assert r.kind is Kind.COMPLETION
    assert r.generation.prompt_text == text
    assert r.generation.prompt_ids == ids


# -- invalid requests: 400 naming the parameter --------------------------------------------


def raw(text: str | bytes) -> bytes:
    return text if isinstance(text, bytes) else text.encode()


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b"", None),
        (b"   ", None),
        (b"{", None),
        (b"[1]", None),
        (b'"x"', None),
        (b"\xff\xfe{}", None),
        (b'{"model": "\\ud800"}', None),  # lone surrogate
        (b'{"model": "m", "temperature": NaN}', None),
        (b"[" * 5000 + b"]" * 5000, None),
        (b'{"model": "m"} trailing', None),
        (raw(json.dumps({"messages": HI})), "model"),
        (raw(json.dumps({"model": None, "messages": HI})), "model"),
        (raw(json.dumps({"model": 3, "messages": HI})), "model"),
        (raw(json.dumps({"model": M})), "messages"),
        (chat(messages="hi"), "messages"),
        (chat(messages=[]), "messages"),
        (chat(messages=["hi"]), "messages[0]"),
        (chat(messages=[{"content": "x"}]), "messages[0].role"),
        (chat(messages=[{"role": 1, "content": "x"}]), "messages[0].role"),
        (chat(messages=[{"role": "robot", "content": "x"}]), "messages[0].role"),
        (chat(messages=[{"role": "tool", "content": "x"}]), "messages[0].role"),
        (chat(messages=[{"role": "user"}]), "messages[0].content"),
        (chat(messages=[{"role": "user", "content": 5}]), "messages[0].content"),
        (chat(messages=[{"role": "user", "content": "x", "foo": 1}]), "messages[0].foo"),
        (chat(messages=[{"role": "user", "content": "x", "name": 5}]), "messages[0].name"),
        (
            chat(messages=[{"role": "assistant", "content": "x", "tool_calls": [{}]}]),
            "messages[0].tool_calls",
        ),
        (
            chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]),
            "messages[0].content[0].type",
        ),
        (
            chat(messages=[{"role": "user", "content": [{"type": "text", "text": 1}]}]),
            "messages[0].content[0].text",
        ),
        (chat(messages=[{"role": "user", "content": ["x"]}]), "messages[0].content[0]"),
        (chat(max_tokens="5"), "max_tokens"),
        (chat(max_tokens=5.0), "max_tokens"),
        (chat(max_tokens=True), "max_tokens"),
        (chat(max_completion_tokens=[1]), "max_completion_tokens"),
        (chat(max_tokens=5, max_completion_tokens=5), "max_tokens"),
        (chat(temperature="hot"), "temperature"),
        (chat(temperature=True), "temperature"),
        (raw('{"model": "m", "messages": [], "temperature": 1e999}'), "temperature"),
        (chat(top_p={}), "top_p"),
        (chat(seed=1.5), "seed"),
        (chat(stop=5), "stop"),
        (chat(stop=["a", 1]), "stop[1]"),
        (chat(n=2), "n"),
        (chat(n=0), "n"),
        (chat(n="1"), "n"),
        (chat(stream="yes"), "stream"),
        (chat(stream_options={"include_usage": True}), "stream_options"),
        (chat(stream=True, stream_options=[]), "stream_options"),
        (chat(stream=True, stream_options={"include_usage": 1}), "stream_options.include_usage"),
        (chat(stream=True, stream_options={"bogus": 1}), "stream_options.bogus"),
        (chat(user=5), "user"),
        (chat(user="u" * 257), "user"),
        (chat(foo=1), "foo"),
        (chat(top_k=5), "top_k"),
        (chat(logprobs=True), "logprobs"),
        (chat(top_logprobs=3), "top_logprobs"),
        (chat(frequency_penalty=0.5), "frequency_penalty"),
        (chat(logit_bias={"1": 5}), "logit_bias"),
        (chat(response_format={"type": "json_object"}), "response_format"),
        (chat(tools=[{"type": "function"}]), "tools"),
        (chat(store="yes"), "store"),
        (chat(metadata=[]), "metadata"),
        (chat(audio={"voice": "x"}), "audio"),
    ],
)
def test_invalid_chat_requests_name_the_param(body: bytes, param: str | None) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_chat_request(body, request_id="r")
    assert info.value.field == param
    status, err = error_body(info.value)
    assert status == 400
    assert err["error"]["param"] == param
    assert err["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (raw(json.dumps({"model": M})), "prompt"),
        (completion(prompt=None), "prompt"),
        (completion(prompt=5), "prompt"),
        (completion(prompt=[]), "prompt"),
        (completion(prompt=["a", "b"]), "prompt"),
        (completion(prompt=[[1], [2]]), "prompt"),
        (completion(prompt=[True]), "prompt[0]"),
        (completion(prompt=[{"a": 1}]), "prompt[0]"),
        (completion(echo=True), "echo"),
        (completion(best_of=2), "best_of"),
        (completion(logprobs=2), "logprobs"),
        (completion(suffix="x"), "suffix"),
        (completion(max_completion_tokens=5), "max_completion_tokens"),
        (completion(messages=HI), "messages"),
        (completion(n=3), "n"),
    ],
)
def test_invalid_completion_requests_name_the_param(body: bytes, param: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_completion_request(body, request_id="r")
    assert info.value.field == param


def test_overlong_unknown_field_name_is_shortened() -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_chat_request(chat(**{"k" * 10_000: 1}), request_id="r")
    assert info.value.field is not None
    assert len(info.value.field) < 100


# -- errors ---------------------------------------------------------------------------------


def oreq(kind: Kind, max_param: str = "max_tokens") -> OpenAIRequest:
    parse = parse_chat_request if kind is Kind.CHAT else parse_completion_request
    r = parse(chat() if kind is Kind.CHAT else completion(), request_id="r")
    return OpenAIRequest(r.kind, r.generation, False, False, max_param)


@pytest.mark.parametrize(
    ("err", "kind", "max_param", "status", "param", "type_", "code"),
    [
        (
            InvalidRequest("must be in [0, 2]", field="sampling.temperature"),
            Kind.CHAT,
            "max_tokens",
            400,
            "temperature",
            "invalid_request_error",
            None,
        ),
        (
            InvalidRequest("must be at least 1", field="sampling.max_tokens"),
            Kind.CHAT,
            "max_completion_tokens",
            400,
            "max_completion_tokens",
            "invalid_request_error",
            None,
        ),
        (
            ContextLengthExceeded("too long", field="messages"),
            Kind.CHAT,
            "max_tokens",
            400,
            "messages",
            "invalid_request_error",
            "context_length_exceeded",
        ),
        (
            ContextLengthExceeded("too long", field="prompt"),
            Kind.COMPLETION,
            "max_tokens",
            400,
            "prompt",
            "invalid_request_error",
            "context_length_exceeded",
        ),
        (
            InvalidRequest("bad id", field="prompt.token_ids"),
            Kind.COMPLETION,
            "max_tokens",
            400,
            "prompt",
            "invalid_request_error",
            None,
        ),
        (
            InvalidRequest("too long", field="request_id"),
            Kind.CHAT,
            "max_tokens",
            400,
            "x-request-id",
            "invalid_request_error",
            None,
        ),
        (
            ModelNotFound("unknown model 'x'", field="model"),
            Kind.CHAT,
            "max_tokens",
            404,
            "model",
            "not_found_error",
            "model_not_found",
        ),
        (
            Unauthenticated("bad key"),
            Kind.CHAT,
            "max_tokens",
            401,
            None,
            "authentication_error",
            "invalid_api_key",
        ),
        (
            ResourceExhausted("queue full", retry_after_s=1.2),
            Kind.CHAT,
            "max_tokens",
            429,
            None,
            "rate_limit_error",
            "rate_limit_exceeded",
        ),
        (Unavailable("no replica"), Kind.CHAT, "max_tokens", 503, None, "server_error", None),
        (DeadlineExceeded("late"), Kind.CHAT, "max_tokens", 504, None, "server_error", "timeout"),
    ],
)
def test_error_body(
    err: ServiceError,
    kind: Kind,
    max_param: str,
    status: int,
    param: str | None,
    type_: str,
    code: str | None,
) -> None:
    got_status, body = error_body(err, oreq(kind, max_param))
    assert got_status == status
    assert body["error"]["param"] == param
    assert body["error"]["type"] == type_
    assert body["error"]["code"] == code
    message = body["error"]["message"]
    assert isinstance(message, str)
    if param:
        assert message.startswith(f"{param}: ")
        assert "sampling." not in message


@pytest.mark.parametrize(
    ("retry_after_s", "headers"),
    [
        (None, {}),
        (0.0, {"Retry-After": "1", "retry-after-ms": "1"}),
        (0.25, {"Retry-After": "1", "retry-after-ms": "250"}),
        (2.5, {"Retry-After": "3", "retry-after-ms": "2500"}),
    ],
)
def test_retry_headers(retry_after_s: float | None, headers: dict[str, str]) -> None:
    assert error_headers(ResourceExhausted("x", retry_after_s=retry_after_s)) == headers


def test_rate_limit_and_auth_headers() -> None:
    snap = RateLimitSnapshot(LimitState(60, 0, 0.75), LimitState(1000, 12, 125.2))
    err = RateLimited("x", limit="requests", retry_after_s=0.75, snapshot=snap)
    assert error_headers(err) == {
        "Retry-After": "1",
        "retry-after-ms": "750",
        "x-ratelimit-limit-requests": "60",
        "x-ratelimit-remaining-requests": "0",
        "x-ratelimit-reset-requests": "750ms",
        "x-ratelimit-limit-tokens": "1000",
        "x-ratelimit-remaining-tokens": "12",
        "x-ratelimit-reset-tokens": "2m6s",
    }
    assert error_headers(Unauthenticated("no key")) == {"WWW-Authenticate": "Bearer"}


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.0, "0ms"), (0.0201, "21ms"), (1.5, "1.5s"), (59.0, "59s"), (360, "6m0s")],
)
def test_duration(seconds: float, text: str) -> None:
    assert duration(seconds) == text


# -- responses ------------------------------------------------------------------------------

DONE = Completion(
    finish_reason=FinishReason.LENGTH,
    prompt_tokens=5,
    completion_tokens=3,
    cached_prompt_tokens=2,
    queue_ms=0,
    ttft_ms=1,
    total_ms=2,
    mean_itl_ms=0.5,
    replica_id="r0",
)


def test_chat_shapes() -> None:
    s = Shapes(parse_chat_request(chat(stream=True), request_id="abc"), created=123)
    assert s.response("hey", DONE) == {
        "id": "chatcmpl-abc",
        "object": "chat.completion",
        "created": 123,
        "model": M,
        "system_fingerprint": None,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "hey", "refusal": None},
                "logprobs": None,
                "finish_reason": "length",
            }
        ],
        "usage": {
            "prompt_tokens": 5,
            "completion_tokens": 3,
            "total_tokens": 8,
            "prompt_tokens_details": {"cached_tokens": 2},
        },
    }
    (opening,) = s.opening_chunks()
    assert opening["object"] == "chat.completion.chunk"
    assert opening["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "usage" not in opening
    assert s.text_chunk("x")["choices"][0]["delta"] == {"content": "x"}
    (closing,) = s.closing_chunks(DONE)
    assert closing["choices"][0] == {
        "index": 0,
        "delta": {},
        "logprobs": None,
        "finish_reason": "length",
    }


def test_stream_usage_chunk() -> None:
    req = parse_chat_request(
        chat(stream=True, stream_options={"include_usage": True}), request_id="abc"
    )
    s = Shapes(req, created=1)
    assert s.text_chunk("x")["usage"] is None
    finish, usage = s.closing_chunks(DONE)
    assert finish["usage"] is None
    assert usage["choices"] == []
    assert usage["usage"]["total_tokens"] == 8


def test_completion_shapes() -> None:
    s = Shapes(parse_completion_request(completion(), request_id="abc"), created=9)
    body = s.response("hey", DONE)
    assert body["id"] == "cmpl-abc"
    assert body["object"] == "text_completion"
    assert body["choices"] == [
        {"index": 0, "text": "hey", "logprobs": None, "finish_reason": "length"}
    ]
    assert s.opening_chunks() == []
    assert s.text_chunk("y")["choices"][0]["text"] == "y"
    assert s.closing_chunks(DONE)[0]["choices"][0]["finish_reason"] == "length"
