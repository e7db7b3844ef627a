from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from pydantic import Field

from services.orchestrator.scheduling.contracts import PluginParams, ReplicaView, RequestView


class Params(PluginParams):
    unknown_score: float = Field(
        default=0.5, ge=0.0, le=1.0, description="Score of a replica without KV metrics."
    )


class KvUtilizationScorer:
    """More free KV cache scores higher."""

    TYPE: ClassVar[str] = "kv-utilization-scorer"

    def __init__(self, params: Params):
        self.params = params

    def score(self, request: RequestView, replicas: Sequence[ReplicaView]) -> Sequence[float]:
        return [
            self.params.unknown_score if r.kv_utilization is None else 1.0 - r.kv_utilization
            for r in replicas
        ]
