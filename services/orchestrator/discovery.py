"""Replica set of the orchestrator: the static list from settings plus headless-Service pods."""

from __future__ import annotations

from collections.abc import Sequence

from llmmesh.common.discovery import DiscoveredPod, discover_pods
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


async def discover(settings: OrchestratorSettings) -> list[ReplicaSpec]:
    return [*settings.replicas, *replicas_from_pods(await discover_pods(settings.replica_dns))]
