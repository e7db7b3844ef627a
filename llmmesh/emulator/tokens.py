"""Deterministic output tokens that behave like an autoregressive model's.

Each token is a pure function of (seed, the whole context so far: the prompt plus every token
generated before it), as a greedy real model's next token is a function of its context:

    token(seed, ctx) = vocab_min + xxh3_64(le32(ctx[0]) || ... || le32(ctx[-1]), seed)
                       mod (vocab_max - vocab_min)

and a token equal to `end_id` is replaced by the next id in the range, so generation never stops
early and the output length always equals `request_output_len` (like Dynamo's mocker engine).
The generated token joins the context of the next one.

So a request continued elsewhere with the prompt plus the tokens generated so far as its new
prompt produces exactly the rest of the uninterrupted stream (the gateway's request migration
relies on this, and tests check it): `expected_output_ids(seed, prompt + out[:k], n - k) ==
out[k:]`. A `TokenStream` keeps a rolling xxh3 state over the context, so each token costs O(1)
whatever the context length (the digest of a streaming xxh3 state does not rehash the input).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np
import xxhash


class VocabRange(Protocol):
    """Anything with the vocabulary bounds, e.g. `EmulatorSettings`."""

    @property
    def vocab_min(self) -> int: ...

    @property
    def vocab_max(self) -> int: ...


def _context_bytes(ids: Sequence[int]) -> bytes:
    return np.asarray(ids, dtype="<u4").tobytes()


class TokenStream:
    """One request's output tokens: `next()` returns the token for the context so far and
    appends it to the context."""

    __slots__ = ("_end_id", "_span", "_state", "_vocab_min")

    def __init__(
        self,
        seed: int,
        prompt_ids: Sequence[int],
        vocab_min: int,
        vocab_max: int,
        end_id: int | None = None,
    ) -> None:
        if not 0 <= seed < 2**64:
            raise ValueError(f"seed must fit in 64 unsigned bits, got {seed}")
        if vocab_max - vocab_min < 2:
            raise ValueError("vocabulary range must hold at least two ids")
        self._vocab_min = vocab_min
        self._span = vocab_max - vocab_min
        self._end_id = end_id
        self._state = xxhash.xxh3_64(_context_bytes(prompt_ids), seed=seed)

    @classmethod
    def for_prompt(
        cls, seed: int, prompt_ids: Sequence[int], vocab: VocabRange, end_id: int | None = None
    ) -> TokenStream:
        return cls(seed, prompt_ids, vocab.vocab_min, vocab.vocab_max, end_id)

    def next(self) -> int:
        span = self._span
        tok = self._vocab_min + self._state.intdigest() % span
        if tok == self._end_id:
            tok = self._vocab_min + (tok - self._vocab_min + 1) % span
        self._state.update(tok.to_bytes(4, "little"))
        return tok


def next_token(
    seed: int, context: Sequence[int], vocab: VocabRange, end_id: int | None = None
) -> int:
    """The token the emulator generates after `context` (prompt plus tokens generated so far),
    computed from scratch: what `TokenStream.next` computes incrementally."""
    return TokenStream.for_prompt(seed, context, vocab, end_id).next()


def expected_output_ids(
    seed: int,
    prompt_ids: Sequence[int],
    n: int,
    settings: VocabRange,
    end_id: int | None = None,
) -> list[int]:
    """The `n` tokens the emulator generates for `prompt_ids` with `seed` (0 when unset)."""
    stream = TokenStream.for_prompt(seed, prompt_ids, settings, end_id)
    return [stream.next() for _ in range(n)]
