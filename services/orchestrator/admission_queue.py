"""The bounded admission queue: priority classes, self-clocked fair queuing across tenants
within a class, scale-from-zero activation waits. Pure data structure: no clock, no I/O; the director
stamps times and resolves the waiters' futures.

Invariants:
- Waiters leave in (priority, finish tag, arrival) order; a tenant's finish tag advances by its
  request's tokens divided by its weight, so tenants share a class in proportion to weight. (The
  director may grant some of them out of that order, within a class, each waiter passed at most
  `affinity_window` times: its affinity pass, `director.py`; tenants' shares hold up to that.)
- A waiter leaves the queue for good once: granted or refused after `drain_in_order` (those
  neither are `restore`d), or taken out by `withdraw` or `evict_newest`; a drained waiter
  (not `queued`) cannot be withdrawn.
- The class clock is the finish tag of the last waiter served (`served`): a request waits
  behind others' only until their finish tags pass its own, however many new tenants arrive.
- A waiter that leaves unserved (withdrawn, evicted, refused after a drain: `unserved`) gives
  its tokens back: its tenant's finish tag, and those of the tenant's later waiters still queued
  (at the next drain), go back by its cost, never below the class clock. Otherwise a tenant
  whose waiters time out under overload is charged for service it never got, waits longer for
  it, times out more: a starting debt of 50 timeouts took one of two equal tenants to 0 of
  5,000 grants.
- The per-tenant finish-tag map stays bounded by the active tenants (`prune`).
- `queued(p)` is the number of waiters of class p in the queue; the queue never holds more than
  `max_size` (the director checks `capacity.decide` before `push`, which refuses beyond it).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import operator
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from services.orchestrator.domain import AdmissionRequest, Lease, Priority
from services.orchestrator.prefix import PrefixMatches

# Tenants remembered per class before idle ones are forgotten.
_TENANT_MEMORY = 4096
# The order waiters leave in: `Waiter`'s comparison fields.
_SERVICE_ORDER = operator.attrgetter("priority", "finish_tag", "seq")


@dataclass(frozen=True, slots=True)
class Activation:
    """The scale-from-zero pool a request waits for when no replica can serve it."""

    pool: str
    timeout_s: float


@dataclass(order=True)
class Waiter:
    priority: int
    finish_tag: float  # self-clocked fair queuing across tenants within the class
    seq: int
    request: AdmissionRequest = field(compare=False)
    start_tag: float = field(compare=False)
    prefix: PrefixMatches = field(compare=False)
    enqueued_at: float = field(compare=False)
    future: asyncio.Future[Lease] = field(compare=False)
    pool_key: tuple[str, str] = field(compare=False)  # (pool, model_version) it counts under
    activation: Activation | None = field(compare=False)
    deadline: float = field(compare=False, default=math.inf)  # on the director's clock
    # Times a later waiter of its class was granted first for its cached prefix (the director's
    # affinity pass, bounded by the policy's `admission.affinity_window`).
    passed: int = field(compare=False, default=0)
    # What decides which replicas may serve it (the director's `_kind`, which it always
    # gives): waiters of one kind pass the profile's filters on the same replicas.
    kind: tuple[object, ...] = field(compare=False, default=())
    # In the queue: pushed or restored, and neither drained nor taken out since. The entry of
    # one taken out (withdrawn, evicted) stays in the heap until the next drain or compaction.
    queued: bool = field(compare=False, default=True)


class AdmissionQueue:
    def __init__(self, max_size: int, weight: Callable[[str], float]) -> None:
        self._max = max_size
        self._weight = weight
        self._heap: list[Waiter] = []
        self._left = 0  # entries in `_heap` of waiters taken out (no longer `queued`)
        self._seq = itertools.count()
        self._vtime: dict[int, float] = {}
        self._tenant_finish: dict[tuple[int, str], float] = {}
        # Per (class, tenant): (seq, next seq then, cost) of its waiters that left unserved
        # since the last drain; the tags of its waiters pushed between the two go back by the
        # cost at the next drain (those pushed later started from the finish tag given back).
        self._refunds: dict[tuple[int, str], list[tuple[int, int, float]]] = {}
        self._next_seq = 0
        self._counts: dict[int, int] = dict.fromkeys(map(int, Priority), 0)

    def __len__(self) -> int:
        return len(self._heap) - self._left

    @property
    def full(self) -> bool:
        return len(self) >= self._max

    def queued(self) -> dict[Priority, int]:
        """Waiters per priority class."""
        return {Priority(p): n for p, n in self._counts.items()}

    def waiting(self) -> Iterator[Waiter]:
        """The waiters still queued, in no particular order."""
        return (w for w in self._heap if w.queued and not w.future.done())

    def push(
        self,
        req: AdmissionRequest,
        prefix: PrefixMatches,
        enqueued_at: float,
        future: asyncio.Future[Lease],
        pool_key: tuple[str, str],
        activation: Activation | None,
        deadline: float = math.inf,
        kind: tuple[object, ...] = (),
    ) -> Waiter:
        if self.full:
            raise OverflowError(f"admission queue holds {len(self)} of {self._max}")
        prio = int(req.priority)
        start_tag = max(
            self._vtime.get(prio, 0.0), self._tenant_finish.get((prio, req.tenant), 0.0)
        )
        finish_tag = start_tag + (req.prompt_tokens + req.max_tokens) / self._weight(req.tenant)
        self._tenant_finish[(prio, req.tenant)] = finish_tag
        seq = next(self._seq)
        self._next_seq = seq + 1
        waiter = Waiter(
            prio,
            finish_tag,
            seq,
            req,
            start_tag,
            prefix,
            enqueued_at,
            future,
            pool_key,
            activation,
            deadline,
            kind=kind,
        )
        heapq.heappush(self._heap, waiter)
        self._counts[prio] += 1
        return waiter

    def withdraw(self, waiter: Waiter) -> bool:
        """Remove a waiter that is still queued; False if it already left the queue."""
        if waiter.future.done() or not waiter.queued:
            return False
        self._remove(waiter)
        self.unserved(waiter)
        waiter.future.cancel()
        return True

    def evict_newest(self, priority: Priority) -> Waiter | None:
        """Take out the newest waiter of class `priority` (load shedding: it waited least);
        the caller resolves its future. None when the class has no waiter."""
        newest: Waiter | None = None
        for w in self._heap:
            if w.priority == priority and w.queued and (newest is None or w.seq > newest.seq):
                newest = w
        if newest is not None:
            self._remove(newest)
            self.unserved(newest)
        return newest

    def unserved(self, waiter: Waiter) -> None:
        """The waiter left without being served (taken out, or refused after a drain): its
        tenant gets its cost back (see the invariants)."""
        key = (waiter.priority, waiter.request.tenant)
        cost = waiter.finish_tag - waiter.start_tag
        finish = self._tenant_finish.get(key)
        if finish is not None:
            self._tenant_finish[key] = max(finish - cost, self._vtime.get(waiter.priority, 0.0))
        self._refunds.setdefault(key, []).append((waiter.seq, self._next_seq, cost))

    def _refund(self, waiters: list[Waiter]) -> None:
        """Move back the tags of `waiters` by the costs of their tenant's earlier waiters that
        left unserved since the last drain, never below the class clock."""
        refunds, self._refunds = self._refunds, {}
        for w in waiters:
            gone = refunds.get((w.priority, w.request.tenant))
            if gone:
                back = sum(cost for seq, then, cost in gone if seq < w.seq < then)
                if back > 0:
                    cost = w.finish_tag - w.start_tag
                    w.start_tag = max(w.start_tag - back, self._vtime.get(w.priority, 0.0))
                    w.finish_tag = w.start_tag + cost

    def _remove(self, waiter: Waiter) -> None:
        """O(1) but for a compaction once most entries have left (amortized O(1)): a mass
        withdrawal (callers gone at once) costs O(queue), not O(queue) per waiter."""
        waiter.queued = False
        self._left += 1
        self._counts[waiter.priority] -= 1
        if self._left > len(self._heap) // 2:
            self._heap = [w for w in self._heap if w.queued]
            heapq.heapify(self._heap)
            self._left = 0

    def drain_in_order(self) -> list[Waiter]:
        """Take every live waiter out, in service order; the caller grants some and `restore`s
        the rest."""
        live = list(self.waiting())
        if self._refunds:
            self._refund(live)
        # Sorted on key tuples (compared in C), not by the waiters' generated __lt__.
        out = sorted(live, key=_SERVICE_ORDER)
        for w in out:
            w.queued = False
        self._heap, self._left = [], 0
        self._counts = dict.fromkeys(self._counts, 0)
        return out

    def restore(self, waiters: list[Waiter]) -> None:
        """Put back waiters taken by `drain_in_order`, in the order it gave them (any of them
        left out): into an empty queue as they are, a list in service order being a heap."""
        if self._heap:
            for w in waiters:
                heapq.heappush(self._heap, w)
        else:
            self._heap = list(waiters)
        for w in waiters:
            w.queued = True
            self._counts[w.priority] += 1

    def served(self, waiter: Waiter) -> None:
        """The waiter was granted: its class clock advances to its finish tag (self-clocked
        fair queuing). Advanced only to its start tag, the clock would stand still while every
        waiter is a tenant's first (each starts at the clock): a long request would be passed
        by every short one from a new tenant (the order is by finish tag) until its deadline,
        and no tenant would ever be forgotten (`prune`)."""
        prio = waiter.priority
        self._vtime[prio] = max(self._vtime.get(prio, 0.0), waiter.finish_tag)

    def prune(self) -> None:
        """Past `_TENANT_MEMORY` tenants, forget those whose last finish tag the class clock
        reached (they are idle and would start at the class clock anyway), and every tenant of
        a class with no waiter queued (the rest: withdrawn or evicted, never served). Not
        between `drain_in_order` and `restore`: the drained waiters count as gone."""
        if len(self._tenant_finish) > _TENANT_MEMORY:
            vtime, counts = self._vtime, self._counts
            for key in [
                k
                for k, f in self._tenant_finish.items()
                if f <= vtime.get(k[0], 0.0) or not counts[k[0]]
            ]:
                del self._tenant_finish[key]
