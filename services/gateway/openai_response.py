"""OpenAI response shaping: the outbound boundary from the core's results and errors to the
OpenAI wire. Owns error bodies (`error_body`, `plain_error`: domain error → HTTP status and
`{"error": {"message", "type", "param", "code"}}`, with `openai_param` mapping a core error
field to the OpenAI parameter the client sent), error and rate-limit headers, completion and
stream-chunk objects (`Shapes`), Server-Sent Events framing (`sse`, `SSE_DONE`) and model
cards. Pure functions; the aiohttp front (`http.py`) only moves bytes; request parsing is
`openai_request`'s.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

from llmmesh.common.errors import (
    Cancelled,
    DeadlineExceeded,
    ResourceExhausted,
    ServiceError,
    Unauthenticated,
)
from services.gateway.core import Completion, FinishReason
from services.gateway.errors import (
    ContextLengthExceeded,
    ModelNotFound,
    PromptOverTokenLimit,
    RateLimited,
    RequestIdConflict,
)
from services.gateway.limits import RateLimitSnapshot
from services.gateway.models import ServedModel
from services.gateway.openai_request import Kind, OpenAIRequest

# -- errors ---------------------------------------------------------------------------------


# The header an error about the request id names by default (`id_param` otherwise: the header
# the id came from).
REQUEST_ID_PARAM = "x-request-id"


def openai_param(
    field: str | None, request: OpenAIRequest | None, id_param: str = REQUEST_ID_PARAM
) -> str | None:
    """The OpenAI parameter a core error field refers to."""
    if field is None:
        return None
    if field == "request_id":
        return id_param
    if field == "resume_from":
        return "last-event-id"
    if field == "prompt" or field.startswith("prompt."):
        return "messages" if request is not None and request.kind is Kind.CHAT else "prompt"
    if field == "sampling.max_tokens":
        return request.max_tokens_param if request is not None else "max_tokens"
    if field.startswith("sampling."):
        return field.removeprefix("sampling.")
    return field


def error_code(err: ServiceError) -> str | None:
    if isinstance(err, ContextLengthExceeded):
        return "context_length_exceeded"
    if isinstance(err, ModelNotFound):
        return "model_not_found"
    if isinstance(err, RequestIdConflict):
        return "request_id_conflict"
    if isinstance(err, Unauthenticated):
        return "invalid_api_key"
    if isinstance(err, ResourceExhausted):
        return "rate_limit_exceeded"
    if isinstance(err, DeadlineExceeded):
        return "timeout"
    if isinstance(err, Cancelled):
        return "cancelled"
    return None


def error_type(err: ServiceError) -> str:
    """OpenAI's error types: a bad key and an unknown model are `invalid_request_error` there
    too (their `code` tells them apart: `invalid_api_key`, `model_not_found`)."""
    if isinstance(err, ResourceExhausted):
        return "rate_limit_error"
    if err.http_status < 500:
        return "invalid_request_error"
    return "server_error"


def error_body(
    err: ServiceError, request: OpenAIRequest | None = None, id_param: str = REQUEST_ID_PARAM
) -> tuple[int, dict[str, Any]]:
    """HTTP status and OpenAI error JSON for a domain error (`id_param`: the header the
    request's id came from)."""
    param = openai_param(err.field, request, id_param)
    message = str(err)
    if err.field and message.startswith(f"{err.field}: "):
        message = message[len(err.field) + 2 :]
    if param:
        message = f"{param}: {message}"
    return err.http_status, {
        "error": {
            "message": message,
            "type": error_type(err),
            "param": param,
            "code": error_code(err),
        }
    }


def plain_error(message: str, type_: str, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": None, "code": code}}


def duration(seconds: float) -> str:
    """OpenAI's reset format: `20ms`, `1.5s`, `6m0s`."""
    if seconds < 1:
        return f"{math.ceil(seconds * 1000)}ms"
    if seconds < 60:
        return f"{seconds:.3f}".rstrip("0").rstrip(".") + "s"
    minutes, rest = divmod(math.ceil(seconds), 60)
    return f"{minutes}m{rest}s"


def ratelimit_headers(snapshot: RateLimitSnapshot) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, state in (("requests", snapshot.requests), ("tokens", snapshot.tokens)):
        if state is not None:
            out[f"x-ratelimit-limit-{name}"] = str(state.limit)
            out[f"x-ratelimit-remaining-{name}"] = str(state.remaining)
            out[f"x-ratelimit-reset-{name}"] = duration(state.reset_s)
    return out


def error_headers(err: ServiceError) -> dict[str, str]:
    """Retry-After / retry-after-ms (when the error says), x-ratelimit-* for tenant limits,
    WWW-Authenticate for 401, `x-should-retry: false` for a request id taken by another body
    and for a prompt over the tenant's whole tokens-per-minute limit (OpenAI's clients retry
    every 409 and 429 otherwise: the same refusal again)."""
    out: dict[str, str] = {}
    if isinstance(err, RequestIdConflict | PromptOverTokenLimit):
        out["x-should-retry"] = "false"  # the same answer again
    if err.retry_after_s is not None:
        seconds = max(err.retry_after_s, 0.0)
        out["Retry-After"] = str(max(1, math.ceil(seconds)))
        out["retry-after-ms"] = str(max(1, math.ceil(seconds * 1000)))
    if isinstance(err, RateLimited) and err.snapshot is not None:
        out.update(ratelimit_headers(err.snapshot))
    if isinstance(err, Unauthenticated):
        out["WWW-Authenticate"] = "Bearer"
    return out


# -- responses ------------------------------------------------------------------------------


def usage(c: Completion) -> dict[str, Any]:
    return {
        "prompt_tokens": c.prompt_tokens,
        "completion_tokens": c.completion_tokens,
        "total_tokens": c.prompt_tokens + c.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": c.cached_prompt_tokens},
    }


def _finish(reason: FinishReason) -> str:
    return reason.value  # "stop" | "length", as OpenAI names them


class Shapes:
    """Response objects for one request (chat or text completion)."""

    def __init__(self, request: OpenAIRequest, created: int):
        self.request = request
        self.created = created
        chat = request.kind is Kind.CHAT
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{request.generation.request_id}"
        self._object = "chat.completion" if chat else "text_completion"
        self._chunk_object = "chat.completion.chunk" if chat else "text_completion"

    def _head(self, obj: str) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.request.generation.model,
            "system_fingerprint": None,
        }

    def response(self, text: str, done: Completion) -> dict[str, Any]:
        if self.request.kind is Kind.CHAT:
            choice: dict[str, Any] = {
                "index": 0,
                "message": {"role": "assistant", "content": text, "refusal": None},
                "logprobs": None,
                "finish_reason": _finish(done.finish_reason),
            }
        else:
            choice = {
                "index": 0,
                "text": text,
                "logprobs": None,
                "finish_reason": _finish(done.finish_reason),
            }
        return {**self._head(self._object), "choices": [choice], "usage": usage(done)}

    def _chunk(self, choice: dict[str, Any] | None) -> dict[str, Any]:
        out = {**self._head(self._chunk_object), "choices": [] if choice is None else [choice]}
        if self.request.include_usage:
            out["usage"] = None
        return out

    def _choice(self, text: str | None, finish: FinishReason | None, role: bool) -> dict[str, Any]:
        base: dict[str, Any] = {"index": 0}
        if self.request.kind is Kind.CHAT:
            delta: dict[str, Any] = {}
            if role:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            base["delta"] = delta
        else:
            base["text"] = text or ""
        base["logprobs"] = None
        base["finish_reason"] = None if finish is None else _finish(finish)
        return base

    def opening_chunks(self) -> list[dict[str, Any]]:
        """Chat streams open with the assistant role (as OpenAI's do)."""
        if self.request.kind is Kind.CHAT:
            return [self._chunk(self._choice("", None, role=True))]
        return []

    def text_chunk(self, text: str) -> dict[str, Any]:
        return self._chunk(self._choice(text, None, role=False))

    def closing_chunks(self, done: Completion) -> list[dict[str, Any]]:
        out = [self._chunk(self._choice(None, done.finish_reason, role=False))]
        if self.request.include_usage:
            last = self._chunk(None)
            last["usage"] = usage(done)
            out.append(last)
        return out


def sse(obj: Mapping[str, Any], event_id: str | None = None) -> bytes:
    """One Server-Sent Event; `event_id` (where the stream is, `http.EventIds`) lets a
    reconnecting client resume with `Last-Event-ID`."""
    if event_id is None:
        return b"data: " + dumps(obj) + b"\n\n"
    return b"id: %s\ndata: %s\n\n" % (event_id.encode(), dumps(obj))


SSE_DONE = b"data: [DONE]\n\n"


def dumps(obj: Mapping[str, Any]) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def model_card(model: ServedModel, created: int) -> dict[str, Any]:
    return {
        "id": model.name,
        "object": "model",
        "created": created,
        "owned_by": "llmmesh",
        "context_length": model.settings.context_length,
        "max_completion_tokens": model.settings.max_completion_tokens,
    }


def model_list(models: Sequence[ServedModel], created: int) -> dict[str, Any]:
    return {"object": "list", "data": [model_card(m, created) for m in models]}
