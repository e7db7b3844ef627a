"""The actuator contract the autoscaler loop drives (one interface, several implementations).

Invariants every implementation keeps:
- `observe` reports what exists, never what was asked for: a replica counts as `ready` only once
  its engine reports the model ready and the orchestrator may route to it.
- `apply` returns promptly; starting and draining happen in the background. Asking for the same
  count again is a no-op, and a later `apply` supersedes an earlier one.
- Scale-down never aborts a request: a replica leaves the orchestrator, finishes its in-flight
  streams, and only then is stopped.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar, Protocol

from llmmesh.common.topology import PoolKey

__all__ = ["Actuator", "PoolKey", "ReplicaCounts"]


@dataclass(frozen=True, slots=True)
class ReplicaCounts:
    """Replicas of one pool by lifecycle state."""

    ready: int
    starting: int = 0
    draining: int = 0

    @property
    def provisioned(self) -> int:
        """Replicas that exist or are coming (what a new desired count is compared with)."""
        return self.ready + self.starting


class Actuator(Protocol):
    TYPE: ClassVar[str]

    async def observe(self) -> Mapping[PoolKey, ReplicaCounts]:
        """Current replicas of every pool this actuator manages."""
        ...

    async def apply(self, key: PoolKey, desired: int, reason: str) -> None:
        """Move the pool towards `desired` replicas (in the background)."""
        ...

    async def close(self) -> None:
        """Drain and stop what this actuator started; idempotent."""
        ...
