from __future__ import annotations

import math
from collections.abc import Sequence
from typing import ClassVar

from pydantic import Field

from llmmesh.accelerators import DEFAULT_PROFILE, decode_shape, get_profile, prefill_shape
from services.orchestrator.scheduling.contracts import PluginParams, ReplicaView, RequestView


class Params(PluginParams):
    cost_profile: str = Field(
        default=DEFAULT_PROFILE, description="Engine cost profile (model + GPU)."
    )
    ttft_slo_ms: float = Field(
        default=1000.0, gt=0, description="Predicted TTFT at which the score reaches 0."
    )
    max_batch: int = Field(
        default=64, gt=0, description="Engine batch size assumed when it reports none."
    )
    block_size: int = Field(
        default=32, gt=0, description="Tokens per KV block (LLMMESH_KV_BLOCK_SIZE)."
    )
    mean_context_tokens: int = Field(
        default=2048, gt=0, description="Context assumed for running sequences."
    )


class EstimatedWaitScorer:
    """Predicted time to first token from the replica's queue and the engine cost model."""

    TYPE: ClassVar[str] = "estimated-wait-scorer"

    def __init__(self, params: Params):
        self.params = params
        self._profile = get_profile(params.cost_profile)

    def predicted_ttft_s(self, request: RequestView, r: ReplicaView) -> float:
        p = self.params
        cached = min(
            request.prefix_blocks.get(r.id, 0) * p.block_size, max(request.prompt_tokens - 1, 0)
        )
        own = self._profile.step_time_s(prefill_shape(request.prompt_tokens - cached, cached))
        running = r.engine_active if r.engine_active is not None else float(r.in_flight)
        waiting = (
            r.engine_waiting
            if r.engine_waiting is not None
            else max(0.0, r.in_flight - p.max_batch)
        )
        # Requests queued ahead each need a prefill of a typical prompt; while the batch is full,
        # each admission waits for a sequence to finish, paced by decode steps.
        ahead = self._profile.step_time_s(prefill_shape(request.prompt_tokens, 0)) * waiting
        batch = max(1, min(math.ceil(running), p.max_batch))
        decode_step = self._profile.step_time_s(
            decode_shape(p.mean_context_tokens) + decode_shape(p.mean_context_tokens * (batch - 1))
        )
        return own + ahead + (decode_step if running >= p.max_batch else 0.0)

    def score(self, request: RequestView, replicas: Sequence[ReplicaView]) -> Sequence[float]:
        slo = self.params.ttft_slo_ms / 1000.0
        return [1.0 - min(1.0, self.predicted_ttft_s(request, r) / slo) for r in replicas]
