"""The orchestrator's domain types: what the director takes and returns. Wire types never
appear here; `convert.py` maps them at the gRPC edge."""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from llmmesh.common.topology import Priority
from services.orchestrator.settings import ReplicaSpec

__all__ = [
    "AdmissionRequest",
    "Clock",
    "DrainResult",
    "Lease",
    "Outcome",
    "Priority",
    "Registration",
]

# Seconds on a monotonic scale. Every component takes one; the service passes time.monotonic,
# a simulator its virtual clock.
Clock = Callable[[], float]


class Outcome(enum.Enum):
    SUCCESS = "success"
    CANCELLED = "cancelled"
    REPLICA_ERROR = "replica_error"
    REQUEST_ERROR = "request_error"


@dataclass(frozen=True, slots=True)
class AdmissionRequest:
    request_id: str
    model: str
    prompt_token_ids: Sequence[int]
    max_tokens: int
    priority: Priority = Priority.STANDARD
    tenant: str = ""
    model_version: str = ""
    # Replica ids never leased for this request (a replica that failed it).
    exclude_replicas: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class Lease:
    lease_id: str
    replica: ReplicaSpec
    queue_s: float
    granted_at: float


@dataclass(frozen=True, slots=True)
class Registration:
    ready: bool  # the orchestrator's readiness probe passed: the replica receives work
    created: bool  # the replica was not known before


@dataclass(frozen=True, slots=True)
class DrainResult:
    in_flight: int
    drained: bool
