"""The lease table: grants, completions and reclamation of leases never completed. (The queue's
drain rate and retry-after come from `capacity.py`.)

Invariants:
- Every lease ends exactly once: `pop` returns it to exactly one caller (Complete, or
  reclamation after `lease_timeout_s`).
- Lease ids are unique and opaque (uuid4).
"""

from __future__ import annotations

import uuid

from services.orchestrator.domain import Clock, Lease
from services.orchestrator.settings import ReplicaSpec


class LeaseTable:
    def __init__(self, lease_timeout_s: float, clock: Clock) -> None:
        self._timeout_s = lease_timeout_s
        self._clock = clock
        self._leases: dict[str, Lease] = {}

    def __len__(self) -> int:
        return len(self._leases)

    def grant(self, replica: ReplicaSpec, enqueued_at: float) -> Lease:
        now = self._clock()
        lease = Lease(uuid.uuid4().hex, replica, now - enqueued_at, now)
        self._leases[lease.lease_id] = lease
        return lease

    def pop(self, lease_id: str) -> Lease | None:
        """End a lease; None when it already ended."""
        return self._leases.pop(lease_id, None)

    def expired(self) -> list[str]:
        """Leases granted more than `lease_timeout_s` ago."""
        deadline = self._clock() - self._timeout_s
        return [lid for lid, lease in self._leases.items() if lease.granted_at < deadline]
