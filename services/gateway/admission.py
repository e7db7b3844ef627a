"""What the gateway core needs from admission, in domain types: a lease on one replica for each
generation attempt, one report when that attempt ends, and what could be placed now (readiness).

`orchestrator_client.OrchestratorClient` implements it over gRPC; tests use an in-process fake.
Neither the core nor this module knows the orchestrator's wire types.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from llmmesh.common.topology import Priority, ReplicaAddress

__all__ = [
    "AdmissionClient",
    "AdmissionRequest",
    "AdmissionStatus",
    "KnownReplica",
    "Lease",
    "LeaseReport",
    "Outcome",
]


class Outcome(enum.Enum):
    """How a leased attempt ended, as the orchestrator accounts it."""

    SUCCESS = "success"
    CANCELLED = "cancelled"  # the client went away or the deadline passed
    REPLICA_ERROR = "replica_error"  # attributable to the replica: counts against its health
    REQUEST_ERROR = "request_error"  # not attributable to the replica


@dataclass(frozen=True, slots=True)
class AdmissionRequest:
    request_id: str
    model: str  # the Triton model name the replica must serve
    prompt_token_ids: Sequence[int]
    max_tokens: int
    priority: Priority
    tenant: str
    model_version: str  # "" = any version
    # Replica ids not to lease (replicas that already failed this request: request migration).
    exclude_replicas: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class Lease:
    lease_id: str
    replica: ReplicaAddress
    queue_ms: float  # time the request waited in the admission queue


@dataclass(frozen=True, slots=True)
class LeaseReport:
    lease_id: str
    outcome: Outcome
    prompt_tokens: int
    completion_tokens: int
    kv_cache_reused_blocks: int
    ttft_ms: float | None  # None when no token was produced
    error: str = ""

    @classmethod
    def unused(cls, lease_id: str) -> LeaseReport:
        """A lease granted to a request given up on before it used it: its capacity goes back."""
        return cls(lease_id, Outcome.CANCELLED, 0, 0, 0, None)


@dataclass(frozen=True, slots=True)
class KnownReplica:
    """One replica as an orchestrator last listed it (the gateway's degraded mode routes over
    these when no orchestrator answers)."""

    replica: ReplicaAddress
    routable: bool  # healthy (probed ready, not ejected) and not draining
    in_flight: int  # that orchestrator's leases on it
    # The Triton models it serves; empty: not said (an older orchestrator): any.
    models: frozenset[str] = frozenset()

    def serves(self, model: str) -> bool:
        return not self.models or model in self.models


@dataclass(frozen=True, slots=True)
class AdmissionStatus:
    """The orchestrator's replica view at one moment."""

    replicas: int  # known to the orchestrator
    ready_replicas: int  # healthy (probed ready, not ejected) and not draining: can take a lease
    queue_depth: int  # requests waiting for admission
    # Every replica listed, when the client keeps them (empty otherwise).
    known: tuple[KnownReplica, ...] = ()
    # True when no orchestrator answered and this is the gateway's last-known view (degraded
    # mode, services/gateway/orchestrators.py): requests are still served.
    degraded: bool = False


class AdmissionClient(Protocol):
    async def admit(self, request: AdmissionRequest, *, timeout_s: float) -> Lease:
        """A lease, or a `ServiceError`: `NoReplica`, `OrchestratorUnavailable`, or the
        refusal's own class (queue full: RESOURCE_EXHAUSTED with retry-after; queue timeout:
        DEADLINE_EXCEEDED)."""
        ...

    def complete(self, report: LeaseReport) -> None:
        """Report a lease's end without blocking the caller; called exactly once per lease."""
        ...

    async def drain(self) -> None:
        """Wait until every report handed to `complete` was delivered or given up on."""
        ...

    async def status(self, *, timeout_s: float) -> AdmissionStatus:
        """What the orchestrator could place now, or `OrchestratorUnavailable`."""
        ...
