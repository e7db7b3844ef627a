"""The left-padded batch cache gives every row what it would get alone, on a tiny randomly
initialised Llama (same architecture family as SmolLM2; built from a config, nothing loaded)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
import torch

from llmmesh.cpu_engine.batch_model import PaddedBatchModel

VOCAB = 50


@pytest.fixture(scope="module")
def tiny_llama() -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
    )
    model: Any = LlamaForCausalLM(config)
    return model.eval()


@torch.inference_mode()
def solo_logits(model: Any, prompt: Sequence[int], fed: Sequence[int]) -> list[torch.Tensor]:
    """Next-token logits after the prompt, then after each fed token (no cache, no batch)."""
    out = []
    ids = list(prompt)
    for i in range(len(fed) + 1):
        out.append(model(input_ids=torch.tensor([ids])).logits[0, -1])
        if i < len(fed):
            ids.append(fed[i])
    return out


PROMPTS = {"a": [1, 2, 3, 4, 5, 6, 7, 8, 9], "b": [10, 11], "c": [20, 21, 22, 23, 24]}
FED = {"a": [30, 31, 32, 33, 34, 35], "b": [40, 41, 42, 43, 44, 45], "c": [6, 7, 8, 9, 10, 11]}


def test_batched_decode_matches_solo_across_joins_and_leaves(tiny_llama: Any) -> None:
    expected = {s: solo_logits(tiny_llama, PROMPTS[s], FED[s]) for s in PROMPTS}
    batch = PaddedBatchModel(tiny_llama)
    got: dict[str, list[torch.Tensor]] = {s: [] for s in PROMPTS}
    fed = {s: 0 for s in PROMPTS}

    def decode(ids: list[str]) -> None:
        logits = batch.decode(ids, [FED[s][fed[s]] for s in ids])
        for i, s in enumerate(ids):
            fed[s] += 1
            got[s].append(logits[i])

    got["a"].append(batch.prefill("a", PROMPTS["a"]))
    decode(["a"])
    got["b"].append(batch.prefill("b", PROMPTS["b"]))  # joins a longer sequence: left-padded
    decode(["a", "b"])
    decode(["a", "b"])
    got["c"].append(batch.prefill("c", PROMPTS["c"]))
    decode(["b", "a", "c"])  # any row order
    batch.remove("a")  # the longest leaves: the padding it caused goes with it
    decode(["b", "c"])
    assert batch.width == max(len(PROMPTS[s]) + fed[s] for s in ("b", "c"))
    decode(["b", "c"])
    decode(["c", "b"])
    for s in PROMPTS:
        assert len(got[s]) == len(expected[s][: len(got[s])])
        for step, (g, e) in enumerate(zip(got[s], expected[s], strict=False)):
            torch.testing.assert_close(g, e, atol=1e-4, rtol=1e-4, msg=f"{s} step {step}")


def test_removing_every_row_frees_the_cache(tiny_llama: Any) -> None:
    batch = PaddedBatchModel(tiny_llama)
    batch.prefill("a", [1, 2, 3])
    batch.decode(["a"], [4])
    batch.remove("a")
    assert batch.batch_rows == []
    assert batch.width == 0
    batch.prefill("b", [5])
    batch.remove("b")  # pending (never decoded) sequences are dropped too
    with pytest.raises(KeyError):
        batch.decode(["b"], [1])


def test_decode_rejects_unknown_sequences_and_bad_arguments(tiny_llama: Any) -> None:
    batch = PaddedBatchModel(tiny_llama)
    batch.prefill("a", [1, 2])
    with pytest.raises(ValueError, match="one token per sequence"):
        batch.decode(["a"], [1, 2])
    with pytest.raises(KeyError, match="zz"):
        batch.decode(["a", "zz"], [1, 2])
    with pytest.raises(ValueError, match="already in the batch"):
        batch.prefill("a", [3])
