"""OpenAI request parsing (`openai_request`): valid bodies → `OpenAIRequest`, invalid ones →
`InvalidRequest` naming the OpenAI parameter (pure functions, no server)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from services.gateway import openai_request
from services.gateway.core import ChatMessage, Sampling
from services.gateway.errors import InvalidRequest
from services.gateway.openai_request import Kind, parse_chat_request, parse_completion_request
from services.gateway.openai_response import error_body

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
        # OpenAI's seed is signed 64-bit: the same bits, unsigned.
        (chat(seed=-1), Sampling(seed=2**64 - 1), False, False),
        (chat(seed=-(2**63)), Sampling(seed=2**63), False, False),
        # vLLM's top_k extension: -1 (its default) and 0 disable it.
        (chat(top_k=5), Sampling(top_k=5), False, False),
        (chat(top_k=-1), Sampling(top_k=0), False, False),
        (chat(top_k=0), Sampling(top_k=0), False, False),
        (chat(min_p=0, stop_token_ids=[]), Sampling(), False, False),
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
        # What vllm-router 0.1.17 adds to every chat request it forwards (captured).
        (
            chat(
                stream=True,
                logprobs=False,
                no_stop_trim=False,
                ignore_eos=False,
                continue_final_message=False,
                skip_special_tokens=True,
                separate_reasoning=True,
                stream_reasoning=True,
                return_hidden_states=False,
                include_reasoning=True,
            ),
            Sampling(),
            True,
            False,
        ),
        (
            chat(
                add_generation_prompt=True,
                echo=False,
                min_tokens=0,
                repetition_penalty=1.0,
                spaces_between_special_tokens=True,
                include_reasoning=False,
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
                # `message.model_dump()` of the client's answer, sent back as history.
                {
                    "role": "assistant",
                    "content": "d",
                    "refusal": None,
                    "annotations": None,
                    "audio": None,
                    "function_call": None,
                    "tool_calls": None,
                },
                {"role": "assistant", "content": "e", "tool_calls": [], "annotations": []},
                {"role": "user", "content": ""},
            ],
            [
                ChatMessage("system", "s"),
                ChatMessage("user", "a\nb"),
                ChatMessage("assistant", "c"),
                ChatMessage("assistant", "d"),
                ChatMessage("assistant", "e"),
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


def test_completion_accepts_what_vllm_router_forwards() -> None:
    """The fields vllm-router 0.1.17 adds to every completion request (captured), at the values
    it sends."""
    body = completion(
        prompt="hi",
        max_tokens=8,
        stream=True,
        echo=False,
        no_stop_trim=False,
        ignore_eos=False,
        skip_special_tokens=True,
        return_hidden_states=False,
    )
    r = parse_completion_request(body, request_id="r")
    assert (r.generation.prompt_text, r.generation.sampling.max_tokens) == ("hi", 8)


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
        (chat(messages=[{"role": "user", "content": []}]), "messages[0].content"),
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
        (chat(top_k=-2), "top_k"),
        (chat(top_k=1.5), "top_k"),
        (chat(seed=-(2**63) - 1), "seed"),
        (chat(min_p=0.1), "min_p"),
        (chat(stop_token_ids=[7]), "stop_token_ids"),
        (
            chat(messages=[{"role": "assistant", "content": "x", "annotations": [{}]}]),
            "messages[0].annotations",
        ),
        (chat(logprobs=True), "logprobs"),
        (chat(top_logprobs=3), "top_logprobs"),
        (chat(frequency_penalty=0.5), "frequency_penalty"),
        (chat(logit_bias={"1": 5}), "logit_bias"),
        (chat(response_format={"type": "json_object"}), "response_format"),
        (chat(tools=[{"type": "function"}]), "tools"),
        (chat(store="yes"), "store"),
        (chat(metadata=[]), "metadata"),
        (chat(audio={"voice": "x"}), "audio"),
        # vLLM / SGLang extensions away from their neutral value
        (chat(ignore_eos=True), "ignore_eos"),
        (chat(no_stop_trim=True), "no_stop_trim"),
        (chat(skip_special_tokens=False), "skip_special_tokens"),
        (chat(continue_final_message=True), "continue_final_message"),
        (chat(add_generation_prompt=False), "add_generation_prompt"),
        (chat(echo=True), "echo"),
        (chat(min_tokens=3), "min_tokens"),
        (chat(repetition_penalty=1.2), "repetition_penalty"),
        (chat(return_hidden_states=True), "return_hidden_states"),
        (chat(include_reasoning="yes"), "include_reasoning"),
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
        (completion(prompt=[1, 2.5]), "prompt[1]"),  # token ids, one of them not: no "batch"
        (completion(prompt=[[1, 2, "a"]]), "prompt[0][2]"),
        (completion(echo=True), "echo"),
        (completion(ignore_eos=True), "ignore_eos"),
        (completion(continue_final_message=False), "continue_final_message"),
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


class CountingSizes:
    """A size check that refuses more than `limit` items and records what it was asked."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.asked: list[tuple[str, int | None, int | None]] = []

    def __call__(
        self, model: str, *, messages: int | None = None, prompt_ids: int | None = None
    ) -> None:
        self.asked.append((model, messages, prompt_ids))
        if max(messages or 0, prompt_ids or 0) > self.limit:
            raise InvalidRequest("too many", field="prompt" if messages is None else "messages")


@pytest.mark.parametrize(
    ("kind", "field", "items", "asked"),
    [
        # The items are not even well-formed: the count is refused before any is read.
        (Kind.CHAT, "messages", [{"role": "robot"}] * 3, ("m", 3, None)),
        (Kind.COMPLETION, "prompt", [-1] * 3, ("m", None, 3)),
        (Kind.COMPLETION, "prompt", [[-1] * 3], ("m", None, 3)),  # one prompt, nested
    ],
)
def test_item_counts_are_checked_before_the_items_are_read(
    kind: Kind, field: str, items: list[object], asked: tuple[str, int | None, int | None]
) -> None:
    parse = parse_chat_request if kind is Kind.CHAT else parse_completion_request
    sizes = CountingSizes(limit=2)
    with pytest.raises(InvalidRequest, match="too many") as info:
        parse(json.dumps({"model": "m", field: items}).encode(), request_id="r", sizes=sizes)
    assert info.value.field == field
    assert sizes.asked == [asked]


def test_overlong_unknown_field_name_is_shortened() -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_chat_request(chat(**{"k" * 10_000: 1}), request_id="r")
    assert info.value.field is not None
    assert len(info.value.field) < 100


def test_readme_table_names_every_field_the_parser_knows() -> None:
    """README.md's OpenAI compatibility table is the user's list: it names every field the
    parser supports, accepts at a neutral value or ignores, and nothing else."""
    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = text.split("## OpenAI API compatibility", 1)[1].split("\n## ", 1)[0]
    documented: set[str] = set()
    for line in section.splitlines():
        cells = line.split("|")
        if line.startswith("| `") and len(cells) > 2:
            documented.update(re.findall(r"`([a-z_]+)`", cells[1]))
    known = (
        set(openai_request._SUPPORTED_CHAT)
        | set(openai_request._SUPPORTED_COMPLETION)
        | set(openai_request._CHAT_NEUTRAL)
        | set(openai_request._CHAT_IGNORED)
        | set(openai_request._COMPLETION_NEUTRAL)
    )
    assert documented == known
