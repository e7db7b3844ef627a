from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers.decoders import DecodeStream

from llmmesh.common.errors import ServiceError
from services.gateway import models
from services.gateway.core import GatewayCore, GenerationRequest, Sampling
from services.gateway.errors import ContextLengthExceeded, InvalidRequest, ModelNotFound
from services.gateway.models import OFF_LOOP_CHARS, IncrementalDecoder, ServedModel
from services.gateway.settings import GatewaySettings, ModelSettings
from services.gateway.stream_state import StopMatcher
from tests.gateway.conftest import FakeAdmission, FakeEngine, metaspace_model

MODEL = "smollm2"


@pytest.fixture(scope="module")
def model(tokenizer_path: Path) -> ServedModel:
    return ServedModel.load(
        ModelSettings(
            name=MODEL, tokenizer_path=tokenizer_path, context_length=64, max_completion_tokens=32
        )
    )


@pytest.fixture(scope="module")
def core(model: ServedModel) -> GatewayCore:
    return GatewayCore(
        GatewaySettings(models=[model.settings]), [model], FakeAdmission(), FakeEngine([]), 32
    )


def gen(**kw: object) -> GenerationRequest:
    base: dict[str, object] = {"model": MODEL, "request_id": "r", "prompt_text": "Hello there"}
    base.update(kw)
    return GenerationRequest(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("request_", "error", "field"),
    [
        (gen(model="nope"), ModelNotFound, "model"),
        (gen(model=""), InvalidRequest, "model"),
        (gen(prompt_text=""), InvalidRequest, "prompt"),
        (gen(prompt_text=None), InvalidRequest, "prompt"),
        (gen(prompt_text=None, prompt_ids=[]), InvalidRequest, "prompt"),
        (gen(prompt_text=None, prompt_ids=[10**7]), InvalidRequest, "prompt.token_ids"),
        # Beyond the context (64): refused by its length, before any id is read.
        (gen(prompt_text=None, prompt_ids=[10**7] * 64), ContextLengthExceeded, "prompt"),
        (gen(prompt_text="word " * 100), InvalidRequest, "prompt"),
        (gen(sampling=Sampling(max_tokens=0)), InvalidRequest, "sampling.max_tokens"),
        (gen(sampling=Sampling(stop=("x" * 257,))), InvalidRequest, "sampling.stop"),
        (gen(sampling=Sampling(max_tokens=33)), InvalidRequest, "sampling.max_tokens"),
        (
            gen(prompt_text="word " * 40, sampling=Sampling(max_tokens=30)),
            InvalidRequest,
            "sampling.max_tokens",
        ),
        (gen(sampling=Sampling(temperature=-0.1)), InvalidRequest, "sampling.temperature"),
        (gen(sampling=Sampling(temperature=float("nan"))), InvalidRequest, "sampling.temperature"),
        (gen(sampling=Sampling(temperature=2.5)), InvalidRequest, "sampling.temperature"),
        (gen(sampling=Sampling(top_p=-0.1)), InvalidRequest, "sampling.top_p"),
        (gen(sampling=Sampling(top_p=1.5)), InvalidRequest, "sampling.top_p"),
        (gen(sampling=Sampling(top_k=10**9)), InvalidRequest, "sampling.top_k"),
        (gen(sampling=Sampling(stop=("",))), InvalidRequest, "sampling.stop"),
        (gen(sampling=Sampling(stop=tuple("abcdefghij"))), InvalidRequest, "sampling.stop"),
        (gen(request_id="x" * 300), InvalidRequest, "request_id"),
        (gen(request_id="a\nb"), InvalidRequest, "request_id"),
        (gen(request_id="a\udcffb"), InvalidRequest, "request_id"),
    ],
)
async def test_bad_input_names_the_field(
    core: GatewayCore, request_: GenerationRequest, error: type[ServiceError], field: str
) -> None:
    with pytest.raises(error) as info:
        await core.validate(request_)
    assert info.value.field == field
    assert str(info.value).startswith(field)


@pytest.mark.parametrize(
    ("sampling", "expected"),
    [
        # 0 as an FP32: the engines refuse it (top-p in (0, 1]); the most likely token alone.
        (Sampling(top_p=1e-46, temperature=0.7), (1.0, 1, 0.7)),
        # Subnormal or 0 as an FP32 (the logits over it overflow): greedy.
        (Sampling(temperature=1e-40), (1.0, 0, 0.0)),
        (Sampling(temperature=1e-6, top_p=0.5), (0.5, 0, 0.0)),
        (Sampling(temperature=1e-4, top_p=1e-4), (1e-4, 0, 1e-4)),  # as sent
    ],
)
async def test_a_temperature_or_top_p_too_small_for_the_engines_is_greedy(
    core: GatewayCore, sampling: Sampling, expected: tuple[float, int, float]
) -> None:
    v = await core.validate(gen(sampling=sampling))
    assert (v.top_p, v.top_k, v.temperature) == expected


async def test_top_p_zero_keeps_the_most_likely_token(core: GatewayCore) -> None:
    v = await core.validate(gen(sampling=Sampling(top_p=0.0, temperature=0.7)))
    assert (v.top_p, v.top_k, v.temperature) == (1.0, 1, 0.7)


async def test_valid_request_defaults(core: GatewayCore, model: ServedModel) -> None:
    v = await core.validate(gen())
    assert v.prompt_ids == model.encode("Hello there")
    assert v.temperature == 1.0
    assert v.top_p == 1.0
    assert 1 <= v.max_tokens <= 64 - len(v.prompt_ids)


@pytest.mark.parametrize("chars", [OFF_LOOP_CHARS - 1, OFF_LOOP_CHARS])
async def test_a_long_prompt_is_tokenized_while_the_loop_serves_others(
    core: GatewayCore, model: ServedModel, chars: int
) -> None:
    text = ("All work and no play. " * (chars // 22 + 1))[:chars]
    order: list[str] = []

    async def other_stream() -> None:
        order.append("other")

    task = asyncio.create_task(other_stream())
    with pytest.raises(ContextLengthExceeded):  # ~4k tokens: beyond this model's 64
        await core.validate(gen(prompt_text=text))
    order.append("validated")
    await task
    # Off the loop, the other task ran while the prompt was tokenized; inline, only after.
    expected = ["other", "validated"] if chars >= OFF_LOOP_CHARS else ["validated", "other"]
    assert order == expected


async def test_tokenizing_off_the_loop_gives_the_same_ids(model: ServedModel) -> None:
    text = "Ünïcode, spaces   and\nnewlines; " * 600
    assert len(text) >= OFF_LOOP_CHARS
    assert await model.encode_off_loop(text) == model.encode(text)


@pytest.mark.parametrize(
    ("stops", "chunks", "emitted", "stopped"),
    [
        ((), ["ab", "cd"], "abcd", False),
        (("cd",), ["ab", "cd", "ef"], "ab", True),
        (("cd",), ["abc", "de"], "ab", True),
        (("xyz",), ["abxy", "q"], "abxyq", False),
        (("END", "!"), ["hi", "!"], "hi", True),
    ],
)
def test_stop_matcher(
    stops: tuple[str, ...], chunks: list[str], emitted: str, stopped: bool
) -> None:
    m = StopMatcher(stops)
    out = ""
    hit = False
    for c in chunks:
        text, hit = m.feed(c)
        out += text
        if hit:
            break
    if not hit:
        out += m.flush()
    assert (out, hit) == (emitted, stopped)


@pytest.mark.parametrize(
    "text", ["The capital of France is Paris.", "naïve café ☕ 日本語", "a  b\n\tc"]
)
def test_incremental_decoder_reassembles_text(model: ServedModel, text: str) -> None:
    ids = model.encode(text)
    dec = IncrementalDecoder(model)
    out = "".join(dec.push([t]) for t in ids) + dec.flush()
    assert out == model.decode(ids)


def _deltas_by_definition(model: ServedModel, pushes: list[list[int] | None]) -> list[str]:
    """Each push's delta by the decoder's definition: the text of every token so far against
    the text of those already returned, decoded from the start of the last delta's tokens, and
    held back while it ends in an incomplete character. A flush (None) returns the held-back
    rest and decodes what follows without the earlier tokens as context; so does the end."""
    ids: list[int] = []
    prefix_at = read_at = 0
    out = []
    for push in [*pushes, None]:
        if push is not None:
            ids.extend(push)
        prefix = model.tokenizer.decode(ids[prefix_at:read_at], skip_special_tokens=True)
        full = model.tokenizer.decode(ids[prefix_at:], skip_special_tokens=True)
        if push is None:
            out.append(full[len(prefix) :] if len(full) > len(prefix) else "")
            prefix_at = read_at = len(ids)
        elif len(full) > len(prefix) and not full.endswith("\ufffd"):
            prefix_at, read_at = read_at, len(ids)
            out.append(full[len(prefix) :])
        else:
            out.append("")
    return out


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.lists(
                # Byte tokens (partial UTF-8 characters), common words, special tokens, any.
                st.one_of(st.integers(0, 300), st.integers(0, 49151)),
                max_size=3,
            ),
            st.none(),  # a flush
        ),
        min_size=1,
        max_size=40,
    )
)
def test_incremental_decoder_returns_the_definitions_deltas(
    model: ServedModel, pushes: list[list[int] | None]
) -> None:
    dec = IncrementalDecoder(model)
    got = [dec.flush() if p is None else dec.push(p) for p in pushes] + [dec.flush()]
    assert got == _deltas_by_definition(model, pushes)


def test_incremental_decoder_goes_on_when_the_library_refuses_a_stream(
    model: ServedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    library = DecodeStream

    class RefusesThirdStep:
        """A streaming decoder that fails as the library's prefix check does."""

        def __init__(self, ids: list[int] | None = None, skip_special_tokens: bool = False) -> None:
            self._real = library(ids=ids, skip_special_tokens=skip_special_tokens)
            self._steps = 0

        def step(self, tokenizer: object, ids: int | list[int]) -> str | None:
            self._steps += 1
            if self._steps == 3:
                raise Exception("Invalid prefix encountered")  # what the library raises
            return self._real.step(tokenizer, ids)  # type: ignore[arg-type]

    monkeypatch.setattr(models, "DecodeStream", RefusesThirdStep)
    ids = model.encode("naïve café ☕ 日本語, and then some more text")
    dec = IncrementalDecoder(model)
    got = [dec.push([t]) for t in ids] + [dec.flush()]
    assert got == _deltas_by_definition(model, [[t] for t in ids])
    assert "".join(got) == model.decode(ids)


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory: pytest.TempPathFactory) -> ServedModel:
    return metaspace_model(tmp_path_factory.mktemp("metaspace"), "sp", context_length=64)


async def test_a_text_prompt_starts_as_the_tokenizer_starts_a_text(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """A tokenizer whose post-processor puts a BOS before a text (Llama, Mistral): a text
    prompt starts with it (once, also when the text begins with it); prompt ids are sent as
    given; a tokenizer without one (SmolLM2's) adds nothing."""
    bos = metaspace_model(tmp_path_factory.mktemp("bos"), "bos", bos=True, context_length=64)
    assert bos.text_prefix == (8,)
    core = GatewayCore(
        GatewaySettings(models=[bos.settings]), [bos], FakeAdmission(), FakeEngine([]), 32
    )
    text = GenerationRequest(model="bos", request_id="r", prompt_text="The capital is")
    assert (await core.validate(text)).prompt_ids == [8, 2, 3, 4]
    again = GenerationRequest(model="bos", request_id="r", prompt_text="<s>The capital is")
    assert (await core.validate(again)).prompt_ids == [8, 2, 3, 4]
    ids = GenerationRequest(model="bos", request_id="r", prompt_ids=[2, 3, 4])
    assert (await core.validate(ids)).prompt_ids == [2, 3, 4]


def test_a_tokenizer_without_a_bos_adds_none(model: ServedModel) -> None:
    assert model.text_prefix == ()


def test_a_completion_decodes_after_its_prompt(sp_model: ServedModel) -> None:
    prompt = sp_model.encode("The capital is")
    assert prompt == [2, 3, 4]
    alone = IncrementalDecoder(sp_model)
    assert alone.push([5]) + alone.push([6]) + alone.flush() == "Paris."  # the space lost
    after = IncrementalDecoder(sp_model, prompt)
    assert [after.push([5]), after.push([6]), after.flush()] == [" Paris", ".", ""]
