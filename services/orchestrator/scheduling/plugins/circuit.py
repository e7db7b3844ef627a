from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from services.orchestrator.scheduling.contracts import PluginParams, ReplicaView, RequestView


class Params(PluginParams):
    pass


class CircuitBreakerFilter:
    """Skips replicas ejected after repeated failures (policy `health:`)."""

    TYPE: ClassVar[str] = "circuit-breaker-filter"

    def __init__(self, params: Params):
        self.params = params

    def filter(
        self, request: RequestView, replicas: Sequence[ReplicaView]
    ) -> Sequence[ReplicaView]:
        return [r for r in replicas if not r.ejected]
