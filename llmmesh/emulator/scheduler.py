"""Iteration-level (in-flight batching) scheduler over the paged KV cache.

One `step()` is one engine iteration:

1. admit waiting requests first-come-first-served while the batch has room (`max_batch_size`), the
   iteration's token budget (`max_num_tokens`) allows the prompt, and the KV cache can reserve the
   whole sequence; the first request that does not fit blocks the ones behind it (FCFS);
2. run prefill for the newly admitted requests (producing their first token) and one decode token
   for every request that was already running;
3. retire finished requests (their blocks stay cached for reuse).

`cancel()` takes effect immediately (slot and blocks are freed at once). A request that could never
run (longer than the whole cache, or than `max_num_tokens` without chunked context) is rejected by
`submit()` with `RequestRejectedError`. The scheduler is pure and single-threaded: time comes in as
an argument and the modelled duration of the step goes out in `StepResult.duration_s`.
"""

from __future__ import annotations

from dataclasses import dataclass

from llmmesh.accelerators import CostProfile, StepShape, decode_shape, prefill_shape
from llmmesh.emulator.events import KvEvent
from llmmesh.emulator.kv_cache import PagedKvCache, SequenceBlocks
from llmmesh.emulator.tokens import TokenStream, VocabRange
from llmmesh.triton.inflight import RequestQueues
from llmmesh.triton.inflight import RequestRejectedError as RequestRejectedError
from llmmesh.triton.trtllm_io import EngineMetrics as EngineMetrics
from llmmesh.triton.trtllm_io import RequestTimes as RequestTimes


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    request_id: str
    prompt_ids: tuple[int, ...]
    max_new_tokens: int
    seed: int = 0
    end_id: int | None = None


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    max_batch_size: int
    max_num_tokens: int


@dataclass(frozen=True, slots=True)
class TokenOutput:
    request_id: str
    index: int
    token_id: int
    finished: bool
    blocks: SequenceBlocks
    times: RequestTimes


@dataclass(frozen=True, slots=True)
class StepResult:
    outputs: list[TokenOutput]
    events: list[KvEvent]
    duration_s: float
    num_context: int
    num_generation: int
    shape: StepShape

    @property
    def num_scheduled(self) -> int:
        return self.num_context + self.num_generation


@dataclass(frozen=True, slots=True)
class DecodeRun:
    """What `Scheduler.decode_steps` did: per-iteration durations (modelled seconds), the time
    its last token was produced, the sequences that finished in its last iteration, KV events."""

    durations_s: list[float]
    end_ns: int
    finished: list[TokenOutput]
    events: list[KvEvent]


@dataclass(slots=True)
class _Running:
    req: GenerationRequest
    tokens: TokenStream
    arrival_ns: int
    first_scheduled_ns: int = 0
    first_token_ns: int = 0
    last_token_ns: int = 0
    generated: int = 0
    context_tokens: int = 0
    # The prompt's reusable block hashes, computed the first time it heads the queue: a long
    # prompt that waits there for a batch slot or KV is not re-hashed on every step.
    prompt_hashes: list[int] | None = None


class Scheduler(RequestQueues[_Running]):
    def __init__(
        self,
        config: SchedulerConfig,
        cache: PagedKvCache,
        cost: CostProfile,
        vocab: VocabRange,
        *,
        time_scale: float = 1.0,
    ) -> None:
        """`time_scale` only affects the token timestamps (modelled duration * time_scale)."""
        super().__init__()
        self.config = config
        self.time_scale = time_scale
        self.cache = cache
        self.cost = cost
        self.vocab = vocab
        self._last_scheduled = 0
        self._last_context = 0
        # After `step()`: its queue head (if any) fits no iteration until a running sequence
        # finishes (a full batch, a KV cache without room for it, or more new tokens than an
        # iteration of the running sequences leaves); False when the next iteration admits it
        # (only this iteration's other admissions used the token budget it needs). KV room can
        # also grow when a decoded block is found already stored (identical sequences): then
        # the head is admitted at the next finish instead.
        self.head_waits_for_finish = False

    # ----------------------------------------------------------------- requests
    def validate(self, req: GenerationRequest) -> None:
        """Raise `RequestRejectedError` unless the request could run on an idle engine."""
        n = len(req.prompt_ids)
        self._check_lengths(n, req.max_new_tokens)
        if n > self.config.max_num_tokens:
            raise RequestRejectedError(
                f"prompt of {n} tokens exceeds max_num_tokens={self.config.max_num_tokens} "
                "(chunked context is not enabled)"
            )
        need = self.cache.blocks_for_tokens(n + req.max_new_tokens)
        if need > self.cache.num_blocks:
            raise RequestRejectedError(
                f"prompt ({n}) + request_output_len ({req.max_new_tokens}) tokens need {need} KV "
                f"blocks of {self.cache.block_size} tokens, the cache holds {self.cache.num_blocks}"
            )
        self._check_not_in_flight(req.request_id)

    def submit(self, req: GenerationRequest, now_ns: int = 0) -> None:
        self.validate(req)
        tokens = TokenStream.for_prompt(req.seed, req.prompt_ids, self.vocab, req.end_id)
        self._waiting[req.request_id] = _Running(req, tokens, arrival_ns=now_ns)

    def _release(self, request_id: str) -> None:
        self.cache.release(request_id)

    # ----------------------------------------------------------------- iteration
    def step(self, now_ns: int = 0) -> StepResult:
        shape = StepShape()
        outputs: list[TokenOutput] = []
        # Decode for sequences that were running before this step.
        decoding = list(self._running.values())
        for r in decoding:
            shape = shape + decode_shape(r.context_tokens)
        budget = self.config.max_num_tokens - len(decoding)
        # Admission + prefill, FCFS.
        admitted: list[_Running] = []
        waits = False
        while self._waiting:
            if len(self._running) >= self.config.max_batch_size:
                waits = True
                break
            rid, r = next(iter(self._waiting.items()))
            if r.prompt_hashes is None:
                r.prompt_hashes = self.cache.prompt_hashes(r.req.prompt_ids)
            hashes = r.prompt_hashes
            cached = len(self.cache.match_prefix(r.req.prompt_ids, hashes)) * self.cache.block_size
            new_tokens = len(r.req.prompt_ids) - cached
            if new_tokens > budget:
                # The next iteration's budget: every running sequence decodes, nothing else.
                waits = new_tokens > self.config.max_num_tokens - len(self._running)
                break
            blocks = self.cache.try_admit(rid, r.req.prompt_ids, r.req.max_new_tokens, hashes)
            if blocks is None:
                waits = True
                break
            del self._waiting[rid]
            self._running[rid] = r
            budget -= new_tokens
            r.first_scheduled_ns = now_ns
            r.context_tokens = len(r.req.prompt_ids)
            shape = shape + prefill_shape(new_tokens, blocks.reused_blocks * self.cache.block_size)
            admitted.append(r)
        self.head_waits_for_finish = waits
        duration = self.cost.step_time_s(shape)
        done_ns = now_ns + int(duration * self.time_scale * 1e9)
        for r in decoding + admitted:
            outputs.append(self._emit(r, done_ns))
        self._last_scheduled = len(decoding) + len(admitted)
        self._last_context = len(admitted)
        return StepResult(
            outputs=outputs,
            events=self.cache.drain_events(),
            duration_s=duration,
            num_context=len(admitted),
            num_generation=len(decoding),
            shape=shape,
        )

    def decode_durations(self, steps: int) -> list[float]:
        """Modelled durations of the next `steps` iterations if they admit nothing (every running
        sequence decodes one token per iteration). Pure: changes nothing."""
        shape = StepShape()
        for r in self._running.values():
            shape = shape + decode_shape(r.context_tokens)
        n = shape.new_tokens
        durations: list[float] = self.cost.step_times_s(shape, StepShape(0, n, n), steps).tolist()
        return durations

    def decode_steps(self, steps: int, now_ns: int = 0) -> DecodeRun:
        """`steps` iterations that admit nothing, at once: the same tokens, KV blocks, events and
        timestamps as `steps` calls of `step()` while no waiting request can be admitted (the
        queue is empty, or its head does not fit until a running sequence finishes). No running
        sequence may finish before the last of them (`steps <= decode_horizon()`)."""
        if not 0 < steps <= self.decode_horizon():
            raise ValueError(f"steps must be in [1, {self.decode_horizon()}], got {steps}")
        durations = self.decode_durations(steps)
        t_ns = now_ns
        for d in durations:
            t_ns += int(d * self.time_scale * 1e9)
        finished: list[TokenOutput] = []
        for r in list(self._running.values()):
            rid = r.req.request_id
            tokens = [r.tokens.next() for _ in range(steps)]
            r.generated += steps
            r.context_tokens += steps
            r.last_token_ns = t_ns
            self.cache.append_tokens(rid, tokens)
            if r.generated >= r.req.max_new_tokens:
                blocks = self.cache.sequence_blocks(rid)
                del self._running[rid]
                self.cache.release(rid)
                times = RequestTimes(r.arrival_ns, r.first_scheduled_ns, r.first_token_ns, t_ns)
                finished.append(TokenOutput(rid, r.generated - 1, tokens[-1], True, blocks, times))
        self._last_scheduled = len(self._running) + len(finished)
        self._last_context = 0
        return DecodeRun(durations, t_ns, finished, self.cache.drain_events())

    def decode_horizon(self) -> int:
        """Iterations until the first running sequence finishes (0 when none runs)."""
        return min((r.req.max_new_tokens - r.generated for r in self._running.values()), default=0)

    def _emit(self, r: _Running, t_ns: int) -> TokenOutput:
        rid = r.req.request_id
        tok = r.tokens.next()
        index = r.generated
        r.generated += 1
        finished = r.generated >= r.req.max_new_tokens
        if r.first_token_ns == 0:
            r.first_token_ns = t_ns
        r.last_token_ns = t_ns
        # The sampled token joins the sequence (its KV is written when it is next fed back).
        self.cache.append_token(rid, tok)
        r.context_tokens += 1
        blocks = self.cache.sequence_blocks(rid)
        if finished:
            del self._running[rid]
            self.cache.release(rid)
        return TokenOutput(
            request_id=rid,
            index=index,
            token_id=tok,
            finished=finished,
            blocks=blocks,
            times=RequestTimes(r.arrival_ns, r.first_scheduled_ns, r.first_token_ns, t_ns),
        )

    def metrics(self) -> EngineMetrics:
        idle = not self.has_work
        return EngineMetrics(
            active=len(self._running),
            max_active=self.config.max_batch_size,
            scheduled=0 if idle else self._last_scheduled,
            context=0 if idle else self._last_context,
            waiting=len(self._waiting),
            kv_max_blocks=self.cache.num_blocks,
            kv_free_blocks=self.cache.num_free,
            kv_used_blocks=self.cache.num_used,
            kv_tokens_per_block=self.cache.block_size,
            kv_reused_blocks=self.cache.reused_blocks_total,
        )
