from __future__ import annotations

import random
from collections.abc import Sequence
from typing import ClassVar

from services.orchestrator.scheduling.contracts import PluginParams, ReplicaView, RequestView


class Params(PluginParams):
    pass


class RoundRobinPicker:
    """Cycles through candidates in replica-id order, ignoring scores (the baseline policy)."""

    TYPE: ClassVar[str] = "round-robin-picker"

    def __init__(self, params: Params):
        self.params = params
        self._last = ""

    def pick(
        self,
        request: RequestView,
        replicas: Sequence[ReplicaView],
        scores: Sequence[float],
        rng: random.Random,
    ) -> ReplicaView | None:
        if not replicas:
            return None
        ordered = sorted(replicas, key=lambda r: r.id)
        chosen = next((r for r in ordered if r.id > self._last), ordered[0])
        self._last = chosen.id
        return chosen
