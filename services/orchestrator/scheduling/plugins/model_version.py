from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from services.orchestrator.scheduling.contracts import PluginParams, ReplicaView, RequestView


class Params(PluginParams):
    pass


class ModelVersionFilter:
    """Keeps replicas serving the request's model, and its model version when one is asked."""

    TYPE: ClassVar[str] = "model-version-filter"

    def __init__(self, params: Params):
        self.params = params

    def filter(
        self, request: RequestView, replicas: Sequence[ReplicaView]
    ) -> Sequence[ReplicaView]:
        return [
            r
            for r in replicas
            if request.model in r.models
            and (not request.model_version or r.model_version == request.model_version)
        ]
