from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from pydantic import Field

from llmmesh.accelerators import DEFAULT_PROFILE
from services.orchestrator.scheduling.contracts import (
    PluginParams,
    ReplicaLoad,
    ReplicaView,
    RequestView,
)
from services.orchestrator.scheduling.work import WorkModel

# Replicas whose last prediction is kept, at most (more: the cluster changed; start again).
_LAST_MAX = 4096


class Params(PluginParams):
    cost_profile: str = Field(
        default=DEFAULT_PROFILE, description="Engine cost profile (model + GPU)."
    )
    ttft_slo_ms: float = Field(
        default=1000.0,
        gt=0,
        description=(
            "Predicted TTFT above the best candidate's at which the score reaches 0 (the cost "
            "profile's time: stretched by the orchestrator's engine_time_scale)."
        ),
    )
    prefix_aware: bool = Field(
        default=True,
        description="Count the replica's cached prefix (false: cache-blind least work).",
    )
    max_batch: int = Field(default=64, gt=0, description="Engine batch size (sequences per step).")
    max_num_tokens: int = Field(default=8192, gt=0, description="Engine tokens per step.")
    block_size: int = Field(
        default=32, gt=0, description="Tokens per KV block (LLMMESH_KV_BLOCK_SIZE)."
    )
    mean_context_tokens: int = Field(
        default=2048,
        gt=0,
        description="Context assumed per running sequence when the replica has no load ledger.",
    )


class EstimatedWaitScorer:
    """Predicted time to first token on each replica from its live load (the orchestrator's
    ledger) and the engine work model; the fastest candidate scores 1, each second more costs
    1 / ttft_slo.

    `time_scale` (the orchestrator's engine_time_scale): wall seconds per modelled second of the
    engines. Predictions are wall seconds and the SLO is stretched alike, so a slowed emulator
    is scored as the modelled accelerator would be."""

    TYPE: ClassVar[str] = "estimated-wait-scorer"

    def __init__(self, params: Params, *, time_scale: float = 1.0):
        self.params = params
        self._work = WorkModel.named(
            params.cost_profile, params.max_num_tokens, params.max_batch, time_scale
        )
        self._slo_s = params.ttft_slo_ms / 1000.0 * time_scale
        # Per replica id: (view, prompt tokens, matched tokens, max tokens, predicted seconds).
        self._last: dict[str, tuple[ReplicaView, int, int, int, float]] = {}

    @property
    def work(self) -> WorkModel:
        """The engine work model its predictions use."""
        return self._work

    def _matched_tokens(self, request: RequestView, r: ReplicaView) -> int:
        """The prompt tokens `r` holds (the engine recomputes the last one)."""
        blocks = request.prefix_blocks.get(r.id, 0)
        return min(blocks * self.params.block_size, max(request.prompt_tokens - 1, 0))

    def _load(self, request: RequestView, r: ReplicaView) -> ReplicaLoad:
        if r.load is not None:
            return r.load
        # No ledger: running sequences from the engine gauge (or the leases), waiting ones each
        # needing a prefill the size of this prompt.
        seqs = round(r.engine_active if r.engine_active is not None else r.in_flight)
        waiting = (
            r.engine_waiting
            if r.engine_waiting is not None
            else max(0, r.in_flight - self.params.max_batch)
        )
        per = self._work.prefill_work_s(request.prompt_tokens, 0)
        return ReplicaLoad(
            prefill_tokens=round(waiting * request.prompt_tokens),
            prefill_s=waiting * per,
            decode_seqs=seqs,
            decode_tokens=seqs * self.params.mean_context_tokens,
        )

    def predicted_ttft_s(self, request: RequestView, r: ReplicaView) -> float:
        """Backlog of prefills ahead, or the wait until the request's KV reservation (uncached
        prompt + max tokens) fits, whichever is longer + own prefill (stretched by the decode
        batch) + the step it finishes in; + the wait for a batch slot when every slot is
        taken."""
        return self._predicted(request, r, self._matched_tokens(request, r))

    def _predicted(self, request: RequestView, r: ReplicaView, matched: int) -> float:
        """`matched`: the prompt tokens `r` holds (`_matched_tokens`)."""
        w = self._work
        cached = matched if self.params.prefix_aware else 0
        load = self._load(request, r)
        own = w.prefill_work_s(request.prompt_tokens - cached, cached)
        own *= w.decode_slowdown(load.decode_seqs, load.decode_tokens)
        step = w.decode_step_s(load.decode_seqs + 1, load.decode_tokens + request.prompt_tokens)
        # What the engine reserves whatever the profile weighs: a cache-blind prediction still
        # needs no KV for the blocks the replica holds (no wait where KV is not modelled).
        reserve = request.prompt_tokens - matched + max(request.max_tokens, 1)
        t = max(load.prefill_s, load.kv_wait_s(reserve)) + own + max(step, w.fixed_step_s)
        sequences = max(r.in_flight, load.decode_seqs)
        if sequences >= self.params.max_batch:
            # A slot frees when one of the batch's sequences ends: about every
            # (its output length x decode step) / batch seconds per excess sequence.
            excess = sequences + 1 - self.params.max_batch
            t += excess * step * max(request.max_tokens, 1) / self.params.max_batch
        return t

    def score(self, request: RequestView, replicas: Sequence[ReplicaView]) -> Sequence[float]:
        if not replicas:
            return []
        # A prediction is a function of the replica's view (an immutable snapshot, the same
        # object while the replica is unchanged) and of the request's prompt, matched and max
        # tokens: each replica's last one is answered again while all of those are the same.
        last = self._last
        if len(last) > _LAST_MAX:
            last.clear()
        prompt, max_tokens = request.prompt_tokens, request.max_tokens
        times = []
        for r in replicas:
            matched = self._matched_tokens(request, r)
            hit = last.get(r.id)
            if (
                hit is not None
                and hit[0] is r
                and hit[1] == prompt
                and hit[2] == matched
                and hit[3] == max_tokens
            ):
                t = hit[4]
            else:
                t = self._predicted(request, r, matched)
                last[r.id] = (r, prompt, matched, max_tokens, t)
            times.append(t)
        best = min(times)
        scale = self._slo_s
        return [1.0 - min(1.0, (t - best) / scale) for t in times]
