"""Replica discovery: the static list from settings plus headless-Service DNS (Kubernetes).

Each A record of a headless Service is one Triton pod; its replica id is `<pool>-<ip>` so the
id is stable for the pod's lifetime and engines can be told the same id (POD_IP).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Sequence

from services.orchestrator.settings import DnsTarget, OrchestratorSettings, ReplicaSpec

log = logging.getLogger(__name__)


async def resolve_ipv4(host: str, port: int) -> list[str]:
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, family=socket.AF_INET, type=socket.SOCK_STREAM)
    return sorted({str(info[4][0]) for info in infos})


def replicas_from_dns(target: DnsTarget, ips: Sequence[str]) -> list[ReplicaSpec]:
    return [
        ReplicaSpec(
            id=f"{target.pool}-{target.model_version}-{ip}",
            grpc_address=f"{ip}:{target.port}",
            pool=target.pool,
            model_version=target.model_version,
            models=list(target.models),
        )
        for ip in ips
    ]


async def discover(settings: OrchestratorSettings) -> list[ReplicaSpec]:
    """Current replica set; a target that fails to resolve contributes nothing this round."""
    out = list(settings.replicas)
    for target in settings.replica_dns:
        try:
            ips = await resolve_ipv4(target.host, target.port)
        except OSError as exc:
            log.warning("dns resolution failed", extra={"host": target.host, "error": repr(exc)})
            continue
        out.extend(replicas_from_dns(target, ips))
    return out
