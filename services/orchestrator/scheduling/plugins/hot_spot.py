from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from pydantic import Field

from services.orchestrator.scheduling.contracts import PluginParams, ReplicaView, RequestView


class Params(PluginParams):
    tolerance: int = Field(
        default=4,
        gt=0,
        description="Requests above the least-loaded candidate at which the score reaches 0.",
    )


class HotSpotGuard:
    """Counterweight to prefix affinity: a replica far above its peers' load scores low, so one
    shared system prompt cannot pile every request onto the replica that cached it."""

    TYPE: ClassVar[str] = "hot-spot-guard"

    def __init__(self, params: Params):
        self.params = params

    def score(self, request: RequestView, replicas: Sequence[ReplicaView]) -> Sequence[float]:
        if not replicas:
            return []
        loads = [r.in_flight + r.recent_failures for r in replicas]
        floor = min(loads)
        return [1.0 - min(1.0, (x - floor) / self.params.tolerance) for x in loads]
