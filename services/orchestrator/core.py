"""Orchestrator core: bounded priority admission queue, leases, replica health, replica choice.

Invariants:
- A replica's `in_flight` equals the number of live leases on it; every lease ends exactly once
  (Complete, or reclamation after `lease_timeout_s`).
- A replica never holds more than `max_in_flight_per_replica` leases.
- A waiter leaves the queue exactly once: granted a lease, timed out, cancelled, or failed
  because no replica for its model remains healthy.
"""

from __future__ import annotations

import asyncio
import enum
import heapq
import itertools
import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from prometheus_client import Counter, Gauge, Histogram

from services.orchestrator.errors import BadAdmission, NoReplicaReady, QueueFull, QueueTimeout
from services.orchestrator.settings import OrchestratorSettings, ReplicaSpec

log = logging.getLogger(__name__)

_QUEUE_DEPTH = Gauge(
    "llmmesh_orchestrator_queue_depth", "Requests waiting for admission.", ["model"]
)
_QUEUE_WAIT = Histogram(
    "llmmesh_orchestrator_queue_wait_seconds",
    "Time from Admit to lease.",
    ["model"],
    buckets=(0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30),
)
_DECISIONS = Counter(
    "llmmesh_orchestrator_decisions_total", "Leases granted.", ["model", "replica", "pool"]
)
_REJECTIONS = Counter(
    "llmmesh_orchestrator_rejections_total", "Admissions refused.", ["model", "reason"]
)
_IN_FLIGHT = Gauge(
    "llmmesh_orchestrator_replica_in_flight", "Live leases per replica.", ["replica", "pool"]
)
_HEALTHY = Gauge(
    "llmmesh_orchestrator_replica_healthy", "1 if the replica is ready.", ["replica", "pool"]
)


class Priority(enum.IntEnum):
    INTERACTIVE = 0
    STANDARD = 1
    BATCH = 2


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


@dataclass(slots=True)
class ReplicaState:
    spec: ReplicaSpec
    healthy: bool = False
    removed: bool = False  # left the replica set; forgotten once its last lease ends
    in_flight: int = 0
    completed: int = 0
    failures: int = 0


@dataclass(frozen=True, slots=True)
class Lease:
    lease_id: str
    replica: ReplicaSpec
    queue_s: float
    granted_at: float


@dataclass(order=True)
class _Waiter:
    priority: int
    seq: int
    request: AdmissionRequest = field(compare=False)
    enqueued_at: float = field(compare=False)
    future: asyncio.Future[Lease] = field(compare=False)


class ReplicaProbe(Protocol):
    async def ready(
        self, replica: ReplicaSpec, models: Sequence[str], timeout_s: float
    ) -> bool: ...


class Orchestrator:
    def __init__(self, settings: OrchestratorSettings, probe: ReplicaProbe) -> None:
        self._settings = settings
        self._probe = probe
        self._replicas: dict[str, ReplicaState] = {r.id: ReplicaState(r) for r in settings.replicas}
        self._leases: dict[str, Lease] = {}
        self._queue: list[_Waiter] = []
        self._seq = itertools.count()
        self._drain_rate = 0.0  # completions per second, EWMA
        self._last_completion = time.monotonic()
        for st in self._replicas.values():
            _HEALTHY.labels(st.spec.id, st.spec.pool).set(0)
            _IN_FLIGHT.labels(st.spec.id, st.spec.pool).set(0)

    # -- admission --------------------------------------------------------------------------
    async def admit(self, req: AdmissionRequest, timeout_s: float | None) -> Lease:
        if not req.model:
            raise BadAdmission("must be non-empty", field="model")
        if req.max_tokens <= 0:
            raise BadAdmission("must be positive", field="max_tokens")
        start = time.monotonic()
        serving = [r for r in self._replicas.values() if req.model in r.spec.models]
        if not any(r.healthy for r in serving):
            _REJECTIONS.labels(req.model, "no_replica").inc()
            raise NoReplicaReady(f"no ready replica serves model {req.model!r}")
        if not self._queue:
            lease = self._try_grant(req, start)
            if lease is not None:
                return lease
        if len(self._queue) >= self._settings.max_queue:
            _REJECTIONS.labels(req.model, "queue_full").inc()
            raise QueueFull("admission queue is full", retry_after_s=self.retry_after_s())
        fut: asyncio.Future[Lease] = asyncio.get_running_loop().create_future()
        waiter = _Waiter(int(req.priority), next(self._seq), req, start, fut)
        heapq.heappush(self._queue, waiter)
        _QUEUE_DEPTH.labels(req.model).inc()
        wait_s = (
            self._settings.default_queue_timeout_s if timeout_s is None else max(timeout_s, 0.0)
        )
        try:
            return await asyncio.wait_for(asyncio.shield(fut), wait_s)
        except TimeoutError:
            if self._withdraw(waiter):
                _REJECTIONS.labels(req.model, "queue_timeout").inc()
                raise QueueTimeout(f"no replica slot within {wait_s:.3f}s") from None
            return fut.result()  # granted in the same tick the timer fired
        except asyncio.CancelledError:
            if (
                not self._withdraw(waiter)
                and fut.done()
                and not fut.cancelled()
                and fut.exception() is None
            ):
                self.complete(fut.result().lease_id, Outcome.CANCELLED)
            raise

    def _withdraw(self, waiter: _Waiter) -> bool:
        """Remove a waiter that is still queued; False if it already left the queue."""
        if waiter.future.done():
            return False
        self._queue.remove(waiter)
        heapq.heapify(self._queue)
        _QUEUE_DEPTH.labels(waiter.request.model).dec()
        waiter.future.cancel()
        return True

    def _pick(self, req: AdmissionRequest) -> ReplicaState | None:
        cap = self._settings.max_in_flight_per_replica
        best: ReplicaState | None = None
        for st in self._replicas.values():
            if (
                not st.healthy
                or st.removed
                or st.in_flight >= cap
                or req.model not in st.spec.models
            ):
                continue
            if best is None or (st.in_flight, st.completed) < (best.in_flight, best.completed):
                best = st
        return best

    def _try_grant(self, req: AdmissionRequest, enqueued_at: float) -> Lease | None:
        st = self._pick(req)
        if st is None:
            return None
        now = time.monotonic()
        st.in_flight += 1
        _IN_FLIGHT.labels(st.spec.id, st.spec.pool).set(st.in_flight)
        lease = Lease(uuid.uuid4().hex, st.spec, now - enqueued_at, now)
        self._leases[lease.lease_id] = lease
        _DECISIONS.labels(req.model, st.spec.id, st.spec.pool).inc()
        _QUEUE_WAIT.labels(req.model).observe(lease.queue_s)
        return lease

    def _dispatch(self) -> None:
        """Grant queued requests, highest priority first, while replicas have room."""
        blocked: list[_Waiter] = []
        while self._queue:
            waiter = heapq.heappop(self._queue)
            if waiter.future.done():
                continue
            lease = self._try_grant(waiter.request, waiter.enqueued_at)
            if lease is None:
                if not self._model_has_healthy(waiter.request.model):
                    _QUEUE_DEPTH.labels(waiter.request.model).dec()
                    _REJECTIONS.labels(waiter.request.model, "no_replica").inc()
                    waiter.future.set_exception(
                        NoReplicaReady(f"no ready replica serves model {waiter.request.model!r}")
                    )
                    continue
                blocked.append(waiter)
                continue
            _QUEUE_DEPTH.labels(waiter.request.model).dec()
            waiter.future.set_result(lease)
        for w in blocked:
            heapq.heappush(self._queue, w)

    def _model_has_healthy(self, model: str) -> bool:
        return any(
            st.healthy and not st.removed and model in st.spec.models
            for st in self._replicas.values()
        )

    def sync_replicas(self, specs: Sequence[ReplicaSpec]) -> None:
        """Make the replica set equal to `specs`: new replicas start unhealthy until probed;
        vanished ones stop receiving work and are forgotten once their last lease ends."""
        wanted = {s.id: s for s in specs}
        for rid, spec in wanted.items():
            st = self._replicas.get(rid)
            if st is None:
                self._replicas[rid] = ReplicaState(spec)
                _HEALTHY.labels(spec.id, spec.pool).set(0)
                _IN_FLIGHT.labels(spec.id, spec.pool).set(0)
                log.info("replica added", extra={"replica": rid, "address": spec.grpc_address})
            else:
                st.removed = False
                if st.spec != spec and st.in_flight == 0:
                    st.spec, st.healthy = spec, False
        for rid, st in list(self._replicas.items()):
            if rid not in wanted:
                st.removed = True
                if st.in_flight == 0:
                    del self._replicas[rid]
                    log.info("replica removed", extra={"replica": rid})
        self._dispatch()

    # -- completion -----------------------------------------------------------------------
    def complete(self, lease_id: str, outcome: Outcome) -> bool:
        lease = self._leases.pop(lease_id, None)
        if lease is None:
            return False
        st = self._replicas.get(lease.replica.id)
        if st is not None:
            st.in_flight -= 1
            st.completed += 1
            _IN_FLIGHT.labels(st.spec.id, st.spec.pool).set(st.in_flight)
            if outcome is Outcome.REPLICA_ERROR:
                st.failures += 1
                self._set_health(st, False, reason="request failed on replica")
            if st.removed and st.in_flight == 0:
                del self._replicas[st.spec.id]
        now = time.monotonic()
        gap = max(now - self._last_completion, 1e-3)
        self._drain_rate = 0.8 * self._drain_rate + 0.2 * (1.0 / gap)
        self._last_completion = now
        self._dispatch()
        return True

    def retry_after_s(self) -> float:
        """Seconds until the queue would have drained at the recent completion rate."""
        if self._drain_rate <= 0:
            return 1.0
        return min(max(len(self._queue) / self._drain_rate, 0.1), 60.0)

    # -- health ---------------------------------------------------------------------------
    def _set_health(self, st: ReplicaState, healthy: bool, *, reason: str) -> None:
        if st.healthy != healthy:
            log.warning(
                "replica health changed",
                extra={"replica": st.spec.id, "healthy": healthy, "reason": reason},
            )
        st.healthy = healthy
        _HEALTHY.labels(st.spec.id, st.spec.pool).set(1 if healthy else 0)
        # Grants to waiters when a replica comes back; fails waiters whose model lost its last one.
        self._dispatch()

    async def probe_once(self) -> None:
        async def one(st: ReplicaState) -> None:
            try:
                ok = await self._probe.ready(
                    st.spec, st.spec.models, self._settings.health_timeout_s
                )
            except Exception as exc:  # a probe failure means not ready, whatever the cause
                log.debug("probe failed", extra={"replica": st.spec.id, "error": repr(exc)})
                ok = False
            self._set_health(st, ok, reason="readiness probe")

        await asyncio.gather(*(one(st) for st in list(self._replicas.values()) if not st.removed))
        self._reclaim_expired()

    def _reclaim_expired(self) -> None:
        deadline = time.monotonic() - self._settings.lease_timeout_s
        for lease_id in [lid for lid, lease in self._leases.items() if lease.granted_at < deadline]:
            log.warning("lease reclaimed", extra={"lease_id": lease_id})
            self.complete(lease_id, Outcome.REQUEST_ERROR)

    async def run_health_loop(self) -> None:
        while True:
            await self.probe_once()
            await asyncio.sleep(self._settings.health_interval_s)

    # -- introspection --------------------------------------------------------------------
    def replicas(self) -> list[ReplicaState]:
        return [st for st in self._replicas.values() if not st.removed]

    @property
    def queue_depth(self) -> int:
        return len(self._queue)
