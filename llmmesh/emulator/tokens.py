"""Deterministic output tokens.

Token i of a request is a pure function of (seed, prompt, i), so any test can predict the exact
stream: `token(i) = vocab_min + xxh3_64(le64(seed) || le64(h(prompt)) || le64(i)) mod (vocab_max -
vocab_min)`, where h(prompt) = xxh3_64 of the prompt as little-endian uint32 words. A token equal to
`end_id` is replaced by the next id in the range, so generation never stops early and the output
length always equals `request_output_len` (like Dynamo's mocker engine).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import xxhash


class VocabRange(Protocol):
    """Anything with the vocabulary bounds, e.g. `EmulatorSettings`."""

    @property
    def vocab_min(self) -> int: ...

    @property
    def vocab_max(self) -> int: ...


@dataclass(frozen=True, slots=True)
class TokenStream:
    """Generator of one request's output tokens."""

    seed: int
    prompt_hash: int
    vocab_min: int
    vocab_max: int
    end_id: int | None = None

    @classmethod
    def for_prompt(
        cls, seed: int, prompt_ids: Sequence[int], vocab: VocabRange, end_id: int | None = None
    ) -> TokenStream:
        if not 0 <= seed < 2**64:
            raise ValueError(f"seed must fit in 64 unsigned bits, got {seed}")
        if vocab.vocab_max - vocab.vocab_min < 2:
            raise ValueError("vocabulary range must hold at least two ids")
        return cls(seed, prompt_hash(prompt_ids), vocab.vocab_min, vocab.vocab_max, end_id)

    def token(self, index: int) -> int:
        key = (
            self.seed.to_bytes(8, "little")
            + self.prompt_hash.to_bytes(8, "little")
            + index.to_bytes(8, "little")
        )
        span = self.vocab_max - self.vocab_min
        tok = self.vocab_min + xxhash.xxh3_64_intdigest(key) % span
        if tok == self.end_id:
            tok = self.vocab_min + (tok - self.vocab_min + 1) % span
        return int(tok)


def prompt_hash(prompt_ids: Sequence[int]) -> int:
    return int(xxhash.xxh3_64_intdigest(np.asarray(prompt_ids, dtype="<u4").tobytes()))


def expected_output_ids(
    seed: int,
    prompt_ids: Sequence[int],
    n: int,
    settings: VocabRange,
    end_id: int | None = None,
) -> list[int]:
    """The `n` tokens the emulator generates for `prompt_ids` with `seed` (0 when unset)."""
    stream = TokenStream.for_prompt(seed, prompt_ids, settings, end_id)
    return [stream.token(i) for i in range(n)]
