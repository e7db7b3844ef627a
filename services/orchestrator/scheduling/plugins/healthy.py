from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from services.orchestrator.scheduling.contracts import PluginParams, ReplicaView, RequestView


class Params(PluginParams):
    pass


class HealthyFilter:
    """Keeps replicas whose last readiness probe passed."""

    TYPE: ClassVar[str] = "healthy-filter"

    def __init__(self, params: Params):
        self.params = params

    def filter(
        self, request: RequestView, replicas: Sequence[ReplicaView]
    ) -> Sequence[ReplicaView]:
        return [r for r in replicas if r.ready]
