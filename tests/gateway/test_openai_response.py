"""OpenAI response shaping (`openai_response`): error bodies and headers, completion objects
and stream chunks (pure functions, no server)."""

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
from services.gateway.core import Completion, FinishReason
from services.gateway.errors import (
    ContextLengthExceeded,
    InvalidRequest,
    ModelNotFound,
    RateLimited,
)
from services.gateway.limits import LimitState, RateLimitSnapshot
from services.gateway.openai_request import (
    Kind,
    OpenAIRequest,
    parse_chat_request,
    parse_completion_request,
)
from services.gateway.openai_response import Shapes, duration, error_body, error_headers

M = "m"
HI = [{"role": "user", "content": "hi"}]


def chat(**kw: Any) -> bytes:
    return json.dumps({"model": M, "messages": HI, **kw}).encode()


def completion(**kw: Any) -> bytes:
    return json.dumps({"model": M, "prompt": "hi", **kw}).encode()


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
            "invalid_request_error",
            "model_not_found",
        ),
        (
            Unauthenticated("bad key"),
            Kind.CHAT,
            "max_tokens",
            401,
            None,
            "invalid_request_error",
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
