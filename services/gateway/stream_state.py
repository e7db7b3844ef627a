"""Per-request streaming state: engine chunks in, `Delta`s and one `Completion` out.

`StreamState` owns what a generation accumulates across its attempts (a request migrated to
another replica continues the same state): incremental detokenization, stop-string matching,
the completion token ids and count and its max_tokens bound, first-token and inter-token timing,
the engine's reused-KV-block report, tenant completion charges, and the request's usage
`Progress`. Per attempt (`begin_attempt` .. `end_attempt`) it also keeps what that attempt's
lease report needs: its prompt (the original prompt plus the tokens generated before it), its
completion tokens, reused KV blocks and first-token time.

Usage counts each token once: `completion_tokens` is the request's total; the prompt is the
original one; `cached_prompt_tokens` is what the attempt that prefilled the original prompt
reported (a continuation's reuse of its longer prompt only goes into its lease report).

It is on the per-token path: per chunk, `push` allocates only the `Delta` it returns, the text
pieces, and a token list only when the chunk is cut (end id, max_tokens); metric label children
are resolved once per attempt (`serve_on`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from llmmesh.common.topology import ReplicaAddress
from llmmesh.kvblocks import token_bytes, tokens_from_bytes
from services.gateway.admission import LeaseReport, Outcome
from services.gateway.events import Completion, Delta, FinishReason
from services.gateway.limits import TenantLimits
from services.gateway.metrics import StreamMetrics
from services.gateway.models import IncrementalDecoder, ServedModel
from services.gateway.triton_stream import EngineChunk

__all__ = ["Progress", "StopMatcher", "StreamState"]


@dataclass(slots=True)
class Progress:
    """What a generation got to, for its usage record whatever way it ends (kept current after
    every delta: a request closed mid-stream is accounted before its stream is finalized)."""

    tenant: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0
    first_token_s: float | None = None
    replica: str = ""
    # Of `completion_tokens`, those (and the prompt) a record of an earlier gateway billed: a
    # continuation's takeover (resume_redis.py); None when no record billed any.
    billed: int | None = None
    # A takeover that has not restored the earlier gateways' tokens yet: its record bills
    # nothing (they carry on to the next gateway's).
    unbilled: bool = False


class StopMatcher:
    """Holds back just enough text that a stop string split across deltas is still caught."""

    __slots__ = ("_hold", "_pending", "_stops")

    def __init__(self, stops: tuple[str, ...]):
        self._stops = stops
        self._hold = max((len(s) for s in stops), default=1) - 1
        self._pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Text safe to emit now, and whether a stop string was reached."""
        if not self._stops:  # nothing is ever held back
            return text, False
        self._pending += text
        if self._stops:
            cut = min(
                (i for i in (self._pending.find(s) for s in self._stops) if i >= 0), default=-1
            )
            if cut >= 0:
                out, self._pending = self._pending[:cut], ""
                return out, True
        if self._hold and len(self._pending) > self._hold:
            out, self._pending = self._pending[: -self._hold], self._pending[-self._hold :]
            return out, False
        if self._hold:
            return "", False
        out, self._pending = self._pending, ""
        return out, False

    def flush(self) -> str:
        out, self._pending = self._pending, ""
        return out


class StreamState:
    """One generation's state (module docstring). Invariants: `completion_tokens` never exceeds
    `max_tokens` and equals `len(generated)`; once `finish` is set no further chunk is pushed;
    the last delta carries all the text still held back, except at a stop string, where the
    text ends before it."""

    __slots__ = (
        "_attempt_cached",
        "_attempt_first_at",
        "_attempt_start",
        "_attempt_tokens0",
        "_block_size",
        "_continuing",
        "_decoder",
        "_end_ids",
        "_itl_sum",
        "_last_at",
        "_limits",
        "_max_tokens",
        "_metrics",
        "_model_name",
        "_progress",
        "_prompt_le32",
        "_restored",
        "_start",
        "_stops",
        "cached_blocks",
        "completion_tokens",
        "finish",
        "first_at",
        "generated",
        "prompt_tokens",
    )

    def __init__(
        self,
        model: ServedModel,
        *,
        prompt_tokens: int,
        max_tokens: int,
        stop: tuple[str, ...],
        block_size: int,
        start: float,
        progress: Progress,
        limits: TenantLimits | None,
        context: Sequence[int] = (),
    ) -> None:
        """`context`: the prompt's ids, the completion's text is decoded after (`IncrementalDecoder`);
        packed once here (`kvblocks.token_bytes`) as every attempt's input begins."""
        self._model_name = model.name
        self._end_ids = model.end_ids
        self._max_tokens = max_tokens
        self._block_size = block_size
        self._start = start  # perf_counter() when the request arrived
        self._progress = progress
        self._limits = limits
        self._decoder = IncrementalDecoder(model, context)
        self._prompt_le32 = token_bytes(context)
        self._stops = StopMatcher(stop)
        self._last_at = start
        self._itl_sum = 0.0
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = 0
        self.cached_blocks = 0  # KV blocks the engine reported reused for the prompt
        self.first_at: float | None = None
        self.finish: FinishReason | None = None
        self.generated: list[int] = []  # every completion token id so far, in order
        # Tokens another gateway generated and timed (`restore`): no first token, gap or
        # TTFT of theirs is known here.
        self._restored = 0
        self.begin_attempt(start)

    # -- attempts ---------------------------------------------------------------------------
    def begin_attempt(self, start: float) -> None:
        """A new attempt starts (perf_counter() `start`); the first one begins at construction."""
        self._attempt_start = start
        self._attempt_tokens0 = self.completion_tokens
        self._attempt_cached = 0
        self._attempt_first_at: float | None = None
        # A continuation's prompt is the original plus what was generated: its KV reuse is
        # not the original prompt's.
        self._continuing = self.completion_tokens > 0

    def restore(self, prior: Sequence[Delta]) -> None:
        """Continue a generation another gateway began (resume_redis.py takeover): its deltas,
        pushed as the chunks they came from, so the detokenizer and stop matcher hold what the
        original held; nothing is charged, timed or counted in metrics again (that gateway did
        as it streamed), and the next attempt is a continuation. The usage record counts them
        less what an earlier gateway's record billed (`Progress.billed`)."""
        for d in prior:
            if d.token_ids:
                self.generated.extend(d.token_ids)
                self.completion_tokens += len(d.token_ids)
                self._stops.feed(self._decoder.push(d.token_ids))  # text already sent
            if d.finish_reason is not None:
                self.finish = d.finish_reason
        self._progress.completion_tokens = self.completion_tokens
        self._restored = self.completion_tokens
        self.begin_attempt(self._attempt_start)

    def serve_on(self, replica: ReplicaAddress) -> None:
        """The current attempt's replica (the usage record names the last one; its tokens are
        timed and counted under its pool, its prompt now): called before the attempt's first
        `push`."""
        self._progress.replica = replica.id
        limits = self._limits
        self._metrics = StreamMetrics(
            self._model_name, replica.pool, None if limits is None else limits.tenant
        )
        self._metrics.prompt(self.prompt_tokens + self._attempt_tokens0)

    @property
    def remaining(self) -> int:
        """Completion tokens still allowed (the continuation's max_tokens)."""
        return self._max_tokens - self.completion_tokens

    def continuation(self) -> Sequence[int]:
        """The next attempt's input: the prompt plus every token generated so far, as a uint32
        view of their packed bytes (`kvblocks.tokens_from_bytes`): the Admit's hashing and the
        engine request take the bytes as they are, no conversion of a long prompt per use."""
        body = self._prompt_le32
        if self.generated:
            body += token_bytes(self.generated)
        return tokens_from_bytes(body)

    def push(self, chunk: EngineChunk) -> Delta | None:
        """The delta for one engine chunk (None when it brings no token). Sets `finish` at an
        end id (`ServedModel.end_ids`), a stop string or max_tokens."""
        if chunk.kv_cache_reused_blocks is not None:
            self._attempt_cached = chunk.kv_cache_reused_blocks
            if not self._continuing:
                self.cached_blocks = chunk.kv_cache_reused_blocks
        ids = chunk.token_ids
        end_ids = self._end_ids
        ended = not end_ids.isdisjoint(ids)
        if ended:
            ids = ids[: next(i for i, t in enumerate(ids) if t in end_ids)]
        offset = self.completion_tokens
        if len(ids) > self._max_tokens - offset:
            ids = ids[: self._max_tokens - offset]
            ended = False  # the end id came after max_tokens: the length ended it
        if ended:
            self.finish = FinishReason.STOP
        n = len(ids)
        if not n:
            if self.finish is None:
                return None
            # The end id came without text: a delta with the text still held back, if any,
            # carries the finish (a takeover reads it from the deltas: resume_redis.py).
            tail = self._stops.feed(self._decoder.flush())[0] + self._stops.flush()
            return Delta(tail, [], offset, self.finish)
        if self._limits is not None:
            self._limits.charge(n)
            self._metrics.tenant_completion(n)
        now = time.perf_counter()
        if self._attempt_first_at is None:
            self._attempt_first_at = now
        if self.first_at is None:
            self.first_at = now
            if not self._restored:  # a continuation's first token here is no TTFT
                self._progress.first_token_s = now
                self._metrics.observe_ttft(now - self._start)
        else:
            elapsed = now - self._last_at
            observe_itl = self._metrics.observe_itl
            if n == 1:
                observe_itl(elapsed)
            else:
                gap = elapsed / n
                for _ in ids:
                    observe_itl(gap)
            self._itl_sum += elapsed
        self._last_at = now
        self.completion_tokens = self._progress.completion_tokens = offset + n
        self.generated.extend(ids)
        stops = self._stops
        text, stopped = stops.feed(self._decoder.push(ids))
        if stopped:
            self.finish = FinishReason.STOP
        elif self.finish is None and self.completion_tokens >= self._max_tokens:
            self.finish = FinishReason.LENGTH
        if self.finish is not None and not stopped:
            # The decoder's last characters may complete a stop string: then the stop ends it.
            tail, stopped = stops.feed(self._decoder.flush())
            text += tail + stops.flush()
            if stopped:
                self.finish = FinishReason.STOP
        return Delta(text, ids, offset, self.finish)

    def end(self) -> Delta | None:
        """The stream ended without a finish: finish STOP, in a delta with the text still held
        back, if any (None when a finish was already set). Every finished stream's last delta
        carries its finish: a takeover reads it from the deltas (resume_redis.py)."""
        if self.finish is not None:
            return None
        self.finish = FinishReason.STOP
        tail = self._stops.feed(self._decoder.flush())[0] + self._stops.flush()
        return Delta(tail, [], self.completion_tokens, self.finish)

    @property
    def ttft_ms(self) -> float | None:
        """None when no token came, or the first came through another gateway (`restore`)."""
        if self.first_at is None or self._restored:
            return None
        return (self.first_at - self._start) * 1000

    @property
    def cached_prompt_tokens(self) -> int:
        return min(self.cached_blocks * self._block_size, self.prompt_tokens)

    def report(self, lease_id: str, outcome: Outcome, error: str) -> LeaseReport:
        """The current attempt's lease report: its own prompt (with the tokens generated
        before it), completion tokens, reused blocks and first-token time."""
        first = self._attempt_first_at
        return LeaseReport(
            lease_id=lease_id,
            outcome=outcome,
            prompt_tokens=self.prompt_tokens + self._attempt_tokens0,
            completion_tokens=self.completion_tokens - self._attempt_tokens0,
            kv_cache_reused_blocks=self._attempt_cached,
            ttft_ms=None if first is None else (first - self._attempt_start) * 1000,
            error=error,
        )

    def end_attempt(self) -> None:
        """The attempt ended (any way): count its completion tokens, settle the progress."""
        self._metrics.completion(self.completion_tokens - self._attempt_tokens0)
        self._progress.cached_prompt_tokens = self.cached_prompt_tokens

    def completion(self, queue_ms: float, replica_id: str) -> Completion:
        """The summary after a finished stream (`end` was called)."""
        assert self.finish is not None
        n = self.completion_tokens
        timed = n - self._restored  # the tokens whose gaps were timed here
        ttft_ms = self.ttft_ms
        return Completion(
            finish_reason=self.finish,
            prompt_tokens=self.prompt_tokens,
            completion_tokens=n,
            cached_prompt_tokens=self.cached_prompt_tokens,
            queue_ms=queue_ms,
            ttft_ms=0.0 if ttft_ms is None else ttft_ms,
            total_ms=(time.perf_counter() - self._start) * 1000,
            mean_itl_ms=self._itl_sum / (timed - 1) * 1000 if timed > 1 else 0.0,
            replica_id=replica_id,
        )
