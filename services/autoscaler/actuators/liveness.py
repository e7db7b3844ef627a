"""Liveness of the replicas the local actuator started, as the kubelet probes a pod's.

Triton 2.51 keeps answering ServerReady and ModelReady true after a model's Python-backend stub
died; only a request through the model tells (`LivenessProbe`: one token). A replica that failed
`failure_threshold` probes in a row is killed; the actuator then treats it as lost (its process
exited) and the next reconcile starts a replacement.

Invariants:
- At most one probe per replica is in flight; the next is due `period_s` after the last one
  ended.
- A passed probe resets the replica's failure count; the count of a replica that was forgotten
  (stopped, drained, lost) is dropped with it.
- Every time comes from the injected clock.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from llmmesh.triton.launcher import LivenessProbe

__all__ = ["LivenessTracker"]


@dataclass
class _State:
    failures: int = 0
    probing: bool = False
    next_at: float = 0.0


class LivenessTracker:
    def __init__(self, probe: LivenessProbe, clock: Callable[[], float]) -> None:
        self.probe = probe
        self._clock = clock
        self._states: dict[str, _State] = {}

    def due(self, replica_id: str) -> bool:
        """Whether a probe of `replica_id` should start now; if so it is marked in flight."""
        st = self._states.setdefault(replica_id, _State())
        if st.probing or self._clock() < st.next_at:
            return False
        st.probing = True
        return True

    def result(self, replica_id: str, alive: bool) -> int | None:
        """Record a finished probe; the failures in a row once they reach the threshold (kill
        the replica), else None."""
        st = self._states.get(replica_id)
        if st is None:  # forgotten while its probe ran
            return None
        st.probing = False
        st.next_at = self._clock() + self.probe.period_s
        st.failures = 0 if alive else st.failures + 1
        return st.failures if st.failures >= self.probe.failure_threshold else None

    def forget(self, replica_id: str) -> None:
        self._states.pop(replica_id, None)
