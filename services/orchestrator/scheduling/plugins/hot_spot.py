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
        floor = min(r.in_flight for r in replicas)
        return [1.0 - min(1.0, (r.in_flight - floor) / self.params.tolerance) for r in replicas]
