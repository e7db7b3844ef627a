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

from pydantic import BaseModel, Field, field_validator

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

    @field_validator("host")
    @classmethod
    def _resolvable_name(cls, host: str) -> str:
        try:
            host.encode("idna")  # what the resolver does first: an empty or long label fails
        except UnicodeError as exc:
            raise ValueError(f"not a DNS name: {host!r} ({exc})") from None
        return host


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


# Resolver answers that a name has no address (NXDOMAIN, or no A record: a headless Service with
# no ready pod): its pods are none. Any other failure says nothing about them.
_NO_ADDRESS = frozenset(
    code for code in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", None)) if code is not None
)
# One target's resolution at most (the resolver's own retries over its search domains included).
RESOLVE_TIMEOUT_S = 10.0


class PodDiscovery:
    """The pods behind `targets`, one round after another. A target whose resolution fails
    for a reason that says nothing about its pods (a timeout, SERVFAIL, a resolver error) keeps
    the pods it listed last: a DNS hiccup must not drop a whole pool from routing until the next
    round. A target the DNS answers has no address has no pods."""

    def __init__(self, targets: Sequence[DnsTarget]) -> None:
        self.targets = list(targets)
        self._last: list[list[DiscoveredPod]] = [[] for _ in self.targets]
        self._answered = [False] * len(self.targets)

    @property
    def complete(self) -> bool:
        """Every target's resolution has answered once (its pods, or that it has none): before,
        a target that failed lists no pods for want of an answer, not because it has none."""
        return all(self._answered)

    async def __call__(self) -> list[DiscoveredPod]:
        out: list[DiscoveredPod] = []
        for i, target in enumerate(self.targets):
            try:
                async with asyncio.timeout(RESOLVE_TIMEOUT_S):
                    ips = await resolve_ipv4(target.host, target.port)
            except socket.gaierror as exc:
                if exc.errno not in _NO_ADDRESS:
                    self._failed(target, exc, i)
                    out.extend(self._last[i])
                    continue
                ips = []
            except (OSError, UnicodeError) as exc:  # TimeoutError is an OSError
                self._failed(target, exc, i)
                out.extend(self._last[i])
                continue
            pods = [DiscoveredPod(target, ip) for ip in ips]
            self._last[i] = pods
            self._answered[i] = True
            out.extend(pods)
        return out

    def _failed(self, target: DnsTarget, exc: BaseException, i: int) -> None:
        log.warning(
            "dns resolution failed; the pods it listed last are kept",
            extra={"host": target.host, "error": repr(exc), "kept": len(self._last[i])},
        )
