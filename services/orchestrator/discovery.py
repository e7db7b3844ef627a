"""Replica set of the orchestrator: the static list from settings plus headless-Service pods."""

from __future__ import annotations

from collections.abc import Sequence

from llmmesh.common.discovery import DiscoveredPod, PodDiscovery
from services.orchestrator.settings import OrchestratorSettings, ReplicaSpec


def replica_from_pod(pod: DiscoveredPod) -> ReplicaSpec:
    return ReplicaSpec(
        id=pod.replica_id,
        grpc_address=pod.grpc_address,
        authority=pod.grpc_authority,
        metrics_url=pod.metrics_url,
        metrics_host=pod.metrics_host,
        pool=pod.target.pool,
        model_version=pod.target.model_version,
        models=list(pod.target.models),
    )


def replicas_from_pods(pods: Sequence[DiscoveredPod]) -> list[ReplicaSpec]:
    return [replica_from_pod(p) for p in pods]


class Discovery:
    """The replica set round after round: the static list plus the pods behind the headless
    Services (`PodDiscovery`: a Service whose resolution fails keeps the pods it listed last)."""

    def __init__(self, settings: OrchestratorSettings) -> None:
        self._static = list(settings.replicas)
        self._pods = PodDiscovery(settings.replica_dns)

    async def __call__(self) -> list[ReplicaSpec]:
        return [*self._static, *replicas_from_pods(await self._pods())]


async def discover(settings: OrchestratorSettings) -> list[ReplicaSpec]:
    """One round, with no earlier one to keep from."""
    return await Discovery(settings)()
