from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from pydantic import Field

from services.orchestrator.scheduling.contracts import PluginParams, ReplicaView, RequestView


class Params(PluginParams):
    lend_below_utilization: float = Field(
        default=0.25,
        ge=0.0,
        le=1.0,
        description="A larger pool lends only while its in-flight/cap is below this (0: never lend).",
    )
    lend_when_preferred_above: float = Field(
        default=0.75,
        ge=0.0,
        le=1.0,
        description="... and only while the preferred pool's in-flight/cap is at least this.",
    )


def utilization(replicas: Sequence[ReplicaView]) -> float:
    cap = sum(r.cap for r in replicas)
    return sum(r.in_flight for r in replicas) / cap if cap else 1.0


class PoolFilter:
    """Length-bucketed pools: the smallest pool that fits the prompt and has a replica; larger
    pools join when idle enough to lend. Replicas of pools the policy does not name take any
    prompt length."""

    TYPE: ClassVar[str] = "pool-filter"

    def __init__(self, params: Params):
        self.params = params

    def filter(
        self, request: RequestView, replicas: Sequence[ReplicaView]
    ) -> Sequence[ReplicaView]:
        if request.pools is None:
            return list(replicas)
        unpooled = [r for r in replicas if r.pool not in request.known_pools]
        chosen: list[ReplicaView] = []
        busy = False
        for pool in request.pools:
            members = [r for r in replicas if r.pool == pool]
            if not members:
                continue
            if not chosen:
                chosen = list(members)
                busy = utilization(members) >= self.params.lend_when_preferred_above
            elif busy and utilization(members) < self.params.lend_below_utilization:
                chosen.extend(members)
        return chosen + unpooled
