from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from services.orchestrator.scheduling.contracts import PluginParams, ReplicaView, RequestView


class Params(PluginParams):
    pass


class PrefixOverlapScorer:
    """Fraction of the prompt's full blocks already cached on each replica."""

    TYPE: ClassVar[str] = "prefix-overlap-scorer"

    def __init__(self, params: Params):
        self.params = params

    def score(self, request: RequestView, replicas: Sequence[ReplicaView]) -> Sequence[float]:
        if request.prompt_blocks <= 0:
            return [0.0] * len(replicas)
        return [request.prefix_blocks.get(r.id, 0) / request.prompt_blocks for r in replicas]
