"""Per-request token choice from one row of next-token logits.

Temperature 0 (or top_k 1) is greedy: the argmax, ties to the lowest id, no randomness consumed.
Otherwise logits are divided by the temperature, cut to the `top_k` most likely tokens (0: no
cut), then to the smallest set whose probability reaches `top_p` (1: no cut; the most likely token
always stays), and one token is drawn with the request's own generator, so a request's draws
depend only on its seed and its logits, never on which other requests share the batch.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class SamplingParams:
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"runtime_top_k must be >= 0, got {self.top_k}")
        if not (math.isfinite(self.top_p) and 0 < self.top_p <= 1):
            raise ValueError(f"runtime_top_p must be in (0, 1], got {self.top_p}")
        if self.seed is not None and not 0 <= self.seed < 2**64:
            raise ValueError(f"seed must be in [0, 2^64), got {self.seed}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


class Sampler:
    """One request's token chooser (owns its random generator)."""

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self._generator: torch.Generator | None = None
        if not params.greedy:
            self._generator = torch.Generator()
            seed = params.seed if params.seed is not None else secrets.randbits(63)
            # torch seeds are signed 64-bit; fold the upper half of the UINT64 range onto it.
            self._generator.manual_seed(seed % 2**63)

    def choose(self, logits: torch.Tensor) -> int:
        """`logits`: a 1-D float tensor over the vocabulary. Raises ValueError on a NaN (argmax
        would pick it as a token)."""
        if bool(torch.isnan(logits).any()):
            raise ValueError("the logits contain NaN")
        if self._generator is None:
            return int(torch.argmax(logits).item())
        p = self.params
        scaled = logits.float() / p.temperature
        if 0 < p.top_k < scaled.numel():
            kth = torch.topk(scaled, p.top_k).values[-1]
            scaled = scaled.masked_fill(scaled < kth, float("-inf"))
        if p.top_p < 1:
            order = torch.argsort(scaled, descending=True)
            probs = torch.softmax(scaled[order], dim=-1)
            # Keep a token while the mass before it is below top_p (the first always stays).
            before = torch.cumsum(probs, dim=-1) - probs
            drop = order[before >= p.top_p]
            scaled = scaled.index_fill(0, drop, float("-inf"))
        probs = torch.softmax(scaled, dim=-1)
        return int(torch.multinomial(probs, 1, generator=self._generator).item())


def token_logprob(logits: torch.Tensor, token: int) -> float:
    """log p(token) under the unmodified distribution (TensorRT-LLM's `output_log_probs`)."""
    return float(torch.log_softmax(logits.float(), dim=-1)[token].item())
