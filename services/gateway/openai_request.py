"""OpenAI request parsing: the inbound boundary from OpenAI wire bodies to the core's
`GenerationRequest`. Owns `Kind`, `OpenAIRequest` (the parsed request plus the wire details
responses and errors need), strict JSON body decoding, the field tables (supported, neutral-only,
ignored), and `parse_chat_request` / `parse_completion_request`. Pure functions; the aiohttp
front (`http.py`) only moves bytes; responses and error bodies are `openai_response`'s.

Requests are checked the way OpenAI checks them: JSON object bodies only, exact JSON types (no
string → number coercion, booleans are not integers), unknown fields rejected, and fields the
engine cannot honour accepted only at their neutral value (`n` 1, `logprobs` false, penalties
0, `response_format` text, ...). Every error names the offending parameter (`param`).

vLLM's and SGLang's sampling extensions are known too: routers in front of OpenAI servers
(vllm-router, SGLang's model gateway) forward every request with them set to their defaults, so
they are accepted at that neutral value (`ignore_eos` false, `skip_special_tokens` true, ...)
and refused otherwise, like the OpenAI parameters above.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from pydantic_core import from_json

from llmmesh.common.topology import Priority
from services.gateway.core import ChatMessage, GenerationRequest, Sampling
from services.gateway.errors import InvalidRequest

MAX_USER_CHARS = 256
_MAX_NAME_IN_MESSAGE = 64


class SizeCheck(Protocol):
    """Refuses (raises) a prompt whose item counts exceed the bounds for `model`."""

    def __call__(
        self, model: str, *, messages: int | None = None, prompt_ids: int | None = None
    ) -> None: ...


class Kind(enum.Enum):
    CHAT = "chat"
    COMPLETION = "completion"


@dataclass(frozen=True, slots=True)
class OpenAIRequest:
    kind: Kind
    generation: GenerationRequest
    stream: bool
    include_usage: bool
    # Which of max_tokens / max_completion_tokens the client used (errors name that one).
    max_tokens_param: str = "max_tokens"
    user: str | None = None


# -- JSON helpers ---------------------------------------------------------------------------


def _type_name(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _short(name: str) -> str:
    return name if len(name) <= _MAX_NAME_IN_MESSAGE else name[:_MAX_NAME_IN_MESSAGE] + "…"


def _bad_type(param: str, expected: str, value: object) -> InvalidRequest:
    return InvalidRequest(
        f"invalid type: expected {expected}, got {_type_name(value)}", field=param
    )


def _int(value: object, param: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad_type(param, "an integer", value)
    return value


def _number(value: object, param: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _bad_type(param, "a number", value)
    out = float(value) if isinstance(value, float) else _int_to_float(value, param)
    if not math.isfinite(out):
        raise InvalidRequest("must be a finite number", field=param)
    return out


def _int_to_float(value: int, param: str) -> float:
    try:
        return float(value)
    except OverflowError:
        raise InvalidRequest("must be a finite number", field=param) from None


def _bool(value: object, param: str) -> bool:
    if not isinstance(value, bool):
        raise _bad_type(param, "a boolean", value)
    return value


def _str(value: object, param: str) -> str:
    if not isinstance(value, str):
        raise _bad_type(param, "a string", value)
    return value


def _object(value: object, param: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _bad_type(param, "an object", value)
    return value


def parse_json_object(body: bytes) -> dict[str, Any]:
    """The request body as a JSON object (strict JSON: UTF-8, no NaN/Infinity, bounded nesting)."""
    if not body.strip():
        raise InvalidRequest("the request body is empty; expected a JSON object")
    try:
        data = from_json(body, allow_inf_nan=False)
    except ValueError as err:
        raise InvalidRequest(f"the request body is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise InvalidRequest(f"the request body must be a JSON object, got {_type_name(data)}")
    return data


def _never(_: Any) -> bool:
    return False


def _zero(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | float) and value == 0


# Known OpenAI parameters this gateway cannot honour: accepted only at their neutral value.
_NEUTRAL_CHAT: dict[str, Callable[[Any], bool]] = {
    "frequency_penalty": _zero,
    "presence_penalty": _zero,
    "logit_bias": lambda v: v == {},
    "logprobs": lambda v: v is False,
    "top_logprobs": _zero,
    "response_format": lambda v: v == {"type": "text"},
    "tools": lambda v: v == [],
    "tool_choice": lambda v: v == "none",
    "functions": lambda v: v == [],
    "function_call": lambda v: v == "none",
    "modalities": lambda v: v == ["text"],
    "audio": _never,
    "prediction": _never,
    "web_search_options": _never,
    "reasoning_effort": _never,
    "verbosity": _never,
    "moderation": _never,
    "prompt_cache_options": _never,
}
_NEUTRAL_COMPLETION: dict[str, Callable[[Any], bool]] = {
    "frequency_penalty": _zero,
    "presence_penalty": _zero,
    "logit_bias": lambda v: v == {},
    "logprobs": _never,
    "best_of": lambda v: v == 1 and not isinstance(v, bool),
    "echo": lambda v: v is False,
    "suffix": lambda v: v == "",
}
# vLLM / SGLang extensions, at the value that means "as a plain OpenAI request": what routers
# forward when the client did not set them. Both request kinds.
_NEUTRAL_EXTENSIONS: dict[str, Callable[[Any], bool]] = {
    "ignore_eos": lambda v: v is False,
    "no_stop_trim": lambda v: v is False,
    "skip_special_tokens": lambda v: v is True,  # the gateway's detokenizer skips them
    "spaces_between_special_tokens": lambda v: v is True,
    "return_hidden_states": lambda v: v is False,
    "min_tokens": _zero,
    "min_p": _zero,
    "stop_token_ids": lambda v: v == [],
    "repetition_penalty": lambda v: v == 1 and not isinstance(v, bool),
}
_NEUTRAL_CHAT_EXTENSIONS: dict[str, Callable[[Any], bool]] = {
    "echo": lambda v: v is False,
    "continue_final_message": lambda v: v is False,
    "add_generation_prompt": lambda v: v is True,  # the chat template always gets it
}
# Reasoning output switches: with no reasoning parser there is no reasoning to include,
# separate or stream, so either value means the same here.
_IGNORED_CHAT_EXTENSIONS: dict[str, Callable[[Any, str], object]] = {
    "include_reasoning": _bool,
    "separate_reasoning": _bool,
    "stream_reasoning": _bool,
}
# Known OpenAI parameters with no effect here: type-checked, then ignored.
_IGNORED_CHAT: dict[str, Callable[[Any, str], object]] = {
    "metadata": _object,
    "store": _bool,
    "service_tier": _str,
    "parallel_tool_calls": _bool,
    "prompt_cache_key": _str,
    "prompt_cache_retention": _str,
    "safety_identifier": _str,
}
_SUPPORTED_CHAT = frozenset(
    {
        "model",
        "messages",
        "max_tokens",
        "max_completion_tokens",
        "temperature",
        "top_p",
        "top_k",
        "stop",
        "seed",
        "user",
        "n",
        "stream",
        "stream_options",
    }
)
_SUPPORTED_COMPLETION = frozenset(
    {
        "model",
        "prompt",
        "max_tokens",
        "temperature",
        "top_p",
        "top_k",
        "stop",
        "seed",
        "user",
        "n",
        "stream",
        "stream_options",
    }
)
_CHAT_NEUTRAL = _NEUTRAL_CHAT | _NEUTRAL_EXTENSIONS | _NEUTRAL_CHAT_EXTENSIONS
_CHAT_IGNORED = _IGNORED_CHAT | _IGNORED_CHAT_EXTENSIONS
_COMPLETION_NEUTRAL = _NEUTRAL_COMPLETION | _NEUTRAL_EXTENSIONS
_MESSAGE_KEYS = frozenset({"role", "content", "name"})
# Assistant message fields for tool use / audio, accepted at their neutral value (null always,
# as `_check_fields`): an assistant message sent back as the client's `message.model_dump()`
# carries `annotations: null`; frameworks send `tool_calls: []`.
_MESSAGE_NEUTRAL: dict[str, Callable[[Any], bool]] = {
    "function_call": _never,
    "audio": _never,
    "refusal": _never,
    "tool_call_id": _never,
    "tool_calls": lambda v: v == [],
    "annotations": lambda v: v == [],
}
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def _check_fields(
    body: Mapping[str, Any],
    supported: frozenset[str],
    neutral: Mapping[str, Callable[[Any], bool]],
    ignored: Mapping[str, Callable[[Any, str], object]],
) -> None:
    for key, value in body.items():
        if key in supported:
            continue
        if key in neutral:
            if value is not None and not neutral[key](value):
                raise InvalidRequest(
                    "not supported by this server (only its neutral value is accepted)", field=key
                )
        elif key in ignored:
            if value is not None:
                ignored[key](value, key)
        else:
            raise InvalidRequest(
                f"unrecognized request argument supplied: {_short(key)}", field=_short(key)
            )


def _parse_stop(value: object) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list):
        return tuple(_str(s, f"stop[{i}]") for i, s in enumerate(value))
    raise _bad_type("stop", "a string or an array of strings", value)


# model, sampling, stream, include_usage, user, the max-tokens parameter's name
_Common = tuple[str, Sampling, bool, bool, str | None, str]


def _common(body: Mapping[str, Any], kind: Kind) -> _Common:
    if "model" not in body or body["model"] is None:
        raise InvalidRequest("is required", field="model")
    model = _str(body["model"], "model")
    n = body.get("n")
    if n is not None and _int(n, "n") != 1:
        raise InvalidRequest("only n=1 is supported", field="n")
    stream = body.get("stream")
    stream = False if stream is None else _bool(stream, "stream")
    include_usage = False
    options = body.get("stream_options")
    if options is not None:
        opts = _object(options, "stream_options")
        if not stream:
            raise InvalidRequest("only allowed when stream is true", field="stream_options")
        for key, value in opts.items():
            if key == "include_usage":
                include_usage = value is not None and _bool(value, "stream_options.include_usage")
            elif key == "include_obfuscation":
                if value is not None:
                    _bool(value, "stream_options.include_obfuscation")
            else:
                raise InvalidRequest(
                    f"unrecognized argument: {_short(key)}", field=f"stream_options.{_short(key)}"
                )
    user = body.get("user")
    if user is not None:
        user = _str(user, "user")
        if len(user) > MAX_USER_CHARS:
            raise InvalidRequest(f"longer than {MAX_USER_CHARS} characters", field="user")
    max_param = "max_tokens"
    max_tokens = body.get("max_tokens")
    if kind is Kind.CHAT and body.get("max_completion_tokens") is not None:
        if max_tokens is not None:
            raise InvalidRequest(
                "set max_completion_tokens or max_tokens, not both", field="max_tokens"
            )
        max_param, max_tokens = "max_completion_tokens", body["max_completion_tokens"]
    temperature = body.get("temperature")
    top_p = body.get("top_p")
    top_k = body.get("top_k")
    seed = body.get("seed")
    sampling = Sampling(
        max_tokens=None if max_tokens is None else _int(max_tokens, max_param),
        temperature=None if temperature is None else _number(temperature, "temperature"),
        top_p=None if top_p is None else _number(top_p, "top_p"),
        top_k=None if top_k is None else _top_k(top_k),
        stop=_parse_stop(body.get("stop")),
        seed=None if seed is None else _seed(seed),
    )
    return model, sampling, stream, include_usage, user, max_param


def _parse_content(value: object, param: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        if not value:
            raise InvalidRequest("must not be an empty array", field=param)
        texts: list[str] = []
        for j, part in enumerate(value):
            p = _object(part, f"{param}[{j}]")
            kind = p.get("type")
            if kind != "text":
                raise InvalidRequest(
                    "only text content parts are supported", field=f"{param}[{j}].type"
                )
            for key in p:
                if key not in ("type", "text"):
                    raise InvalidRequest(
                        f"unrecognized argument: {_short(key)}", field=f"{param}[{j}].{_short(key)}"
                    )
            texts.append(_str(p.get("text"), f"{param}[{j}].text"))
        return "\n".join(texts)
    if value is None:
        raise InvalidRequest("is required", field=param)
    raise _bad_type(param, "a string or an array of content parts", value)


def _top_k(value: object) -> int:
    """vLLM's `top_k` extension: -1 (its default) or 0 disables it."""
    k = _int(value, "top_k")
    if k < -1:
        raise InvalidRequest("must be -1 or 0 (disabled), or positive", field="top_k")
    return max(k, 0)


def _seed(value: object) -> int:
    """OpenAI's seed is a signed 64-bit integer; the core's, its 64 bits unsigned (the same
    bits: -1 is 2**64 - 1)."""
    seed = _int(value, "seed")
    if not -(2**63) <= seed < 2**64:
        raise InvalidRequest("must be a 64-bit integer", field="seed")
    return seed + 2**64 if seed < 0 else seed


def _parse_messages(value: object, model: str, sizes: SizeCheck) -> list[ChatMessage]:
    if value is None:
        raise InvalidRequest("is required", field="messages")
    if not isinstance(value, list):
        raise _bad_type("messages", "an array", value)
    if not value:
        raise InvalidRequest("must not be empty", field="messages")
    sizes(model, messages=len(value))  # before each message is read
    out: list[ChatMessage] = []
    for i, raw in enumerate(value):
        p = f"messages[{i}]"
        msg = _object(raw, p)
        role = msg.get("role")
        if role is None:
            raise InvalidRequest("is required", field=f"{p}.role")
        role = _str(role, f"{p}.role")
        if role in ("tool", "function"):
            raise InvalidRequest(f"{role!r} messages are not supported", field=f"{p}.role")
        if role not in _ROLES:
            raise InvalidRequest(
                f"must be one of {', '.join(_ROLES)}; got {_short(role)!r}", field=f"{p}.role"
            )
        for key, item in msg.items():
            if key in _MESSAGE_NEUTRAL:
                if item is not None and not _MESSAGE_NEUTRAL[key](item):
                    raise InvalidRequest("not supported by this server", field=f"{p}.{key}")
            elif key not in _MESSAGE_KEYS:
                raise InvalidRequest(
                    f"unrecognized argument: {_short(key)}", field=f"{p}.{_short(key)}"
                )
        name = msg.get("name")
        if name is not None:
            _str(name, f"{p}.name")
        out.append(ChatMessage(_ROLES[role], _parse_content(msg.get("content"), f"{p}.content")))
    return out


def _ids(value: list[Any], model: str, sizes: SizeCheck, param: str) -> bool:
    """Whether a non-empty array is token ids (its first element an integer); their count is
    checked before they are read, and an element that is no integer is named (`param[i]`)."""
    if not (isinstance(value[0], int) and not isinstance(value[0], bool)):
        return False
    sizes(model, prompt_ids=len(value))
    for i, t in enumerate(value):
        if isinstance(t, bool) or not isinstance(t, int):
            raise _bad_type(f"{param}[{i}]", "an integer (a token id)", t)
    return True


def _parse_prompt(
    value: object, model: str, sizes: SizeCheck
) -> tuple[str | None, list[int] | None]:
    """A completions prompt: a string, token ids, or a one-element array of either."""
    if value is None:
        raise InvalidRequest("is required", field="prompt")
    if isinstance(value, str):
        return value, None
    if not isinstance(value, list):
        raise _bad_type("prompt", "a string or an array", value)
    if not value:
        raise InvalidRequest("must not be empty", field="prompt")
    if _ids(value, model, sizes, "prompt"):
        return None, list(value)
    if len(value) > 1:
        raise InvalidRequest("batched prompts (more than one) are not supported", field="prompt")
    only = value[0]
    if isinstance(only, str):
        return only, None
    if isinstance(only, list) and (not only or _ids(only, model, sizes, "prompt[0]")):
        return None, list(only)
    raise _bad_type("prompt[0]", "a string or an array of token ids", only)


def _request(
    kind: Kind,
    common: _Common,
    *,
    request_id: str,
    api_key: str | None,
    messages: list[ChatMessage] | None = None,
    prompt_text: str | None = None,
    prompt_ids: list[int] | None = None,
) -> OpenAIRequest:
    """The request as the core takes it, from the body's parsed common fields and prompt."""
    model, sampling, stream, include_usage, user, max_param = common
    return OpenAIRequest(
        kind=kind,
        generation=GenerationRequest(
            model=model,
            request_id=request_id,
            messages=messages,
            prompt_text=prompt_text,
            prompt_ids=prompt_ids,
            sampling=sampling,
            priority=Priority.STANDARD,
            tenant=user or "",
            api_key=api_key,
        ),
        stream=stream,
        include_usage=include_usage,
        max_tokens_param=max_param,
        user=user,
    )


def _no_size_check(
    model: str, *, messages: int | None = None, prompt_ids: int | None = None
) -> None:
    return None


def parse_chat_request(
    body: bytes, *, request_id: str, api_key: str | None = None, sizes: SizeCheck = _no_size_check
) -> OpenAIRequest:
    """`sizes(model, messages=n)` refuses a count before the items are read
    (`GatewayCore.check_sizes`)."""
    data = parse_json_object(body)
    _check_fields(data, _SUPPORTED_CHAT, _CHAT_NEUTRAL, _CHAT_IGNORED)
    common = _common(data, Kind.CHAT)
    return _request(
        Kind.CHAT,
        common,
        request_id=request_id,
        api_key=api_key,
        messages=_parse_messages(data.get("messages"), common[0], sizes),
    )


def parse_completion_request(
    body: bytes, *, request_id: str, api_key: str | None = None, sizes: SizeCheck = _no_size_check
) -> OpenAIRequest:
    """`sizes(model, prompt_ids=n)` as in `parse_chat_request`."""
    data = parse_json_object(body)
    _check_fields(data, _SUPPORTED_COMPLETION, _COMPLETION_NEUTRAL, {})
    common = _common(data, Kind.COMPLETION)
    text, ids = _parse_prompt(data.get("prompt"), common[0], sizes)
    return _request(
        Kind.COMPLETION,
        common,
        request_id=request_id,
        api_key=api_key,
        prompt_text=text,
        prompt_ids=ids,
    )
