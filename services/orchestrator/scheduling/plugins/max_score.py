from __future__ import annotations

import random
from collections.abc import Sequence
from typing import ClassVar

from pydantic import Field

from services.orchestrator.scheduling.contracts import PluginParams, ReplicaView, RequestView


class Params(PluginParams):
    tie_epsilon: float = Field(default=1e-9, ge=0, description="Scores this close count as a tie.")


class MaxScorePicker:
    """Highest total score; ties broken uniformly at random."""

    TYPE: ClassVar[str] = "max-score-picker"

    def __init__(self, params: Params):
        self.params = params

    def pick(
        self,
        request: RequestView,
        replicas: Sequence[ReplicaView],
        scores: Sequence[float],
        rng: random.Random,
    ) -> ReplicaView | None:
        if not replicas:
            return None
        best = max(scores)
        tied = [
            r for r, s in zip(replicas, scores, strict=True) if best - s <= self.params.tie_epsilon
        ]
        return tied[0] if len(tied) == 1 else rng.choice(tied)
