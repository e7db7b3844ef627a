from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from pydantic import Field

from services.orchestrator.scheduling.contracts import PluginParams, ReplicaView, RequestView


class Params(PluginParams):
    max_kv_utilization: float = Field(
        default=0.9, gt=0.0, le=1.0, description="Skip replicas above this KV use."
    )


class KvWatermarkFilter:
    """Skips replicas whose KV cache is nearly full (new work would evict or wait)."""

    TYPE: ClassVar[str] = "kv-watermark-filter"

    def __init__(self, params: Params):
        self.params = params

    def filter(
        self, request: RequestView, replicas: Sequence[ReplicaView]
    ) -> Sequence[ReplicaView]:
        limit = self.params.max_kv_utilization
        return [r for r in replicas if r.kv_utilization is None or live(r) <= limit]


def live(r: ReplicaView) -> float:
    """The sample's KV use, less what the leases that ended since freed (the live load
    accounting's scale, when below 1). Growth since the sample is not added: the scale counts
    each lease's whole prompt, blind to the prefix blocks it shares with others, and the load
    scorers and the lease cap already see the leases granted since."""
    assert r.kv_utilization is not None
    return r.kv_utilization * (min(1.0, r.load.kv_scale) if r.load is not None else 1.0)
