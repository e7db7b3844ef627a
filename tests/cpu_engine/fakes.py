"""A deterministic `BatchModel` without weights: the next token is a function of the sequence's
own history only, so any mix-up between batch rows shows up as a wrong token."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from llmmesh.cpu_engine.sampling import SamplingParams
from llmmesh.cpu_engine.scheduler import BatchScheduler, CpuRequest, SchedulerConfig, StepResult

VOCAB = 97
END_ID = 2


def next_token(history: Sequence[int]) -> int:
    """Never END_ID (or the other ids below 3) unless the history asks for it."""
    if history and history[0] == 999 and len(history) >= 4:  # prompts starting 999 end soon
        return END_ID
    return 3 + (sum(history) * 31 + len(history)) % (VOCAB - 3)


def expected(prompt: Sequence[int], n: int, end_id: int | None = END_ID) -> list[int]:
    """What a sequence generates alone: up to n tokens, stopping before end_id."""
    history = list(prompt)
    out: list[int] = []
    for _ in range(n):
        tok = next_token(history)
        if tok == end_id:
            break
        out.append(tok)
        history.append(tok)
    return out


class FakeBatchModel:
    def __init__(self) -> None:
        self.histories: dict[str, list[int]] = {}
        self.decode_calls: list[list[str]] = []
        self.prefill_calls: list[str] = []
        self.removed: list[str] = []
        self.fail_decode = False
        self.non_finite = False  # every logit NaN (a numerically broken model)

    def _logits(self, history: Sequence[int]) -> torch.Tensor:
        if self.non_finite:
            return torch.full((VOCAB,), float("nan"))
        logits = torch.zeros(VOCAB)
        logits[next_token(history)] = 10.0
        return logits

    def prefill(self, seq_id: str, prompt_ids: Sequence[int]) -> torch.Tensor:
        assert seq_id not in self.histories
        self.prefill_calls.append(seq_id)
        self.histories[seq_id] = list(prompt_ids)
        return self._logits(self.histories[seq_id])

    def decode(self, seq_ids: Sequence[str], tokens: Sequence[int]) -> torch.Tensor:
        if self.fail_decode:
            raise RuntimeError("boom")
        self.decode_calls.append(list(seq_ids))
        rows = []
        for sid, tok in zip(seq_ids, tokens, strict=True):
            self.histories[sid].append(tok)
            rows.append(self._logits(self.histories[sid]))
        return torch.stack(rows)

    def remove(self, seq_id: str) -> None:
        self.removed.append(seq_id)
        self.histories.pop(seq_id, None)


def config(
    *,
    batch: int = 8,
    max_seq_len: int = 256,
    max_prefill_tokens: int = 256,
    kv_token_budget: int = 4096,
    kv_block_tokens: int = 16,
) -> SchedulerConfig:
    return SchedulerConfig(batch, max_seq_len, max_prefill_tokens, kv_token_budget, kv_block_tokens)


def make(**kw: int) -> tuple[BatchScheduler, FakeBatchModel]:
    model = FakeBatchModel()
    clock = iter(range(1, 10**9))
    return BatchScheduler(config(**kw), model, clock_ns=lambda: next(clock)), model


def req(
    rid: str,
    prompt: Sequence[int],
    n: int,
    *,
    end_id: int | None = END_ID,
    sampling: SamplingParams | None = None,
    return_log_probs: bool = False,
) -> CpuRequest:
    return CpuRequest(rid, tuple(prompt), n, end_id, sampling or SamplingParams(), return_log_probs)


def tokens_by_request(steps: Sequence[StepResult]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for st in steps:
        for o in st.outputs:
            lst = out.setdefault(o.request_id, [])
            if o.token_id is not None:
                lst.append(o.token_id)
    return out


def run_to_completion(s: BatchScheduler, limit: int = 10_000) -> list[StepResult]:
    steps = []
    while s.has_work:
        steps.append(s.step())
        assert len(steps) < limit
    return steps
