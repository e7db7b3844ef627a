from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from pydantic import Field

from services.orchestrator.scheduling.contracts import PluginParams, ReplicaView, RequestView


class Params(PluginParams):
    saturation: int | None = Field(
        default=None,
        gt=0,
        description="Load at which the score reaches 0; the replica's cap when unset.",
    )


def load(r: ReplicaView) -> float:
    """Requests on the replica, plus those that failed on it recently: a replica that fails
    fast must not look idle."""
    engine = (r.engine_active or 0.0) + (r.engine_waiting or 0.0)
    return max(float(r.in_flight), engine) + r.recent_failures


class QueueDepthScorer:
    """Fewer requests on the replica scores higher."""

    TYPE: ClassVar[str] = "queue-depth-scorer"

    def __init__(self, params: Params):
        self.params = params

    def score(self, request: RequestView, replicas: Sequence[ReplicaView]) -> Sequence[float]:
        out = []
        for r in replicas:
            sat = self.params.saturation or r.cap
            out.append(1.0 - min(1.0, load(r) / sat))
        return out
