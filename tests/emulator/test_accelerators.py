from __future__ import annotations

import pytest

from llmmesh.accelerators import (
    DEFAULT_PROFILE,
    PROFILES,
    StepShape,
    decode_batch_shape,
    decode_shape,
    get_profile,
    prefill_shape,
)
from llmmesh.accelerators import (
    LLAMA_3_1_8B_H100_BF16 as LLAMA,
)


def decode_batch(batch: int, context: int) -> StepShape:
    shape = StepShape()
    for _ in range(batch):
        shape = shape + decode_shape(context)
    return shape


def test_profile_constants_derive_from_the_model_card() -> None:
    assert PROFILES["llama-3.1-8b-h100-bf16"] is LLAMA
    assert get_profile(DEFAULT_PROFILE) is LLAMA
    assert LLAMA.kv_bytes_per_token == 2 * 32 * 8 * 128 * 2 == 131072
    assert LLAMA.weight_bytes == pytest.approx(16.06e9)
    with pytest.raises(ValueError, match="unknown cost profile"):
        get_profile("gpt-5-on-a-toaster")


@pytest.mark.parametrize(
    ("shape", "expected_ms", "bound"),
    [
        # 16.06e9 B / (3.35e12 * 0.8) + 0.5 ms; KV of 128 tokens adds 0.006 ms.
        (decode_batch(1, 128), 6.499, "memory"),
        # 64 sequences at 1k context: (16.06e9 + 64 * 1024 * 131072) B / 2.68e12 B/s + 0.5 ms.
        (decode_batch(64, 1024), 9.698, "memory"),
        # 1000-token prefill: (2 * 8.03e9 * 1000 + 4 * 32 * 4096 * 500500) / (989e12 * 0.5) + 0.5 ms.
        (prefill_shape(1000, 0), 33.510, "compute"),
        # After 512 cached tokens: 1000 * 512 more attention pairs, same weight FLOPs.
        (prefill_shape(1000, 512), 34.051, "compute"),
    ],
)
def test_step_time(shape: StepShape, expected_ms: float, bound: str) -> None:
    assert LLAMA.step_time_s(shape) * 1e3 == pytest.approx(expected_ms, abs=0.01)
    mem, comp = LLAMA.memory_time_s(shape), LLAMA.compute_time_s(shape)
    assert (mem > comp) == (bound == "memory")


@pytest.mark.parametrize(("batch", "context"), [(1, 1), (3, 100), (64, 1024)])
def test_decode_batch_shape_is_batch_single_decodes(batch: int, context: int) -> None:
    assert decode_batch_shape(context, batch) == decode_batch(batch, context)


def test_empty_step_costs_nothing() -> None:
    assert LLAMA.step_time_s(StepShape()) == 0.0


@pytest.mark.parametrize(
    ("new", "cached", "pairs"),
    [(1, 0, 1), (4, 0, 10), (4, 8, 4 * 8 + 10), (0, 5, 0)],
)
def test_prefill_attention_pairs_are_causal(new: int, cached: int, pairs: int) -> None:
    assert prefill_shape(new, cached).attention_pairs == pairs
    assert prefill_shape(new, cached).kv_tokens == new + cached


def test_step_time_grows_with_batch_context_and_prompt() -> None:
    times = [LLAMA.step_time_s(decode_batch(b, 512)) for b in (1, 8, 64, 256)]
    assert times == sorted(times)
    assert len(set(times)) == len(times)
    ctx = [LLAMA.step_time_s(decode_batch(8, c)) for c in (128, 1024, 8192)]
    assert ctx == sorted(ctx)
    prefill = [LLAMA.step_time_s(prefill_shape(n, 0)) for n in (128, 1024, 4096)]
    assert prefill == sorted(prefill)
    # A fused step (prefill + decodes) costs less than running them separately.
    fused = LLAMA.step_time_s(prefill_shape(512, 0) + decode_batch(16, 512))
    assert fused < LLAMA.step_time_s(prefill_shape(512, 0)) + LLAMA.step_time_s(
        decode_batch(16, 512)
    )
