"""The orchestrator's domain types: what the director takes and returns. Wire types never
appear here; `convert.py` maps them at the gRPC edge."""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from llmmesh.common.topology import Priority
from llmmesh.kvblocks import PromptHashes
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
    # The prompt; empty when the caller sent `prompt_hashes` and `prompt_length` instead.
    prompt_token_ids: Sequence[int]
    max_tokens: int
    priority: Priority = Priority.STANDARD
    tenant: str = ""
    model_version: str = ""
    # Replica ids never leased for this request (a replica that failed it).
    exclude_replicas: frozenset[str] = frozenset()
    # The prompt's block hashes as the caller computed them (None: hashed here from the prompt).
    prompt_hashes: PromptHashes | None = None
    # The prompt's length when only its hashes were sent (None: len(prompt_token_ids)).
    prompt_length: int | None = None

    @property
    def prompt_tokens(self) -> int:
        """Tokens in the prompt, whichever way it came."""
        n = self.prompt_length
        return len(self.prompt_token_ids) if n is None else n


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
