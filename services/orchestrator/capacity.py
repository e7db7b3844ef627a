"""Capacity-aware admission: what a replica can start soon, how fast the cluster queue drains,
and whether a request may enter the queue. Pure functions and small accumulators over the
injected clock's readings; the director composes them (`director.py`). Overload behaviour as a
whole is described in `OVERLOAD.md` next to this module.

Invariants:
- A replica's lease cap (below the configured one) is what it can start soon: its batch slots
  (the engine's reported `max_batch`, fewer when its free KV blocks hold fewer further sequences
  of the current mix, each needing the blocks its prompt does not share), plus the slots expected to free within `start_soon_s` (from the mean service
  time), at most `slots * (overcommit - 1)`; never fewer than 1.
- The drain rate is the cluster's capacity, not its recent throughput: the routable replicas'
  slots over the mean lease duration, or their leases (own and others') over it when those are
  more (Little's law: a lease beyond the slots waits in the engine, and that wait is part of its
  duration). A quiet cluster drains as fast as a busy one. Unknown (None) until a lease has
  completed.
- The line ahead of an arrival is the waiters of its class and above plus the engines' backlog
  (leases beyond their replica's slots: granted, not started). Its expected time to first token
  is that line and itself over the drain rate, plus the predicted prefill backlog (`Outlook`).
- A class-c arrival enters the queue only while the queue holds fewer than `limit(c)` waiters
  (limits fall with priority: batch is refused first, then standard), or otherwise by evicting
  the newest waiter of the lowest class below c, if any (whatever the queue holds beyond
  `limit(c)`: the eviction does not grow it, and a lower class never keeps a place a higher one
  is refused); the queue never exceeds `limit(interactive)` = `max_queue`.
- An arrival whose expected time to first token exceeds `DEADLINE_SHARE` of its Admit deadline
  is refused at once (the rest is headroom for the estimate's error and the hops to the engine);
  a waiter whose expected first token, re-estimated at each dispatch, lies beyond that share of
  its deadline (counted from its arrival) is refused then (`within_share`). The Admit deadline is the sooner of the client's deadline and the
  gateway's admission wait bound (`admission_max_wait_s`, the TTFT objective): it bounds the
  time to the first token, not the generation.
- Every refusal carries a retry-after: the time for the line ahead of the request, itself
  included, to drain at the drain rate, whatever the refusal (queue full, shed, deadline),
  clamped to [RETRY_AFTER_MIN_S, RETRY_AFTER_MAX_S]; RETRY_AFTER_UNKNOWN_S before the drain rate
  is known. Not the shorter time until the request would just fit its deadline: under sustained
  overload new arrivals take that room first, and a client told so retries (and gives up) within
  the same overload.
"""

from __future__ import annotations

import bisect
import enum
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from llmmesh.common.engine_metrics import EngineSample
from llmmesh.common.topology import Priority

# retry-after bounds (seconds): never tell a client to come back at once, nor in an hour.
RETRY_AFTER_MIN_S = 0.1
RETRY_AFTER_MAX_S = 60.0
RETRY_AFTER_UNKNOWN_S = 1.0
# Share of the Admit deadline an arrival's expected time to first token may take; the rest is
# headroom for the estimate's error (completions are bursty) and the hops to the engine.
DEADLINE_SHARE = 0.85
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


def engine_slots(configured: int, sample: EngineSample | None, unique_share: float = 1.0) -> int:
    """Sequences the replica runs at once: its reported batch capacity (`configured` when it
    reports none), fewer when its free KV blocks hold fewer further sequences of the mix it runs
    now. A further sequence needs its own blocks only: the blocks per active sequence from the
    sample, times `unique_share` (the share of the replica's leased tokens, prompt and max
    tokens, that its prompts do not share with cached blocks; 1 without sharing). The plain
    average would count a prefix shared by every sequence once per sequence."""
    slots = configured
    if sample is None:
        return max(1, slots)
    if sample.max_batch:
        slots = int(sample.max_batch)
    if sample.active >= 1 and sample.kv_used > 0 and sample.kv_max > 0:
        per_sequence = sample.kv_used / sample.active * min(1.0, max(unique_share, 1e-3))
        free = sample.kv_max - sample.kv_used
        slots = min(slots, int(sample.active + free / per_sequence))
    return max(1, slots)


def ending_soon(
    lease_starts: Sequence[float], now: float, start_soon_s: float, service_s: float | None
) -> int | None:
    """Leases (grant times, ascending) expected to end within `start_soon_s`: granted at least
    the mean service time less `start_soon_s` ago, overdue ones included. None while the service
    time is unknown."""
    if service_s is None or service_s <= 0:
        return None
    return bisect.bisect_right(lease_starts, now + start_soon_s - service_s)


def replica_cap(slots: int, overcommit: float, ending: int | None) -> int:
    """Leases the replica may hold: its slots plus the leases on it expected to end soon
    (`ending_soon`: the engine starts a waiting request as a running one finishes), at most
    `slots * (overcommit - 1)`; that maximum while the service time is unknown."""
    most = math.ceil(slots * (overcommit - 1.0))
    ahead = most if ending is None else min(most, ending)
    return max(1, slots + ahead)


def drain_rate(total_slots: int, service_s: float | None, leases: int = 0) -> float | None:
    """Requests per second the cluster finishes when saturated: `max(slots, leases)` over the
    mean lease duration (see the invariants); None when unknown."""
    if service_s is None or service_s <= 0 or total_slots <= 0:
        return None
    return max(total_slots, leases) / service_s


def retry_after_s(ahead: int, rate: float | None) -> float:
    """Seconds until `ahead` requests drained at `rate`, clamped."""
    if rate is None or rate <= 0:
        return RETRY_AFTER_UNKNOWN_S
    return min(max(ahead / rate, RETRY_AFTER_MIN_S), RETRY_AFTER_MAX_S)


@dataclass(frozen=True, slots=True)
class Occupancy:
    """One routable replica as admission sees it."""

    slots: int  # sequences it runs at once (`engine_slots`)
    leases: int  # this orchestrator's leases on it plus the others' load its engine reports
    prefill_s: float = 0.0  # the load ledger's predicted prefill backlog on it


@dataclass(frozen=True, slots=True)
class Outlook:
    """What an arrival that no replica can take now has ahead of it (see the invariants)."""

    rate: float | None  # drain rate, requests/s; None: unknown
    backlog: int = 0  # leases granted beyond the engines' slots: waiting in an engine
    prefill_s: float = 0.0  # predicted prefill backlog on the soonest replica

    @classmethod
    def of(cls, replicas: Iterable[Occupancy], service_s: float | None) -> Outlook:
        rs = list(replicas)
        rate = drain_rate(sum(r.slots for r in rs), service_s, sum(r.leases for r in rs))
        backlog = sum(max(0, r.leases - r.slots) for r in rs)
        prefill = min((r.prefill_s for r in rs), default=0.0)
        return cls(rate, backlog, max(prefill, 0.0))

    def first_token_s(self, position: int) -> float | None:
        """Expected seconds until the first token of the request at `position` (1-based) in
        the queue; None while the drain rate is unknown."""
        if self.rate is None or self.rate <= 0:
            return None
        return (position + self.backlog) / self.rate + self.prefill_s

    def retry_after_s(self, position: int) -> float:
        """Seconds until the line ahead of the request at `position` has drained; clamped."""
        return retry_after_s(position + self.backlog, self.rate)


def within_share(
    first_token_at: float, arrived_at: float, deadline: float, share: float = DEADLINE_SHARE
) -> bool:
    """Whether a first token expected at `first_token_at` comes within `share` of the budget
    from `arrived_at` to `deadline` (all on one clock)."""
    return first_token_at <= arrived_at + share * (deadline - arrived_at)


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
    expected_wait_s: float | None = None  # expected time to first token


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
    outlook: Outlook,
    deadline_s: float,
    share: float = DEADLINE_SHARE,
) -> Decision:
    """The admission decision for an arrival of `priority` that no replica can take now, given
    the waiters queued per class, what lies ahead of it in the engines (`outlook`) and the
    seconds left before the Admit call's deadline, of which `share` may be spent waiting for
    the first token."""
    total = sum(queued.values())
    # Waiters served before this request: its class and every higher one (lower value).
    ahead = sum(n for p, n in queued.items() if p <= priority)
    wait = outlook.first_token_s(ahead + 1)
    limit = limits.limit(priority)
    victim = None
    if total >= limit:
        victim = _lowest_below(priority, queued)
        if victim is None:
            return Decision(Verdict.QUEUE_FULL, outlook.retry_after_s(ahead + 1), None, wait)
    budget = deadline_s * share
    if wait is not None and wait > budget:
        return Decision(Verdict.DEADLINE, outlook.retry_after_s(ahead + 1), None, wait)
    if victim is not None:
        return Decision(Verdict.EVICT_AND_ENQUEUE, None, victim, wait)
    return Decision(Verdict.ENQUEUE, None, None, wait)


def _lowest_below(priority: Priority, queued: Mapping[Priority, int]) -> Priority | None:
    """The lowest class below `priority` with a waiter, or None."""
    lower = [p for p, n in queued.items() if n > 0 and p > priority]
    return max(lower) if lower else None
