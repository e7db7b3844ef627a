"""Kubernetes replica discovery through headless Services: each A record is one Triton pod.

Shared by the orchestrator (who to route to) and the autoscaler (whom to scrape), so both see
the same replica ids: `<pool>-<model_version>-<pod IP>`; engines get the same id from POD_IP.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Sequence
from dataclasses import dataclass

from pydantic import BaseModel, Field

from llmmesh.common.topology import (
    DEFAULT_MODEL_VERSION,
    DEFAULT_POOL,
    TRITON_GRPC_PORT,
    TRITON_METRICS_PORT,
    TRITON_MODEL,
)

log = logging.getLogger(__name__)


class DnsTarget(BaseModel):
    """A headless Service whose A records are Triton pods."""

    host: str = Field(
        min_length=1,
        description="Headless Service FQDN, e.g. triton-v1-short.llmmesh.svc.cluster.local.",
    )
    port: int = Field(
        default=TRITON_GRPC_PORT, gt=0, le=65535, description="Triton gRPC port on each pod."
    )
    metrics_port: int = Field(
        default=TRITON_METRICS_PORT, gt=0, le=65535, description="Triton metrics port on each pod."
    )
    pool: str = Field(default=DEFAULT_POOL, description="Pool of the replicas behind this Service.")
    model_version: str = Field(
        default=DEFAULT_MODEL_VERSION, description="Model version served by these replicas."
    )
    models: list[str] = Field(
        default_factory=lambda: [TRITON_MODEL], description="Triton model names served."
    )


@dataclass(frozen=True, slots=True)
class DiscoveredPod:
    target: DnsTarget
    ip: str

    @property
    def replica_id(self) -> str:
        return f"{self.target.pool}-{self.target.model_version}-{self.ip}"

    @property
    def grpc_address(self) -> str:
        return f"{self.ip}:{self.target.port}"

    @property
    def grpc_authority(self) -> str:
        return f"{self.target.host}:{self.target.port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.ip}:{self.target.metrics_port}/metrics"

    @property
    def metrics_host(self) -> str:
        return f"{self.target.host}:{self.target.metrics_port}"


async def resolve_ipv4(host: str, port: int) -> list[str]:
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, family=socket.AF_INET, type=socket.SOCK_STREAM)
    return sorted({str(info[4][0]) for info in infos})


async def discover_pods(targets: Sequence[DnsTarget]) -> list[DiscoveredPod]:
    """Pods behind every target; a target that fails to resolve contributes none this round."""
    out: list[DiscoveredPod] = []
    for target in targets:
        try:
            ips = await resolve_ipv4(target.host, target.port)
        except OSError as exc:
            log.warning("dns resolution failed", extra={"host": target.host, "error": repr(exc)})
            continue
        out.extend(DiscoveredPod(target, ip) for ip in ips)
    return out
