"""Capacity-aware admission: what a replica can start soon, how fast the cluster queue drains,
and whether a request may enter the queue. Pure functions and small accumulators over the
injected clock's readings; the director composes them (`director.py`). Overload behaviour as a
whole is described in `OVERLOAD.md` next to this module.

Invariants:
- A replica's lease cap (below the configured one) is what it can start soon: its batch slots
  (the engine's reported `max_batch`, fewer when its KV blocks hold fewer sequences of the
  current mix), plus the slots expected to free within `start_soon_s` (from the mean service
  time), at most `slots * (overcommit - 1)`; never fewer than 1.
- The drain rate is the cluster's capacity, not its recent throughput: the sum of the routable
  replicas' slots divided by the mean lease duration (a quiet cluster drains as fast as a busy
  one). Unknown (None) until a lease has completed.
- A class-c arrival enters the queue only while the queue holds fewer than `limit(c)` waiters
  (limits fall with priority: batch is refused first, then standard), or by evicting the newest
  waiter of the lowest class below c when the queue holds at most `limit(c)`; the queue never
  exceeds `limit(interactive)` = `max_queue`.
- An arrival whose expected wait (waiters of its class and above, itself included, over the
  drain rate) exceeds its Admit deadline is refused at once. That deadline bounds the wait in
  the queue: the gateway sends the sooner of the client's deadline and its own admission wait
  bound (`admission_max_wait_s`), so the service time is not counted against it.
- Every refusal carries a retry-after: the time for the waiters ahead of the request to drain,
  clamped to [RETRY_AFTER_MIN_S, RETRY_AFTER_MAX_S]; RETRY_AFTER_UNKNOWN_S before the drain rate
  is known.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass

from llmmesh.common.engine_metrics import EngineSample
from llmmesh.common.topology import Priority

# retry-after bounds (seconds): never tell a client to come back at once, nor in an hour.
RETRY_AFTER_MIN_S = 0.1
RETRY_AFTER_MAX_S = 60.0
RETRY_AFTER_UNKNOWN_S = 1.0
# EWMA weight of the newest lease duration in the mean service time.
_SERVICE_ALPHA = 0.1


class ServiceTime:
    """EWMA of lease durations (grant to Complete) of requests that ran: the mean time a batch
    slot stays taken."""

    def __init__(self) -> None:
        self._mean_s: float | None = None

    def record(self, duration_s: float) -> None:
        d = max(duration_s, 0.0)
        m = self._mean_s
        self._mean_s = d if m is None else (1 - _SERVICE_ALPHA) * m + _SERVICE_ALPHA * d

    @property
    def mean_s(self) -> float | None:
        return self._mean_s


def engine_slots(configured: int, sample: EngineSample | None) -> int:
    """Sequences the replica runs at once: its reported batch capacity (`configured` when it
    reports none), fewer when its KV cache holds fewer sequences of the mix it runs now (blocks
    per active sequence from the sample)."""
    slots = configured
    if sample is None:
        return max(1, slots)
    if sample.max_batch:
        slots = int(sample.max_batch)
    if sample.active >= 1 and sample.kv_used > 0 and sample.kv_max > 0:
        per_sequence = sample.kv_used / sample.active
        slots = min(slots, int(sample.kv_max // per_sequence))
    return max(1, slots)


def replica_cap(slots: int, overcommit: float, start_soon_s: float, service_s: float | None) -> int:
    """Leases the replica may hold: its slots plus those expected to free within
    `start_soon_s` (the engine starts them as the running ones finish), at most
    `slots * (overcommit - 1)`; that maximum while the service time is unknown."""
    most = math.ceil(slots * (overcommit - 1.0))
    if service_s is None or service_s <= 0:
        ahead = most
    else:
        ahead = min(most, math.ceil(slots * start_soon_s / service_s))
    return max(1, slots + ahead)


def drain_rate(total_slots: int, service_s: float | None) -> float | None:
    """Requests per second the cluster finishes when saturated; None when unknown."""
    if service_s is None or service_s <= 0 or total_slots <= 0:
        return None
    return total_slots / service_s


def retry_after_s(ahead: int, rate: float | None) -> float:
    """Seconds until `ahead` requests drained at `rate`, clamped."""
    if rate is None or rate <= 0:
        return RETRY_AFTER_UNKNOWN_S
    return min(max(ahead / rate, RETRY_AFTER_MIN_S), RETRY_AFTER_MAX_S)


class Verdict(enum.Enum):
    ENQUEUE = "enqueue"
    EVICT_AND_ENQUEUE = "evict_and_enqueue"  # shed the newest waiter of `victim_priority`
    QUEUE_FULL = "queue_full"
    DEADLINE = "deadline"  # expected wait beyond the request's deadline


@dataclass(frozen=True, slots=True)
class Decision:
    verdict: Verdict
    retry_after_s: float | None = None  # set on a refusal
    victim_priority: Priority | None = None  # set on EVICT_AND_ENQUEUE
    expected_wait_s: float | None = None


@dataclass(frozen=True, slots=True)
class QueueLimits:
    """Waiters the queue may hold when a request of each class arrives (see the invariants)."""

    interactive: int
    standard: int
    batch: int

    @classmethod
    def of(cls, max_queue: int, standard_share: float, batch_share: float) -> QueueLimits:
        standard = max(1, math.floor(max_queue * standard_share))
        return cls(max_queue, standard, max(1, min(standard, math.floor(max_queue * batch_share))))

    def limit(self, priority: Priority) -> int:
        if priority is Priority.INTERACTIVE:
            return self.interactive
        if priority is Priority.STANDARD:
            return self.standard
        return self.batch


def decide(
    priority: Priority,
    queued: Mapping[Priority, int],
    limits: QueueLimits,
    rate: float | None,
    deadline_s: float,
) -> Decision:
    """The admission decision for an arrival of `priority` that no replica can take now, given
    the waiters queued per class, the drain rate (None: unknown) and the seconds left before the
    Admit call's deadline."""
    total = sum(queued.values())
    # Waiters served before this request: its class and every higher one (lower value).
    ahead = sum(n for p, n in queued.items() if p <= priority)
    wait = None if rate is None or rate <= 0 else (ahead + 1) / rate
    limit = limits.limit(priority)
    victim = None
    if total >= limit:
        victim = _lowest_below(priority, queued) if total <= limit else None
        if victim is None:
            return Decision(Verdict.QUEUE_FULL, retry_after_s(ahead + 1, rate), None, wait)
    if wait is not None and wait > deadline_s:
        # Time until enough of those ahead drained for this request to fit in its deadline.
        extra = ahead + 1 - (rate or 0.0) * deadline_s
        return Decision(Verdict.DEADLINE, retry_after_s(math.ceil(extra), rate), None, wait)
    if victim is not None:
        return Decision(Verdict.EVICT_AND_ENQUEUE, None, victim, wait)
    return Decision(Verdict.ENQUEUE, None, None, wait)


def _lowest_below(priority: Priority, queued: Mapping[Priority, int]) -> Priority | None:
    """The lowest class below `priority` with a waiter, or None."""
    lower = [p for p, n in queued.items() if n > 0 and p > priority]
    return max(lower) if lower else None
