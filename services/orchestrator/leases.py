"""The lease table: grants, completions and reclamation of leases never completed. (The queue's
drain rate and retry-after come from `capacity.py`.)

Invariants:
- Every lease ends exactly once: `pop` returns it to exactly one caller (Complete, or
  reclamation after `lease_timeout_s`).
- Lease ids are unique and opaque (uuid4).
- A lease has at most one owner (the caller process it was granted to over a stream); a lease
  that ends leaves its owner's set.
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
        self._owner: dict[str, str] = {}  # lease id -> owner, for owned leases only

    def __len__(self) -> int:
        return len(self._leases)

    def grant(self, replica: ReplicaSpec, enqueued_at: float) -> Lease:
        now = self._clock()
        lease = Lease(uuid.uuid4().hex, replica, now - enqueued_at, now)
        self._leases[lease.lease_id] = lease
        return lease

    def own(self, lease_id: str, owner: str) -> None:
        """Record `owner` as the live lease's owner (no-op for a lease that ended)."""
        if lease_id in self._leases:
            self._owner.setdefault(lease_id, owner)

    def owned_by(self, owner: str) -> list[str]:
        """The live leases `owner` holds (a scan: asked when a caller is gone or opens a stream)."""
        return [lid for lid, o in self._owner.items() if o == owner]

    def pop(self, lease_id: str) -> Lease | None:
        """End a lease; None when it already ended."""
        self._owner.pop(lease_id, None)
        return self._leases.pop(lease_id, None)

    def expired(self) -> list[str]:
        """Leases granted more than `lease_timeout_s` ago."""
        deadline = self._clock() - self._timeout_s
        return [lid for lid, lease in self._leases.items() if lease.granted_at < deadline]
