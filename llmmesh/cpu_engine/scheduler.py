"""Iteration-level (in-flight) batching over a `BatchModel`, independent of torch models.

One `step()` is one engine iteration:

1. decode: one batched forward for every running sequence (each feeds the token it produced in the
   previous iteration) and one sampled token per sequence;
2. admission + prefill, first-come-first-served: waiting requests join while the batch has room
   (`max_batch_size`), the iteration's prefill budget (`max_prefill_tokens`) holds their prompt,
   and the padded KV reservation stays within `kv_token_budget`; the first request that does not
   fit blocks the ones behind it. Each newcomer is prefilled on its own (no padding in prefill)
   and produces its first token; from the next iteration on it decodes with the batch.
3. sequences that reached `request_output_len` or produced `end_id` leave the batch at once.

KV reservation (the `guaranteed_no_evict` analogue): the model keeps every sequence left-padded to
the longest one, so a batch of n sequences can grow to n x max(prompt + request_output_len) cache
rows; admission keeps that product within the budget, so running sequences never need evicting.

`cancel()` frees the slot at once. Single-threaded: the engine thread owns the scheduler.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from llmmesh.cpu_engine.sampling import Sampler, SamplingParams, token_logprob
from llmmesh.triton.inflight import RequestQueues
from llmmesh.triton.inflight import RequestRejectedError as RequestRejectedError
from llmmesh.triton.trtllm_io import EngineMetrics
from llmmesh.triton.trtllm_io import RequestTimes as RequestTimes

log = logging.getLogger(__name__)


class BatchModel(Protocol):
    """A causal LM holding the KV state of the sequences it was given (keyed by sequence id)."""

    def prefill(self, seq_id: str, prompt_ids: Sequence[int]) -> torch.Tensor:
        """Run the prompt of a new sequence; returns the next-token logits, shape [vocab]."""
        ...

    def decode(self, seq_ids: Sequence[str], tokens: Sequence[int]) -> torch.Tensor:
        """Feed one token to each listed sequence in one batched forward; returns the
        next-token logits, shape [len(seq_ids), vocab], in the order of `seq_ids`."""
        ...

    def remove(self, seq_id: str) -> None:
        """Forget a sequence (finished or cancelled); unknown ids are ignored."""
        ...


@dataclass(frozen=True, slots=True)
class CpuRequest:
    request_id: str
    prompt_ids: tuple[int, ...]
    max_new_tokens: int
    end_id: int | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    return_log_probs: bool = False

    @property
    def reserved_tokens(self) -> int:
        return len(self.prompt_ids) + self.max_new_tokens


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    max_batch_size: int
    max_seq_len: int
    max_prefill_tokens: int
    kv_token_budget: int
    kv_block_tokens: int  # unit of the KV gauges


@dataclass(frozen=True, slots=True)
class TokenOutput:
    request_id: str
    index: int  # 0 for the request's first output, then +1 per output
    token_id: int | None  # None: the sequence produced end_id, which is not returned
    finished: bool
    log_prob: float | None
    reserved_tokens: int
    times: RequestTimes


@dataclass(frozen=True, slots=True)
class StepResult:
    outputs: list[TokenOutput]
    failed: list[tuple[str, str]]  # (request id, message): the model raised for these
    num_context: int
    num_generation: int


@dataclass(slots=True)
class _Sequence:
    req: CpuRequest
    sampler: Sampler
    arrival_ns: int
    first_scheduled_ns: int = 0
    first_token_ns: int = 0
    generated: int = 0
    last_token: int = -1


class BatchScheduler(RequestQueues[_Sequence]):
    def __init__(
        self,
        config: SchedulerConfig,
        model: BatchModel,
        *,
        clock_ns: Callable[[], int] = time.monotonic_ns,
    ) -> None:
        super().__init__()
        self.config = config
        self._model = model
        self._clock_ns = clock_ns
        self._last_scheduled = 0
        self._last_context = 0

    # ----------------------------------------------------------------- requests
    def validate(self, req: CpuRequest) -> None:
        """Raise `RequestRejectedError` unless the request could run on an idle engine."""
        c = self.config
        n = len(req.prompt_ids)
        self._check_lengths(n, req.max_new_tokens)
        if n > c.max_prefill_tokens:
            raise RequestRejectedError(
                f"prompt of {n} tokens exceeds max_prefill_tokens={c.max_prefill_tokens}"
            )
        if req.reserved_tokens > c.max_seq_len:
            raise RequestRejectedError(
                f"prompt ({n}) + request_output_len ({req.max_new_tokens}) exceeds "
                f"max_seq_len={c.max_seq_len}"
            )
        if req.reserved_tokens > c.kv_token_budget:
            raise RequestRejectedError(
                f"prompt + request_output_len ({req.reserved_tokens} tokens) exceeds "
                f"kv_token_budget={c.kv_token_budget}"
            )
        self._check_not_in_flight(req.request_id)

    def submit(self, req: CpuRequest, now_ns: int | None = None) -> None:
        """Queue a validated request (the caller bounds the queue)."""
        self.validate(req)
        arrival = self._clock_ns() if now_ns is None else now_ns
        self._waiting[req.request_id] = _Sequence(req, Sampler(req.sampling), arrival)

    def _release(self, request_id: str) -> None:
        self._model.remove(request_id)

    def reserved_tokens(self) -> int:
        """KV rows the running batch may grow to (padded to its longest sequence)."""
        return self._padded_peak(None)

    def _padded_peak(self, newcomer: CpuRequest | None) -> int:
        sizes = [s.req.reserved_tokens for s in self._running.values()]
        if newcomer is not None:
            sizes.append(newcomer.reserved_tokens)
        return len(sizes) * max(sizes, default=0)

    def _fits(self, req: CpuRequest) -> bool:
        if len(self._running) >= self.config.max_batch_size:
            return False
        return self._padded_peak(req) <= self.config.kv_token_budget

    # ----------------------------------------------------------------- iteration
    def step(self) -> StepResult:
        outputs: list[TokenOutput] = []
        failed: list[tuple[str, str]] = []
        decoding = list(self._running.values())
        if decoding:
            try:
                logits = self._model.decode(
                    [s.req.request_id for s in decoding], [s.last_token for s in decoding]
                )
            except Exception as exc:
                log.exception("batched decode of %d sequences failed", len(decoding))
                for s in decoding:
                    self.cancel(s.req.request_id)
                    failed.append((s.req.request_id, f"decode failed: {exc}"))
                decoding = []
            else:
                now = self._clock_ns()
                for i, s in enumerate(decoding):
                    self._advance(s, logits[i], now, outputs, failed)
        budget = self.config.max_prefill_tokens
        admitted = 0
        while self._waiting:
            rid, s = next(iter(self._waiting.items()))
            n = len(s.req.prompt_ids)
            if n > budget or not self._fits(s.req):
                break
            del self._waiting[rid]
            budget -= n
            s.first_scheduled_ns = self._clock_ns()
            try:
                first = self._model.prefill(rid, s.req.prompt_ids)
            except Exception as exc:
                log.exception("prefill of request %s failed", rid)
                self._model.remove(rid)
                failed.append((rid, f"prefill failed: {exc}"))
                continue
            admitted += 1
            self._running[rid] = s
            self._advance(s, first, self._clock_ns(), outputs, failed)
        self._last_scheduled = len(decoding) + admitted
        self._last_context = admitted
        return StepResult(outputs, failed, admitted, len(decoding))

    def _advance(
        self,
        s: _Sequence,
        logits: torch.Tensor,
        now_ns: int,
        outputs: list[TokenOutput],
        failed: list[tuple[str, str]],
    ) -> None:
        """Sample the sequence's next token into `outputs` (or its failure into `failed`)."""
        req = s.req
        try:
            token = s.sampler.choose(logits)
        except Exception as exc:  # e.g. non-finite logits
            log.exception("sampling for request %s failed", req.request_id)
            self.cancel(req.request_id)
            failed.append((req.request_id, f"sampling failed: {exc}"))
            return
        index = s.generated
        s.generated += 1
        if s.first_token_ns == 0:
            s.first_token_ns = now_ns
        ended = req.end_id is not None and token == req.end_id
        finished = ended or s.generated >= req.max_new_tokens
        if finished:
            del self._running[req.request_id]
            self._model.remove(req.request_id)
        else:
            s.last_token = token
        outputs.append(
            TokenOutput(
                request_id=req.request_id,
                index=index,
                token_id=None if ended else token,
                finished=finished,
                log_prob=token_logprob(logits, token)
                if req.return_log_probs and not ended
                else None,
                reserved_tokens=req.reserved_tokens,
                times=RequestTimes(s.arrival_ns, s.first_scheduled_ns, s.first_token_ns, now_ns),
            )
        )

    def metrics(self, extra_waiting: int = 0) -> EngineMetrics:
        """The TensorRT-LLM gauges; KV in blocks of `kv_block_tokens` tokens of the budget."""
        c = self.config
        idle = not self.has_work
        kv_max = c.kv_token_budget // c.kv_block_tokens
        used = min(kv_max, math.ceil(self.reserved_tokens() / c.kv_block_tokens))
        return EngineMetrics(
            active=len(self._running),
            max_active=c.max_batch_size,
            scheduled=0 if idle else self._last_scheduled,
            context=0 if idle else self._last_context,
            waiting=len(self._waiting) + extra_waiting,
            kv_max_blocks=kv_max,
            kv_free_blocks=kv_max - used,
            kv_used_blocks=used,
            kv_tokens_per_block=c.kv_block_tokens,
            kv_reused_blocks=0,
        )
