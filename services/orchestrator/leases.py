"""The lease table: grants, completions, reclamation of leases never completed, and the recent
completion rate that prices a queue's retry-after.

Invariants:
- Every lease ends exactly once: `pop` returns it to exactly one caller (Complete, or
  reclamation after `lease_timeout_s`).
- Lease ids are unique and opaque (uuid4).
"""

from __future__ import annotations

import uuid

from services.orchestrator.domain import Clock, Lease
from services.orchestrator.settings import ReplicaSpec

# EWMA weight of the newest completion gap in the drain rate.
_DRAIN_ALPHA = 0.2
# retry-after bounds (seconds): never tell a client to come back at once, nor in an hour.
_RETRY_AFTER_MIN_S = 0.1
_RETRY_AFTER_MAX_S = 60.0
_RETRY_AFTER_UNKNOWN_S = 1.0


class LeaseTable:
    def __init__(self, lease_timeout_s: float, clock: Clock) -> None:
        self._timeout_s = lease_timeout_s
        self._clock = clock
        self._leases: dict[str, Lease] = {}
        self._drain_rate = 0.0  # completions per second, EWMA
        self._last_completion = clock()

    def __len__(self) -> int:
        return len(self._leases)

    def grant(self, replica: ReplicaSpec, enqueued_at: float) -> Lease:
        now = self._clock()
        lease = Lease(uuid.uuid4().hex, replica, now - enqueued_at, now)
        self._leases[lease.lease_id] = lease
        return lease

    def pop(self, lease_id: str) -> Lease | None:
        """End a lease; None when it already ended. Counts towards the drain rate."""
        lease = self._leases.pop(lease_id, None)
        if lease is None:
            return None
        now = self._clock()
        gap = max(now - self._last_completion, 1e-3)
        self._drain_rate = (1 - _DRAIN_ALPHA) * self._drain_rate + _DRAIN_ALPHA * (1.0 / gap)
        self._last_completion = now
        return lease

    def expired(self) -> list[str]:
        """Leases granted more than `lease_timeout_s` ago."""
        deadline = self._clock() - self._timeout_s
        return [lid for lid, lease in self._leases.items() if lease.granted_at < deadline]

    def retry_after_s(self, queued: int) -> float:
        """Seconds until `queued` requests would have drained at the recent completion rate."""
        if self._drain_rate <= 0:
            return _RETRY_AFTER_UNKNOWN_S
        return min(max(queued / self._drain_rate, _RETRY_AFTER_MIN_S), _RETRY_AFTER_MAX_S)
