"""The real GGUF loads offline, and its dequantized copy in the cache loads back identical."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from llmmesh.cpu_engine.batch_model import default_gguf_path, load_causal_lm

# Loads the real model twice (~25 s): with the integration tests.
pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


def test_the_cached_copy_is_the_same_model(tmp_path: Path) -> None:
    gguf = default_gguf_path()
    from_gguf, _ = load_causal_lm(gguf, cache_dir=tmp_path)
    (entry,) = [p for p in tmp_path.iterdir()]
    assert entry.name.startswith("SmolLM2-135M-Instruct.Q4_1-")
    assert sorted(p.name for p in entry.iterdir()) == ["config.json", "model.safetensors"]
    from_cache, _ = load_causal_lm(gguf, cache_dir=tmp_path)
    ids = torch.tensor([[1, 504, 3575, 282, 4649, 314]])
    with torch.inference_mode():
        torch.testing.assert_close(from_cache(ids).logits, from_gguf(ids).logits, rtol=0, atol=0)
