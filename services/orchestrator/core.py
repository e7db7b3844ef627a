"""Orchestrator core: bounded priority admission queue, leases, replica health, replica choice.

Invariants:
- A replica's `in_flight` equals the number of live leases on it; every lease ends exactly once
  (Complete, or reclamation after `lease_timeout_s`).
- A replica never holds more than `max_in_flight_per_replica` leases.
- A waiter leaves the queue exactly once: granted a lease, timed out, cancelled, or failed
  because no replica for its model remains healthy (a waiter for a scale-from-zero pool instead
  fails once its activation timeout passes with no replica ready).
- A replica is eligible iff its last readiness probe passed, it is not ejected or draining, and it
  serves the request's model, model version and a pool the prompt length fits (policy file).
- The replica set is the static list plus DNS discovery (`sync_replicas`) plus registered
  replicas (`register_replica`); discovery never removes a registered replica, and only
  `deregister_replica` does.
- Each queued request counts in `llmmesh_orchestrator_pool_queue_depth` under the pool and model
  version it was attributed to when it entered the queue, until it leaves the queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import heapq
import itertools
import logging
import math
import random
import time
import uuid
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from prometheus_client import Counter, Gauge, Histogram

from llmmesh.common.engine_metrics import EngineSample, fetch_metrics_text, parse_engine_metrics
from services.orchestrator.errors import (
    BadAdmission,
    NoReplicaReady,
    QueueFull,
    QueueTimeout,
    ReplicaConflict,
    UnknownReplica,
)
from services.orchestrator.policy import Policy, ScaleFromZeroPolicy
from services.orchestrator.prefix import NO_MATCHES, PrefixIndex, PrefixMatches
from services.orchestrator.scheduling.contracts import ReplicaView, RequestView
from services.orchestrator.scheduling.framework import Scheduler, build_profile
from services.orchestrator.scheduling.registry import default_registry
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
_PREFIX_HIT = Counter(
    "llmmesh_orchestrator_prefix_hit_blocks_total",
    "Prompt blocks cached on the chosen replica.",
    ["replica"],
)
_PROMPT_BLOCKS = Counter(
    "llmmesh_orchestrator_prompt_blocks_total", "Full prompt blocks routed.", ["replica"]
)
_POOL_QUEUE_DEPTH = Gauge(
    "llmmesh_orchestrator_pool_queue_depth",
    "Requests waiting for admission, by the pool (and model version) they would run in.",
    ["pool", "model_version"],
)
_POOL_READY = Gauge(
    "llmmesh_orchestrator_pool_ready_replicas",
    "Replicas the orchestrator routes to (ready, not ejected, not draining).",
    ["pool", "model_version"],
)
_EJECTIONS = Counter(
    "llmmesh_orchestrator_ejections_total",
    "Replicas ejected after repeated errors.",
    ["replica", "pool"],
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
    model_version: str = ""


@dataclass(slots=True)
class ReplicaState:
    spec: ReplicaSpec
    ready: bool = False  # last readiness probe passed
    removed: bool = False  # left the replica set; forgotten once its last lease ends
    draining: bool = False  # DrainReplica: no new leases
    registered: bool = False  # added by RegisterReplica; discovery leaves it alone
    in_flight: int = 0
    completed: int = 0
    failures: int = 0
    consecutive_errors: int = 0
    ejections: int = 0
    ejected_until: float = 0.0
    sample: EngineSample | None = None
    sample_at: float = 0.0

    def ejected(self, now: float) -> bool:
        return now < self.ejected_until

    def healthy(self, now: float) -> bool:
        return self.ready and not self.removed and not self.ejected(now)

    def routable(self, now: float) -> bool:
        return self.healthy(now) and not self.draining


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


@dataclass(frozen=True, slots=True)
class _Activation:
    """The scale-from-zero pool a request waits for when no replica can serve it."""

    pool: str
    timeout_s: float


@dataclass(order=True)
class _Waiter:
    priority: int
    finish_tag: float  # start-time fair queuing across tenants within the class
    seq: int
    request: AdmissionRequest = field(compare=False)
    start_tag: float = field(compare=False)
    prefix: PrefixMatches = field(compare=False)
    enqueued_at: float = field(compare=False)
    future: asyncio.Future[Lease] = field(compare=False)
    pool_key: tuple[str, str] = field(compare=False)  # (pool, model_version) it counts under
    activation: _Activation | None = field(compare=False)


@dataclass(slots=True)
class _Prediction:
    """What approximate mode needs at completion: the prompt's block hashes, and how many blocks
    the registry predicted the replica held."""

    hashes: tuple[int, ...]
    prompt_tokens: int
    predicted: int = 0


class ReplicaProbe(Protocol):
    async def ready(
        self, replica: ReplicaSpec, models: Sequence[str], timeout_s: float
    ) -> bool: ...


class Orchestrator:
    def __init__(
        self,
        settings: OrchestratorSettings,
        probe: ReplicaProbe,
        policy: Policy | None = None,
        prefix_index: PrefixIndex | None = None,
        rng: random.Random | None = None,
        fetch_metrics: Callable[[str, str, float], str] | None = None,
    ) -> None:
        self._settings = settings
        self._probe = probe
        self._policy = policy or Policy()
        self._prefix = prefix_index
        self._predictions: dict[str, _Prediction] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._scheduler = Scheduler(
            build_profile(
                settings.profile, default_registry(), self._policy.plugins, self._policy.profiles
            ),
            rng,
        )
        self._known_pools = frozenset(self._policy.pools)
        self._fetch_metrics = fetch_metrics or fetch_metrics_text
        self._vtime: dict[int, float] = {}
        self._tenant_finish: dict[tuple[int, str], float] = {}
        self._reprobes: set[asyncio.Task[None]] = set()
        self._replicas: dict[str, ReplicaState] = {r.id: ReplicaState(r) for r in settings.replicas}
        self._idle: dict[str, asyncio.Event] = {}  # set when the replica's in_flight reaches 0
        self._pool_gauge_keys: set[tuple[str, str]] = set()
        self._leases: dict[str, Lease] = {}
        self._queue: list[_Waiter] = []
        self._seq = itertools.count()
        self._drain_rate = 0.0  # completions per second, EWMA
        self._last_completion = time.monotonic()
        for st in self._replicas.values():
            _HEALTHY.labels(st.spec.id, st.spec.pool).set(0)
            _IN_FLIGHT.labels(st.spec.id, st.spec.pool).set(0)
        self._refresh_pool_gauges()

    # -- admission --------------------------------------------------------------------------
    async def admit(self, req: AdmissionRequest, timeout_s: float | None) -> Lease:
        if not req.model:
            raise BadAdmission("must be non-empty", field="model")
        if req.max_tokens <= 0:
            raise BadAdmission("must be positive", field="max_tokens")
        if self._policy.pools_for(len(req.prompt_token_ids)) == []:
            _REJECTIONS.labels(req.model, "too_long").inc()
            raise BadAdmission(
                f"{len(req.prompt_token_ids)} tokens exceed every pool's max_prompt_tokens",
                field="prompt_token_ids",
            )
        start = time.monotonic()
        prefix = NO_MATCHES
        if self._prefix is not None:
            prefix = await self._prefix.lookup(req.prompt_token_ids)
        if not self._queue:
            lease = self._try_grant(req, prefix, start)
            if lease is not None:
                return lease
        # Only a request that cannot be granted now pays for the servability check.
        candidates = self._candidates(req)
        # A request a scale-from-zero pool would serve waits for it whenever it finds no
        # replica, now or later in the queue (its last replica drained or failed).
        activation = self._activation(req)
        if not candidates and activation is None:
            _REJECTIONS.labels(req.model, "no_replica").inc()
            raise NoReplicaReady(self._unavailable_reason(req))
        if len(self._queue) >= self._settings.max_queue:
            _REJECTIONS.labels(req.model, "queue_full").inc()
            raise QueueFull("admission queue is full", retry_after_s=self.retry_after_s())
        fut: asyncio.Future[Lease] = asyncio.get_running_loop().create_future()
        prio = int(req.priority)
        start_tag = max(
            self._vtime.get(prio, 0.0), self._tenant_finish.get((prio, req.tenant), 0.0)
        )
        finish_tag = start_tag + (
            len(req.prompt_token_ids) + req.max_tokens
        ) / self._policy.admission.weight(req.tenant)
        self._tenant_finish[(prio, req.tenant)] = finish_tag
        waiter = _Waiter(
            prio,
            finish_tag,
            next(self._seq),
            req,
            start_tag,
            prefix,
            start,
            fut,
            self._attribute(req, candidates, activation),
            activation,
        )
        heapq.heappush(self._queue, waiter)
        _QUEUE_DEPTH.labels(req.model).inc()
        _POOL_QUEUE_DEPTH.labels(*waiter.pool_key).inc()
        wait_s = (
            self._settings.default_queue_timeout_s if timeout_s is None else max(timeout_s, 0.0)
        )
        try:
            left = wait_s
            # In steps of the activation timeout: at the end of each, a request that still finds
            # no replica gives up; one that finds a busy replica waits on, like any request.
            while activation is not None and activation.timeout_s < left:
                try:
                    return await asyncio.wait_for(asyncio.shield(fut), activation.timeout_s)
                except TimeoutError:
                    if not self._servable(req) and self._withdraw(waiter):
                        _REJECTIONS.labels(req.model, "activation_timeout").inc()
                        raise NoReplicaReady(
                            f"pool {activation.pool!r} has no ready replica; none became ready "
                            f"within {activation.timeout_s:g} s"
                        ) from None
                    if fut.done():
                        return fut.result()
                    left -= activation.timeout_s
            return await asyncio.wait_for(asyncio.shield(fut), left)
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

    def _unavailable_reason(self, req: AdmissionRequest) -> str:
        version = f" version {req.model_version!r}" if req.model_version else ""
        return f"no ready replica serves model {req.model!r}{version} for a {len(req.prompt_token_ids)}-token prompt"

    def _withdraw(self, waiter: _Waiter) -> bool:
        """Remove a waiter that is still queued; False if it already left the queue."""
        if waiter.future.done():
            return False
        self._queue.remove(waiter)
        heapq.heapify(self._queue)
        self._dequeued(waiter)
        waiter.future.cancel()
        return True

    @staticmethod
    def _dequeued(waiter: _Waiter) -> None:
        _QUEUE_DEPTH.labels(waiter.request.model).dec()
        _POOL_QUEUE_DEPTH.labels(*waiter.pool_key).dec()

    def _activation(self, req: AdmissionRequest) -> _Activation | None:
        """The first scale-from-zero pool (in the request's pool preference) that would serve
        the request's model and version, or None."""
        declared = self._policy.scale_from_zero
        if not declared:
            return None
        fitting = self._policy.pools_for(len(req.prompt_token_ids))
        order = list(declared) if fitting is None else fitting + list(declared)
        for pool in order:
            sfz = declared.get(pool)
            if sfz is None or (
                fitting is not None and pool in self._known_pools and pool not in fitting
            ):
                continue
            if req.model in sfz.models and req.model_version in ("", sfz.model_version):
                return _Activation(pool, sfz.activation_timeout_s)
        return None

    def _attribute(
        self,
        req: AdmissionRequest,
        candidates: Sequence[ReplicaView],
        activation: _Activation | None,
    ) -> tuple[str, str]:
        """(pool, model_version) a queued request counts under: the first eligible replica's
        pool, else the scale-from-zero pool it waits for; the request's model version when it
        names one, else that replica's (or that pool's declared) version."""
        if candidates:
            first = candidates[0]
            return first.pool, req.model_version or first.model_version
        if activation is None:
            return "", req.model_version
        sfz: ScaleFromZeroPolicy = self._policy.scale_from_zero[activation.pool]
        return activation.pool, req.model_version or sfz.model_version

    def _cap(self, st: ReplicaState, now: float) -> int:
        pool = self._policy.pools.get(st.spec.pool)
        cap = self._settings.max_in_flight_per_replica
        if pool is not None and pool.max_in_flight_per_replica is not None:
            cap = pool.max_in_flight_per_replica
        sample = self._fresh_sample(st, now)
        if sample is not None and sample.max_batch:
            cap = min(cap, max(1, math.ceil(sample.max_batch * self._policy.capacity.overcommit)))
        return cap

    def _fresh_sample(self, st: ReplicaState, now: float) -> EngineSample | None:
        if st.sample is None or now - st.sample_at > self._settings.metrics_max_age_s:
            return None
        return st.sample

    def _view(self, st: ReplicaState, now: float) -> ReplicaView:
        sample = self._fresh_sample(st, now)
        return ReplicaView(
            id=st.spec.id,
            pool=st.spec.pool,
            model_version=st.spec.model_version,
            models=tuple(st.spec.models),
            ready=st.ready,
            ejected=st.ejected(now),
            in_flight=st.in_flight,
            cap=self._cap(st, now),
            engine_active=sample.active if sample else None,
            engine_waiting=sample.waiting if sample else None,
            kv_utilization=sample.kv_utilization if sample else None,
        )

    def _request_view(self, req: AdmissionRequest, prefix: PrefixMatches) -> RequestView:
        pools = self._policy.pools_for(len(req.prompt_token_ids))
        return RequestView(
            model=req.model,
            model_version=req.model_version,
            prompt_tokens=len(req.prompt_token_ids),
            max_tokens=req.max_tokens,
            prefix_blocks=prefix.matched_blocks,
            prompt_blocks=prefix.prompt_blocks,
            pools=None if pools is None else tuple(pools),
            known_pools=self._known_pools,
        )

    def _candidates(self, req: AdmissionRequest) -> Sequence[ReplicaView]:
        """Replicas that could serve the request once load allows, preferred pool first: those
        passing the profile's filters judged without load (no leases, unknown KV use). A busy
        cluster queues; only a missing, unhealthy or unsuitable one is UNAVAILABLE (or, for a
        scale-from-zero pool, waits for activation)."""
        now = time.monotonic()
        views = [
            dataclasses.replace(self._view(st, now), in_flight=0, kv_utilization=None)
            for st in self._replicas.values()
            if not st.removed and not st.draining
        ]
        return self._scheduler.filter(self._request_view(req, NO_MATCHES), views)

    def _servable(self, req: AdmissionRequest) -> bool:
        return bool(self._candidates(req))

    def _pick(self, req: AdmissionRequest, prefix: PrefixMatches) -> ReplicaState | None:
        now = time.monotonic()
        views = [
            self._view(st, now)
            for st in self._replicas.values()
            if not st.removed and not st.draining
        ]
        decision = self._scheduler.decide(self._request_view(req, prefix), views)
        return None if decision.replica is None else self._replicas.get(decision.replica.id)

    def _try_grant(
        self, req: AdmissionRequest, prefix: PrefixMatches, enqueued_at: float
    ) -> Lease | None:
        st = self._pick(req, prefix)
        if st is None:
            return None
        now = time.monotonic()
        st.in_flight += 1
        _IN_FLIGHT.labels(st.spec.id, st.spec.pool).set(st.in_flight)
        lease = Lease(uuid.uuid4().hex, st.spec, now - enqueued_at, now)
        self._leases[lease.lease_id] = lease
        _DECISIONS.labels(req.model, st.spec.id, st.spec.pool).inc()
        _QUEUE_WAIT.labels(req.model).observe(lease.queue_s)
        if prefix.prompt_blocks:
            _PROMPT_BLOCKS.labels(st.spec.id).inc(prefix.prompt_blocks)
            _PREFIX_HIT.labels(st.spec.id).inc(prefix.matched_blocks.get(st.spec.id, 0))
        if self._prefix is not None and prefix.hashes:
            self._predictions[lease.lease_id] = _Prediction(
                prefix.hashes, len(req.prompt_token_ids)
            )
            self._background(self._record_routing(lease.lease_id, st.spec.id, prefix.hashes))
        return lease

    async def _record_routing(
        self, lease_id: str, replica_id: str, hashes: tuple[int, ...]
    ) -> None:
        """Approximate mode: the routing decision becomes predicted blocks on the replica."""
        assert self._prefix is not None
        predicted = await self._prefix.record_routing(replica_id, hashes)
        pred = self._predictions.get(lease_id)
        if pred is not None:
            pred.predicted = predicted

    def _background(self, coro: Coroutine[object, object, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _dispatch(self) -> None:
        """Grant queued requests, highest priority first, while replicas have room."""
        blocked: list[_Waiter] = []
        while self._queue:
            waiter = heapq.heappop(self._queue)
            if waiter.future.done():
                continue
            lease = self._try_grant(waiter.request, waiter.prefix, waiter.enqueued_at)
            if lease is None:
                # A waiter for a scale-from-zero pool stays until its activation timeout.
                if waiter.activation is None and not self._servable(waiter.request):
                    self._dequeued(waiter)
                    _REJECTIONS.labels(waiter.request.model, "no_replica").inc()
                    waiter.future.set_exception(
                        NoReplicaReady(self._unavailable_reason(waiter.request))
                    )
                    continue
                blocked.append(waiter)
                continue
            self._dequeued(waiter)
            self._vtime[waiter.priority] = max(
                self._vtime.get(waiter.priority, 0.0), waiter.start_tag
            )
            waiter.future.set_result(lease)
        self._prune_tenants()
        for w in blocked:
            heapq.heappush(self._queue, w)

    def _prune_tenants(self) -> None:
        """Forget tenants whose last finish tag the class clock passed: they are idle and would
        start at the class clock anyway. Keeps the map bounded by the active tenants."""
        if len(self._tenant_finish) > 4096:
            for key in [
                k for k, f in self._tenant_finish.items() if f <= self._vtime.get(k[0], 0.0)
            ]:
                del self._tenant_finish[key]

    def sync_replicas(self, specs: Sequence[ReplicaSpec]) -> None:
        """Make the non-registered replica set equal to `specs`: new replicas start unhealthy
        until probed; vanished ones stop receiving work and are forgotten once their last lease
        ends. Registered replicas are left alone (an id both registered and discovered stays
        registered)."""
        wanted = {s.id: s for s in specs}
        for rid, spec in wanted.items():
            st = self._replicas.get(rid)
            if st is not None and st.registered and not st.removed:
                continue
            if st is None:
                self._replicas[rid] = ReplicaState(spec)
                _HEALTHY.labels(spec.id, spec.pool).set(0)
                _IN_FLIGHT.labels(spec.id, spec.pool).set(0)
                log.info("replica added", extra={"replica": rid, "address": spec.grpc_address})
            else:
                st.removed = st.registered = st.draining = False
                if st.spec != spec and st.in_flight == 0:
                    st.spec, st.ready = spec, False
        for rid, st in list(self._replicas.items()):
            if rid not in wanted and not st.registered:
                if not st.removed:
                    self._drop_from_index(rid)
                st.removed = True
                if st.in_flight == 0:
                    del self._replicas[rid]
                    log.info("replica removed", extra={"replica": rid})
        self._refresh_pool_gauges()
        self._dispatch()

    # -- registered replicas (actuators) --------------------------------------------------
    async def register_replica(self, spec: ReplicaSpec) -> Registration:
        """Add (or confirm) a replica at run time and probe it once now. Idempotent;
        registering a draining replica again cancels the drain."""
        st = self._replicas.get(spec.id)
        created = st is None or st.removed
        if st is None:
            st = ReplicaState(spec, registered=True)
            self._replicas[spec.id] = st
            _HEALTHY.labels(spec.id, spec.pool).set(0)
            _IN_FLIGHT.labels(spec.id, spec.pool).set(0)
        else:
            if not st.registered and not st.removed:
                raise ReplicaConflict(
                    f"{spec.id!r} is a static or discovered replica", field="replica.id"
                )
            if st.spec != spec:
                if st.in_flight:
                    raise ReplicaConflict(
                        f"replica {spec.id!r} has {st.in_flight} live leases; drain and "
                        "deregister it before changing its spec",
                        field="replica",
                    )
                st.spec, st.ready = spec, False
            st.registered, st.removed, st.draining = True, False, False
        if created:
            log.info("replica registered", extra={"replica": spec.id, "address": spec.grpc_address})
        await self._probe_replica(st)
        self._refresh_pool_gauges()
        return Registration(ready=st.routable(time.monotonic()), created=created)

    def _live(self, replica_id: str) -> ReplicaState:
        st = self._replicas.get(replica_id)
        if st is None or st.removed:
            raise UnknownReplica(f"no replica {replica_id!r}", field="replica_id")
        return st

    async def drain_replica(self, replica_id: str, wait_s: float) -> DrainResult:
        """Stop new leases on the replica now; wait up to `wait_s` for its leases to end."""
        st = self._live(replica_id)
        if not st.draining:
            st.draining = True
            log.info("replica draining", extra={"replica": replica_id, "in_flight": st.in_flight})
            self._refresh_pool_gauges()
            self._dispatch()  # waiters it was the last replica for fail now
        if st.in_flight > 0 and wait_s > 0:
            idle = self._idle.setdefault(replica_id, asyncio.Event())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(idle.wait(), wait_s)
        return DrainResult(in_flight=st.in_flight, drained=st.in_flight == 0)

    def deregister_replica(self, replica_id: str) -> int:
        """Forget a registered replica now; returns its leases still live (they end normally)."""
        st = self._live(replica_id)
        if not st.registered:
            raise ReplicaConflict(
                f"{replica_id!r} is a static or discovered replica; it leaves by configuration",
                field="replica_id",
            )
        st.removed = True
        self._drop_from_index(replica_id)
        if st.in_flight == 0:
            del self._replicas[replica_id]
        log.info("replica deregistered", extra={"replica": replica_id, "in_flight": st.in_flight})
        self._refresh_pool_gauges()
        self._dispatch()
        return st.in_flight

    # -- completion -----------------------------------------------------------------------
    def complete(self, lease_id: str, outcome: Outcome, reused_blocks: int | None = None) -> bool:
        """Release a lease. `reused_blocks` is the engine's kv_cache_reused_blocks, given only
        when the engine ran the prompt: it corrects the registry's predictions."""
        lease = self._leases.pop(lease_id, None)
        if lease is None:
            return False
        pred = self._predictions.pop(lease_id, None)
        if pred is not None and reused_blocks is not None and self._prefix is not None:
            self._background(
                self._prefix.report_reuse(
                    lease.replica.id, pred.hashes, reused_blocks, pred.prompt_tokens, pred.predicted
                )
            )
        st = self._replicas.get(lease.replica.id)
        if st is not None:
            st.in_flight -= 1
            st.completed += 1
            _IN_FLIGHT.labels(st.spec.id, st.spec.pool).set(st.in_flight)
            if st.in_flight == 0 and (idle := self._idle.pop(st.spec.id, None)) is not None:
                idle.set()
            if outcome is Outcome.REPLICA_ERROR:
                st.failures += 1
                self._record_error(st, reason="request failed on replica")
                self._reprobe(st)
            elif outcome is Outcome.SUCCESS:
                st.consecutive_errors = 0
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
    def _record_error(self, st: ReplicaState, *, reason: str) -> None:
        """Count a failure; eject after `consecutive_errors` in a row unless the pool's ejection
        budget (`max_ejection_percent`) is spent."""
        st.consecutive_errors += 1
        hp = self._policy.health
        now = time.monotonic()
        if st.consecutive_errors < hp.consecutive_errors or st.ejected(now):
            return
        pool = [x for x in self._replicas.values() if x.spec.pool == st.spec.pool and not x.removed]
        ejected = sum(1 for x in pool if x.ejected(now))
        if (ejected + 1) * 100 > hp.max_ejection_percent * len(pool):
            log.warning(
                "ejection budget spent", extra={"replica": st.spec.id, "pool": st.spec.pool}
            )
            return
        st.ejections += 1
        st.ejected_until = now + hp.base_ejection_seconds * st.ejections
        _EJECTIONS.labels(st.spec.id, st.spec.pool).inc()
        log.warning(
            "replica ejected",
            extra={"replica": st.spec.id, "reason": reason, "for_s": st.ejected_until - now},
        )
        self._update_health_gauge(st)

    def _drop_from_index(self, replica_id: str) -> None:
        if self._prefix is not None:
            self._background(self._prefix.drop_replica(replica_id))

    def _update_health_gauge(self, st: ReplicaState) -> None:
        _HEALTHY.labels(st.spec.id, st.spec.pool).set(1 if st.healthy(time.monotonic()) else 0)
        self._refresh_pool_gauges()

    def _refresh_pool_gauges(self) -> None:
        """Routable replicas per (pool, model version); declared scale-from-zero pools and pools
        seen before report 0 when they have none."""
        now = time.monotonic()
        counts = {
            (pool, sfz.model_version): 0 for pool, sfz in self._policy.scale_from_zero.items()
        }
        counts.update(dict.fromkeys(self._pool_gauge_keys, 0))
        for st in self._replicas.values():
            if not st.removed:
                key = (st.spec.pool, st.spec.model_version)
                counts[key] = counts.get(key, 0) + (1 if st.routable(now) else 0)
        for key, n in counts.items():
            _POOL_READY.labels(*key).set(n)
        self._pool_gauge_keys = set(counts)

    def _set_ready(self, st: ReplicaState, ready: bool) -> None:
        if st.ready != ready:
            log.warning("replica readiness changed", extra={"replica": st.spec.id, "ready": ready})
            if not ready:
                self._drop_from_index(st.spec.id)  # its cache is gone or unreachable
        st.ready = ready
        if ready:
            st.consecutive_errors = 0
        else:
            self._record_error(st, reason="readiness probe failed")
        self._update_health_gauge(st)
        # Grants to waiters when a replica comes back; fails waiters that lost their last one.
        self._dispatch()

    async def _probe_replica(self, st: ReplicaState) -> None:
        try:
            ok = await self._probe.ready(st.spec, st.spec.models, self._settings.health_timeout_s)
        except Exception as exc:  # a probe failure means not ready, whatever the cause
            log.debug("probe failed", extra={"replica": st.spec.id, "error": repr(exc)})
            ok = False
        self._set_ready(st, ok)

    def _reprobe(self, st: ReplicaState) -> None:
        """Probe a replica that just failed a request now, not at the next health round."""
        task = asyncio.get_running_loop().create_task(self._probe_replica(st))
        self._reprobes.add(task)
        task.add_done_callback(self._reprobes.discard)

    async def probe_once(self) -> None:
        await asyncio.gather(
            *(self._probe_replica(st) for st in list(self._replicas.values()) if not st.removed)
        )
        self._reclaim_expired()

    def _reclaim_expired(self) -> None:
        deadline = time.monotonic() - self._settings.lease_timeout_s
        for lease_id in [lid for lid, lease in self._leases.items() if lease.granted_at < deadline]:
            log.warning("lease reclaimed", extra={"lease_id": lease_id})
            self.complete(lease_id, Outcome.REQUEST_ERROR)

    async def scrape_once(self) -> None:
        async def one(st: ReplicaState) -> None:
            try:
                text = await asyncio.to_thread(
                    self._fetch_metrics,
                    st.spec.metrics_url,
                    st.spec.metrics_host,
                    self._settings.health_timeout_s,
                )
            except OSError as exc:
                log.debug(
                    "metrics scrape failed", extra={"replica": st.spec.id, "error": repr(exc)}
                )
                return
            sample = parse_engine_metrics(text)
            if sample is not None:
                st.sample, st.sample_at = sample, time.monotonic()

        await asyncio.gather(
            *(
                one(st)
                for st in list(self._replicas.values())
                if st.spec.metrics_url and not st.removed
            )
        )
        self._dispatch()  # KV use or capacity may have changed what waiters can get

    async def run_metrics_loop(self) -> None:
        while True:
            await self.scrape_once()
            await asyncio.sleep(self._settings.metrics_interval_s)

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

    @property
    def drain_max_wait_s(self) -> float:
        return self._settings.drain_max_wait_s
