from __future__ import annotations

import random
from collections.abc import Sequence
from typing import ClassVar

from pydantic import Field

from services.orchestrator.scheduling.contracts import PluginParams, ReplicaView, RequestView


class Params(PluginParams):
    floor: float = Field(
        default=0.01,
        gt=0,
        description="Added to every total so zero-scored replicas stay possible.",
    )


class WeightedRandomPicker:
    """Random choice with probability proportional to the total score (exploration)."""

    TYPE: ClassVar[str] = "weighted-random-picker"

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
        weights = [max(s, 0.0) + self.params.floor for s in scores]
        return rng.choices(list(replicas), weights=weights, k=1)[0]
