"""The director: composes the orchestrator's components into `admit`, `complete` and `tick`.

Components (each with the injected clock): the admission queue (`admission_queue.py`), the
replica set (`replicas.py`), health and the engine sampler (`health.py`), the lease table
(`leases.py`), prefix feedback (`feedback.py`), scheduling (`scheduling/`), metrics
(`metrics.py`). The director reads no clock and sleeps on no timer of its own: waits are
`asyncio` timeouts on the running loop, so a virtual-time loop runs this exact code.

Invariants:
- A replica's `in_flight` equals the number of live leases on it; every lease ends exactly once
  (Complete, or reclamation after `lease_timeout_s`).
- A replica never holds more leases than its cap (`max_in_flight_per_replica`, the pool's, or
  what the engine can start soon: `capacity.replica_cap` over its reported batch slots and KV
  blocks), counting with its own leases the load the engine reports beyond them (`_others_load`).
- An arrival that cannot be granted at once enters the queue only as `capacity.decide` allows
  (per-class limits, eviction of the newest lowest-class waiter, expected wait within the
  deadline); every refusal is QueueFull (RESOURCE_EXHAUSTED) with a retry-after
  (services/orchestrator/OVERLOAD.md).

Several orchestrators (active-active; the gateway spreads Admit over them): leases are this
process's hints, the engines' own counts (`nv_trt_llm_request_metrics` active + waiting) the
truth. A replica's load as scheduling sees it (`ReplicaView.in_flight`: cap filter and load
scorers) is this orchestrator's live leases plus what the engine's last fresh sample held beyond
the leases this orchestrator had on it at that moment: the other orchestrators' requests, and
requests whose orchestrator died (a restarted orchestrator starts from the engines' counts this
way; its own leases are gone). The consistency given up, and its bound: another orchestrator's
admissions become visible here only once they reached the engine and were sampled, i.e. within
`metrics_interval_s` + the scrape + the gateway's lease-to-stream time. Within that window each
of N orchestrators may admit into the same free slots, so a replica may hold more than its cap by
at most what the other orchestrators granted on it since the sample this one used; never more
than N x cap (each orchestrator alone keeps its own leases under the cap), which is also the
bound while samples are missing or older than `metrics_max_age_s` (others' load unknown: own
leases only). The excess waits in the engine's queue (`waiting`), it is not refused, and the
next sample corrects every orchestrator. With one orchestrator the estimate adds nothing: its
own requests reach the engine after their lease and leave it before their Complete, so the
engine never holds more than its leases except for one scrape's race, which is counted as load
until the next sample.
- Queued requests are granted in the queue's service order (a waiter no replica can take now
  does not hold back later ones that one can), but for one bounded exception, cache affinity
  while requests queue (profiles with `queue_affinity`: every built-in one but round-robin): in
  a dispatch pass, each replica with room is granted first, among the next
  `admission.affinity_window` waiters of the head's class, the one with the longest cached
  prefix there, if the profile's filters accept the replica for it. Each such grant counts a
  pass on every waiter ahead of it; the search stops at a waiter passed `affinity_window` times
  (why: OVERLOAD.md, "Cache affinity while requests queue").
- A waiter leaves the queue exactly once: granted a lease, timed out, cancelled, or failed
  because no replica for its model remains healthy (a waiter for a scale-from-zero pool instead
  fails once its activation timeout passes with no replica ready).
- A replica is eligible iff its last readiness probe passed, it is not ejected or draining, it
  serves the request's model, model version and a pool the prompt length fits (policy file),
  and the request does not exclude it (`exclude_replicas`: a replica that already failed it).
- Each queued request counts in `llmmesh_orchestrator_pool_queue_depth` under the pool and model
  version it was attributed to when it entered the queue, until it leaves the queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import time
from collections.abc import Collection, Iterable, Sequence

from llmmesh.accelerators import DEFAULT_PROFILE
from llmmesh.common.engine_metrics import EngineSample
from services.orchestrator import capacity, metrics
from services.orchestrator.admission_queue import Activation, AdmissionQueue, Waiter
from services.orchestrator.domain import (
    AdmissionRequest,
    Clock,
    DrainResult,
    Lease,
    Outcome,
    Registration,
)
from services.orchestrator.errors import (
    ActivationTimeout,
    BadAdmission,
    Busy,
    NoReplicaReady,
    QueueFull,
    QueueTimeout,
)
from services.orchestrator.feedback import PrefixFeedback
from services.orchestrator.health import (
    EngineSampler,
    FetchMetrics,
    Health,
    ReplicaProbe,
    fetch_in_thread,
    staggered,
)
from services.orchestrator.leases import LeaseTable
from services.orchestrator.load import LoadLedger
from services.orchestrator.policy import Policy
from services.orchestrator.prefix import NO_MATCHES, PrefixIndex, PrefixMatches
from services.orchestrator.replicas import ReplicaSet, ReplicaState
from services.orchestrator.scheduling.contracts import ReplicaLoad, ReplicaView, RequestView
from services.orchestrator.scheduling.framework import Scheduler, build_profile
from services.orchestrator.scheduling.registry import default_registry
from services.orchestrator.scheduling.work import WorkModel
from services.orchestrator.settings import OrchestratorSettings, ReplicaSpec
from services.orchestrator.shedding import AdmitShedder

log = logging.getLogger(__name__)


def _others(st: ReplicaState, sample: EngineSample | None) -> int:
    """Requests the engine's sample held beyond this orchestrator's leases at the time."""
    if sample is None:
        return 0
    return max(0, round(sample.active + sample.waiting) - st.sample_in_flight)


class _Caps:
    """The backlog caps requests' cached prefixes lift (`Orchestrator._lifts`, as `_exempt`
    judges them), for one state of the load ledger: the capped replicas found once, each
    (replica, prompt length, cached tokens) judged once."""

    NONE: frozenset[str] = frozenset()

    def __init__(self, core: Orchestrator) -> None:
        self._core = core
        self._capped: dict[str, ReplicaState] | None = None
        self._lifted: dict[tuple[str, int, int], bool] = {}

    def of(self, req: AdmissionRequest, prefix: PrefixMatches) -> frozenset[str]:
        """The backlog-capped replicas whose cap the request's cached prefix lifts (ones it
        does not exclude, where the prefill it saves covers the backlog's excess). O(the
        fewer of the capped replicas and those it has cached)."""
        matched = prefix.matched_blocks
        core = self._core
        if not matched or core._max_backlog_s <= 0:
            return self.NONE
        capped = self._capped
        if capped is None:
            capped = self._capped = {
                st.spec.id: st for st in core._replicas.assignable() if core._backlogged(st)
            }
        if not capped:
            return self.NONE
        prompt = req.prompt_tokens
        out: list[str] = []
        for rid in capped if len(capped) < len(matched) else matched:
            st = capped.get(rid)
            if st is None or rid not in matched or rid in req.exclude_replicas:
                continue
            cached = prefix.cached_tokens(rid, prompt)
            if not cached:
                continue
            key = (rid, prompt, cached)
            ok = self._lifted.get(key)
            if ok is None:
                ok = self._lifted[key] = core._lifts(st, prompt, cached)
            if ok:
                out.append(rid)
        return frozenset(out) if out else self.NONE


class Orchestrator:
    def __init__(
        self,
        settings: OrchestratorSettings,
        probe: ReplicaProbe,
        policy: Policy | None = None,
        prefix_index: PrefixIndex | None = None,
        rng: random.Random | None = None,
        fetch_metrics: FetchMetrics | None = None,
        clock: Clock = time.monotonic,
        kv_block_size: int | None = None,
    ) -> None:
        """`fetch_metrics`: the engines' metrics pages (default: urllib in a worker thread).
        `kv_block_size`: the engines' tokens per KV block, with which the load ledger models
        KV admission from their reported blocks (None: it does not)."""
        self._settings = settings
        self._policy = policy or Policy()
        self._clock = clock
        self._scheduler = Scheduler(
            build_profile(
                settings.profile,
                default_registry(settings.engine_time_scale),
                self._policy.plugins,
                self._policy.profiles,
            ),
            rng,
        )
        self._known_pools = frozenset(self._policy.pools)
        self._queue = AdmissionQueue(settings.max_queue, self._policy.admission.weight)
        self._limits = capacity.QueueLimits.of(
            settings.max_queue, settings.queue_share_standard, settings.queue_share_batch
        )
        self._service = capacity.ServiceTime()
        # Live per-replica work (load.py): every grant and completion, corrected by samples.
        # The engine model of the profile's scorer (one cost profile for both), else the default.
        work = self._scheduler.work_model or WorkModel.named(
            DEFAULT_PROFILE, time_scale=settings.engine_time_scale
        )
        self._load = LoadLedger(clock, work, kv_block_size)
        # A replica's accounting goes with its state (not while leases it granted still run).
        self._replicas = ReplicaSet(settings.replicas, forgotten=self._load.drop_replica)
        self._health = Health(
            self._policy.health, self._replicas, probe, settings.health_timeout_s, clock
        )
        self._sampler = EngineSampler(
            fetch_metrics or fetch_in_thread,
            settings.health_timeout_s,
            settings.metrics_max_age_s,
            clock,
            gauge_period_s=settings.engine_gauge_period_s,
        )
        self._leases = LeaseTable(settings.lease_timeout_s, clock)
        self._feedback = PrefixFeedback(prefix_index)
        # Its own draws: the scheduler's sequence (and so a simulation's) does not depend on it.
        self._shedder = AdmitShedder(
            settings.shed_sojourn_s, settings.shed_window_s, settings.shed_after_s
        )
        # The re-probe running per replica id, and those of them failed again meanwhile.
        self._reprobes: dict[str, asyncio.Task[None]] = {}
        self._reprobe_again: set[str] = set()
        self._max_backlog_s = (
            self._policy.capacity.max_prefill_backlog_s * settings.engine_time_scale
        )
        # The pending re-dispatch for when a backlog-capped replica takes leases again.
        self._backlog_wake: asyncio.TimerHandle | None = None
        # Set once the first health round ended: until then "no replica" may only mean "not
        # probed yet" (a restarted orchestrator serves before its first round completes).
        self._probed = asyncio.Event()
        self._pool_gauge_keys: set[tuple[str, str]] = set()
        self._refresh_pool_gauges()

    # -- admission --------------------------------------------------------------------------
    async def admit(self, req: AdmissionRequest, timeout_s: float | None) -> Lease:
        if not req.model:
            raise BadAdmission("must be non-empty", field="model")
        if req.max_tokens <= 0:
            raise BadAdmission("must be positive", field="max_tokens")
        if timeout_s is not None and timeout_s <= 0:
            # Its caller has given up: a lease granted now would reach no one.
            metrics.record_rejection(req.model, "queue_timeout")
            raise QueueTimeout("the call's deadline passed before its admission began")
        if self._policy.pools_for(req.prompt_tokens) == []:
            metrics.record_rejection(req.model, "too_long")
            raise BadAdmission(
                f"{req.prompt_tokens} tokens exceed every pool's max_prompt_tokens",
                field="prompt_token_ids" if req.prompt_length is None else "prompt_tokens",
            )
        if self._shedder.refuses(req.priority):
            metrics.record_rejection(req.model, "busy")
            raise Busy(
                f"orchestrator is behind on its calls (last wait "
                f"{self._shedder.last_sojourn_s * 1000:.0f} ms); "
                f"{req.priority.name.lower()} requests are being shed",
                retry_after_s=self._settings.shed_retry_after_s,
            )
        start = self._clock()
        prefix = await self._feedback.lookup(
            req.prompt_token_ids, self._choosable(start), req.prompt_hashes
        )
        lease = self._grant_now(req, prefix, start)
        if lease is not None:
            return lease
        # Only a request that cannot be granted now pays for the servability check.
        candidates = self._candidates(req)
        if (
            not candidates
            and not self._probed.is_set()
            and any(not st.probed for st in self._assignable(req))
        ):
            # Just started: wait for the first health round rather than refuse (bounded, and
            # within the call's deadline).
            wait_s = self._settings.health_timeout_s
            if timeout_s is not None:
                wait_s = min(wait_s, timeout_s - (self._clock() - start))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._probed.wait(), max(wait_s, 0.0))
            if timeout_s is not None and self._clock() - start >= timeout_s:
                metrics.record_rejection(req.model, "queue_timeout")
                raise QueueTimeout("the call's deadline passed waiting for the first health round")
            lease = self._grant_now(req, prefix, start)
            if lease is not None:
                return lease
            candidates = self._candidates(req)
        # A request a scale-from-zero pool would serve waits for it whenever it finds no
        # replica, now or later in the queue (its last replica drained or failed).
        activation = self._activation(req)
        if not candidates and activation is None:
            metrics.record_rejection(req.model, "no_replica")
            raise self._no_replica(req)
        # The caller's deadline counts from the Admit's start (the lookup, the first health
        # round's wait); the default wait counts from here.
        wait_s = (
            self._settings.default_queue_timeout_s
            if timeout_s is None
            else timeout_s - (self._clock() - start)
        )
        if wait_s <= 0:
            metrics.record_rejection(req.model, "queue_timeout")
            raise QueueTimeout("the call's deadline passed during its admission")
        self._enter_queue(req, wait_s)
        fut: asyncio.Future[Lease] = asyncio.get_running_loop().create_future()
        waiter = self._queue.push(
            req,
            prefix,
            start,
            fut,
            self._attribute(req, candidates, activation),
            activation,
            self._clock() + wait_s,
            kind=self._kind(req),
        )
        metrics.record_enqueued(req.model, waiter.pool_key)
        self._wake_for_backlog()
        return await self._wait(waiter, wait_s)

    def _no_replica(self, req: AdmissionRequest) -> NoReplicaReady:
        """UNAVAILABLE for a request no replica can serve, with a retry-after of one health
        round: the next may find one back (restarted, out of ejection) or newly registered."""
        return NoReplicaReady(
            self._unavailable_reason(req), retry_after_s=self._settings.health_interval_s
        )

    def _choosable(self, now: float) -> list[str]:
        """The replicas a decision may choose now: the prefix index answers from its copy of
        the registry's exact index only when it holds the whole truth for each. One removed,
        draining, ejected or not ready (its blocks dropped from the registry: no longer exact
        there) would send every lookup to the registry while it stays in the set."""
        return [st.spec.id for st in self._replicas.live() if st.routable(now)]

    def _grant_now(
        self, req: AdmissionRequest, prefix: PrefixMatches, start: float
    ) -> Lease | None:
        """The request's lease now, if a decision finds room for it and no queued request
        could take that room. With a queue, it is decided for only where no waiter could be
        granted a replica with room it can use (`_awaited`): a waiter that could takes the
        room first, at the next event's pass in service order (where this request, queued,
        takes its place too). So a request the waiters cannot use the room of (another model,
        version or pool, replicas they exclude, a cap only its cached prefix lifts) is granted
        now, not at the next unrelated event, nor refused for a queue it need not wait in.
        Each waiter is judged as things stand: room a waiter would get only once another's
        grant makes a pool lend (room that opened with no event) can go to the request."""
        if not len(self._queue):
            return self._try_grant(req, prefix, start)
        now = self._clock()
        states = list(self._replicas.assignable())
        views = [self._view(st, now) for st in states]
        kept = self._kept(req, prefix, states, views, now)
        free = {v.id for v in kept if v.in_flight < v.cap}
        if not free or self._awaited(free, states, views, now):
            return None
        # Judging the waiters changed nothing: the decision is among the replicas kept.
        return self._try_grant(req, prefix, start, kept)

    def _awaited(
        self,
        free: set[str],
        states: Sequence[ReplicaState],
        views: Sequence[ReplicaView],
        now: float,
    ) -> bool:
        """Whether a queued request could be granted one of the replicas `free` (ids): one
        the profile's filters keep for it (`_kept`, judged over every assignable replica's
        view) and that has room for it, the backlog caps its cached prefix lifts there lifted.
        Judged once per kind of waiter and set of `free` replicas whose cap its prefix lifts,
        stopping at the first that could: O(queue) plus O(replicas) per such group. (A cap it
        lifts elsewhere, which could change whether a pool lends, is not told apart.)"""
        caps = _Caps(self)
        judged: set[tuple[tuple[object, ...], frozenset[str]]] = set()
        for w in self._queue.waiting():
            lifted = caps.of(w.request, w.prefix)
            if lifted:
                lifted &= free
            key = (w.kind, lifted)
            if key in judged:
                continue
            judged.add(key)
            prefix = w.prefix if lifted else NO_MATCHES
            for v in self._kept(w.request, prefix, states, views, now):
                if v.id in free and v.in_flight < v.cap:
                    return True
        return False

    def _kept(
        self,
        req: AdmissionRequest,
        prefix: PrefixMatches,
        states: Sequence[ReplicaState],
        views: Sequence[ReplicaView],
        now: float,
    ) -> Sequence[ReplicaView]:
        """The replicas the profile's filters keep for the request, at capacity or not, judged
        among every assignable replica (`states`, their `views`) as a decision (`_pick`)
        judges them (`_judged`). Filters judge a replica among the others (the pool filter
        lends by the pools' utilization), so one is never judged alone."""
        judged = self._judged(req, prefix, states, views, now)
        return self._scheduler.filter(self._request_view(req, prefix), judged)

    def _judged(
        self,
        req: AdmissionRequest,
        prefix: PrefixMatches,
        states: Sequence[ReplicaState],
        views: Sequence[ReplicaView],
        now: float,
    ) -> Sequence[ReplicaView]:
        """The `views` the profile's filters judge for the request: less the replicas it
        excludes, with the backlog caps its cached prefix lifts lifted (`_exempt`)."""
        excluded = req.exclude_replicas
        if excluded:
            kept = [i for i, st in enumerate(states) if st.spec.id not in excluded]
            states = [states[i] for i in kept]
            views = [views[i] for i in kept]
        if prefix.matched_blocks and self._max_backlog_s > 0:
            views = self._exempt(req, prefix, states, views, now)
        return views

    def _kind(self, req: AdmissionRequest) -> tuple[object, ...]:
        """What decides which replicas may serve a request: what the profile's filters judge it
        by (`Filter`: model, version, pools) and the replicas it excludes. Requests of one kind
        pass the filters on the same replicas under the same caps; only the backlog caps a
        cached prefix lifts (`_exempt`) tell them apart (a lifted cap can also change a pool's
        lending)."""
        pools = self._policy.pools_for(req.prompt_tokens)
        return (
            req.model,
            req.model_version,
            None if pools is None else tuple(pools),
            req.exclude_replicas,
        )

    def _enter_queue(self, req: AdmissionRequest, wait_s: float) -> None:
        """Make room for `req` in the queue or refuse it (`capacity.decide`): QueueFull with a
        retry-after when its class's limit is reached and no lower-class waiter can be shed,
        or when its expected wait exceeds `wait_s`; a shed waiter gets QueueFull too."""
        outlook = self._outlook()
        decision = capacity.decide(
            req.priority, self._queue.queued(), self._limits, outlook, wait_s
        )
        verdict = decision.verdict
        if verdict is capacity.Verdict.QUEUE_FULL:
            metrics.record_rejection(req.model, "queue_full")
            raise QueueFull(
                f"admission queue is full for {req.priority.name.lower()} requests",
                retry_after_s=decision.retry_after_s,
            )
        if verdict is capacity.Verdict.DEADLINE:
            metrics.record_rejection(req.model, "expected_wait")
            raise QueueFull(
                f"expected time to first token {decision.expected_wait_s or 0.0:.3f}s exceeds "
                f"{capacity.DEADLINE_SHARE:.0%} of the admission deadline ({wait_s:.3f}s)",
                retry_after_s=decision.retry_after_s,
            )
        if verdict is capacity.Verdict.EVICT_AND_ENQUEUE and decision.victim_priority is not None:
            victim = self._queue.evict_newest(decision.victim_priority)
            if victim is not None:
                metrics.record_dequeued(victim.request.model, victim.pool_key)
                metrics.record_rejection(victim.request.model, "shed")
                ahead = sum(n for p, n in self._queue.queued().items() if p <= victim.priority)
                victim.future.set_exception(
                    QueueFull(
                        f"shed from the admission queue for a {req.priority.name.lower()} request",
                        retry_after_s=outlook.retry_after_s(ahead + 1),
                    )
                )

    async def _wait(self, waiter: Waiter, wait_s: float) -> Lease:
        req, fut, activation = waiter.request, waiter.future, waiter.activation
        try:
            left = wait_s
            # In steps of the activation timeout: at the end of each, a request that still finds
            # no replica gives up; one that finds a busy replica waits on, like any request.
            lease: Lease | None = None
            while lease is None and activation is not None and activation.timeout_s < left:
                try:
                    lease = await asyncio.wait_for(asyncio.shield(fut), activation.timeout_s)
                except TimeoutError:
                    if not self._servable(req) and self._withdraw(waiter):
                        metrics.record_rejection(req.model, "activation_timeout")
                        raise ActivationTimeout(
                            f"pool {activation.pool!r} has no ready replica; none became ready "
                            f"within {activation.timeout_s:g} s",
                            # One health round: the next may find one of its replicas ready.
                            retry_after_s=self._settings.health_interval_s,
                        ) from None
                    if fut.done():
                        lease = fut.result()
                    left -= activation.timeout_s
            if lease is None:
                lease = await asyncio.wait_for(asyncio.shield(fut), left)
        except TimeoutError:
            if self._withdraw(waiter):
                metrics.record_rejection(req.model, "queue_timeout")
                raise QueueTimeout(f"no replica slot within {wait_s:.3f}s") from None
            lease = fut.result()  # granted in the same tick the timer fired
        except asyncio.CancelledError:
            if (
                not self._withdraw(waiter)
                and fut.done()
                and not fut.cancelled()
                and fut.exception() is None
            ):
                self.complete(fut.result().lease_id, Outcome.CANCELLED)
            raise
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            # Cancelled in the tick the lease was granted: `wait_for` (3.11) returned the
            # lease and dropped the cancellation. No one takes the lease: released, cancelled.
            self.complete(lease.lease_id, Outcome.CANCELLED)
            raise asyncio.CancelledError
        return lease

    def _unavailable_reason(self, req: AdmissionRequest) -> str:
        version = f" version {req.model_version!r}" if req.model_version else ""
        excluded = (
            f" (excluding {', '.join(sorted(req.exclude_replicas))})"
            if req.exclude_replicas
            else ""
        )
        return f"no ready replica serves model {req.model!r}{version} for a {req.prompt_tokens}-token prompt{excluded}"

    def _withdraw(self, waiter: Waiter) -> bool:
        """Remove a waiter that is still queued; False if it already left the queue."""
        if not self._queue.withdraw(waiter):
            return False
        metrics.record_dequeued(waiter.request.model, waiter.pool_key)
        return True

    def _activation(self, req: AdmissionRequest) -> Activation | None:
        """The first scale-from-zero pool (in the request's pool preference) that would serve
        the request's model and version, or None."""
        declared = self._policy.scale_from_zero
        if not declared:
            return None
        fitting = self._policy.pools_for(req.prompt_tokens)
        order = list(declared) if fitting is None else fitting + list(declared)
        for pool in order:
            sfz = declared.get(pool)
            if sfz is None or (
                fitting is not None and pool in self._known_pools and pool not in fitting
            ):
                continue
            if req.model in sfz.models and req.model_version in ("", sfz.model_version):
                return Activation(pool, sfz.activation_timeout_s)
        return None

    def _attribute(
        self,
        req: AdmissionRequest,
        candidates: Sequence[ReplicaView],
        activation: Activation | None,
    ) -> tuple[str, str]:
        """(pool, model_version) a queued request counts under: the first eligible replica's
        pool, else the scale-from-zero pool it waits for; the request's model version when it
        names one, else that replica's (or that pool's declared) version."""
        if candidates:
            first = candidates[0]
            return first.pool, req.model_version or first.model_version
        if activation is None:
            return "", req.model_version
        sfz = self._policy.scale_from_zero[activation.pool]
        return activation.pool, req.model_version or sfz.model_version

    # -- scheduling views ---------------------------------------------------------------------
    def _configured_cap(self, st: ReplicaState) -> int:
        pool = self._policy.pools.get(st.spec.pool)
        if pool is not None and pool.max_in_flight_per_replica is not None:
            return pool.max_in_flight_per_replica
        return self._settings.max_in_flight_per_replica

    def _slots(self, st: ReplicaState, now: float) -> int:
        """Sequences the replica runs at once (`capacity.engine_slots`)."""
        return capacity.engine_slots(
            self._configured_cap(st),
            self._sampler.fresh(st, now),
            self._load.unique_share(st.spec.id),
        )

    def _cap(self, st: ReplicaState, now: float) -> int:
        """The configured cap, and below it what the engine can start soon."""
        return self._cap_of(st, self._sampler.fresh(st, now), now)

    def _cap_of(
        self,
        st: ReplicaState,
        sample: EngineSample | None,
        now: float,
        *,
        bounded: bool = True,
        load: ReplicaLoad | None = None,
    ) -> int:
        """`_cap` given the replica's fresh sample (or None); 0 over the backlog bound unless
        not `bounded`. The configured cap is kept per replica until its spec changes. `load`:
        the replica's load now, when the caller has it."""
        if st.cap_spec is not st.spec:
            st.configured_cap = self._configured_cap(st)
            st.cap_spec = st.spec
        if bounded and self._backlogged(st, load=load):
            return 0
        if sample is None:
            return st.configured_cap
        slots = capacity.engine_slots(
            st.configured_cap, sample, self._load.unique_share(st.spec.id)
        )
        ending = capacity.ending_soon(
            st.lease_starts, now, self._settings.start_soon_s, self._service.mean_s
        )
        return min(
            st.configured_cap,
            capacity.replica_cap(slots, self._policy.capacity.overcommit, ending),
        )

    def _backlogged(
        self, st: ReplicaState, saved_s: float = 0.0, *, load: ReplicaLoad | None = None
    ) -> bool:
        """Its modelled prefill backlog exceeds `capacity.max_prefill_backlog_s` (plus the
        prefill time a request's cached prefix saves there, `saved_s`): no new lease."""
        bound = self._max_backlog_s
        if bound <= 0:
            return False
        if load is None:
            load = self._load.load(st.spec.id)
        return load.prefill_s > bound + saved_s

    def _lifts(
        self, st: ReplicaState, prompt: int, cached: int, *, load: ReplicaLoad | None = None
    ) -> bool:
        """The prefill that `cached` of a `prompt`-token prompt's tokens save on the replica
        covers its backlog's excess over the bound: its backlog cap lets that request go."""
        return not self._backlogged(st, self._load.saved_s(st.spec.id, prompt, cached), load=load)

    def _exempt(
        self,
        req: AdmissionRequest,
        prefix: PrefixMatches,
        states: Sequence[ReplicaState],
        views: Sequence[ReplicaView],
        now: float,
    ) -> Sequence[ReplicaView]:
        """The views (`views` itself when none changes) with each backlog-capped replica's cap
        restored for this request where its
        cached prefix there saves at least the backlog's excess over the bound: the request
        reaches its first token there no later than behind a backlog at the bound with no
        cache, so the bound (which stops pile-ups of work any replica could do) lets go."""
        prompt = req.prompt_tokens
        out: list[ReplicaView] | None = None  # a copy, once a view changes
        for i, st in enumerate(states):
            cached = prefix.cached_tokens(st.spec.id, prompt)
            # Only a replica capped by its backlog alone (another cap is not the bound's).
            load = views[i].load
            if not cached or views[i].cap > 0 or not self._backlogged(st, load=load):
                continue
            if not self._lifts(st, prompt, cached, load=load):
                continue
            cap = self._cap_of(st, self._sampler.fresh(st, now), now, bounded=False)
            if out is None:
                out = list(views)
            out[i] = dataclasses.replace(views[i], cap=cap)
        return views if out is None else out

    def _wake_for_backlog(self) -> None:
        """With waiters queued, dispatch again when the soonest backlog-capped replica's backlog
        falls under the bound (nothing else would: no lease ends, no sample arrives for it)."""
        bound = self._max_backlog_s
        if bound <= 0 or not len(self._queue):
            return
        ledger = self._load
        over = [
            # No earlier than the estimate it read is made again: it would read the same one.
            max(excess, ledger.estimated_for_s(st.spec.id))
            for st in self._replicas.assignable()
            if (excess := ledger.load(st.spec.id).prefill_s - bound) > 0
        ]
        due_in = min(over, default=None)
        if due_in is None:
            return
        loop = asyncio.get_running_loop()
        due = loop.time() + due_in + 1e-3
        wake = self._backlog_wake
        if wake is not None:
            if wake.when() <= due:
                return
            wake.cancel()
        self._backlog_wake = loop.call_at(due, self._on_wake)

    def _on_wake(self) -> None:
        self._backlog_wake = None
        self._dispatch()

    def _others_load(self, st: ReplicaState, now: float) -> int:
        """Requests the engine's fresh sample held beyond this orchestrator's leases at the
        time (other orchestrators', or a dead one's); 0 without a fresh sample."""
        return _others(st, self._sampler.fresh(st, now))

    def _view_key(self, st: ReplicaState, now: float) -> tuple[object, ...]:
        """What a view is built from that an event changes: spec, sample, leases, readiness,
        ejection, failures, the load ledger's accounting (`LoadLedger.stamp`), and the leases
        expected to end soon (they raise the cap; time and the mean service time move them)."""
        return (
            st.spec,
            st.sample,
            st.sample_at,
            st.sample_in_flight,
            st.in_flight,
            st.ready,
            st.ejected_until,
            st.failed_outcomes,
            self._load.stamp(st.spec.id),
            capacity.ending_soon(
                st.lease_starts, now, self._settings.start_soon_s, self._service.mean_s
            ),
        )

    def _view(self, st: ReplicaState, now: float) -> ReplicaView:
        """The replica as scheduling sees it now. A view is an immutable snapshot; it stands
        while its key (`_view_key`: what events change, and the leases ending soon) is unchanged,
        until the first time-driven change it may show: its load estimate's end
        (`LoadLedger.stands_until`: one engine step with leases; an idle replica's never ends),
        its engine sample's freshness, its ejection, its oldest outcome leaving the failure
        window. A replica nothing happened to then costs no work per decision. Built again, the
        last view is still returned while everything it shows is unchanged (same spec, sample
        and load objects, equal counts and flags)."""
        v = st.view
        if (
            v is not None
            and st.view_at <= now < st.view_until
            and st.view_key == self._view_key(st, now)
        ):
            return v
        v = self._build_view(st, now)
        st.view_key = self._view_key(st, now)
        st.view_at = now
        until = self._load.stands_until(st.spec.id)
        if v.engine_active is not None:
            until = min(until, self._sampler.fresh_until(st))
        if v.ejected:
            until = min(until, st.ejected_until)
        if v.recent_failures:
            until = min(until, self._health.window_moves_at(st))
        st.view_until = until
        return v

    def _build_view(self, st: ReplicaState, now: float) -> ReplicaView:
        """`_view` built from its inputs now (the last view when it shows the same)."""
        sample = self._sampler.fresh(st, now)
        if sample is not None and st.observed_at != st.sample_at:
            self._load.observe(
                st.spec.id,
                sample.active,
                sample.waiting,
                st.sample_in_flight,
                st.sample_at,
                sample.kv_max,
            )
            st.observed_at = st.sample_at
        in_flight = st.in_flight + _others(st, sample)
        load = self._load.load(st.spec.id)  # once per view: the backlog bound reads it too
        cap = self._cap_of(st, sample, now, load=load)
        ejected = st.ejected(now)
        failures = self._health.recent_failures(st, now)
        v = st.view
        if (
            v is not None
            and v.load is load
            and st.view_sample is sample
            and st.view_spec is st.spec
            and v.in_flight == in_flight
            and v.cap == cap
            and v.ready == st.ready
            and v.ejected == ejected
            and v.recent_failures == failures
        ):
            return v
        spec = st.spec
        v = ReplicaView(
            id=spec.id,
            pool=spec.pool,
            model_version=spec.model_version,
            models=tuple(spec.models),
            ready=st.ready,
            ejected=ejected,
            in_flight=in_flight,
            cap=cap,
            engine_active=sample.active if sample else None,
            engine_waiting=sample.waiting if sample else None,
            kv_utilization=sample.kv_utilization if sample else None,
            recent_failures=failures,
            load=load,
        )
        st.view, st.view_sample, st.view_spec = v, sample, spec
        return v

    def _request_view(self, req: AdmissionRequest, prefix: PrefixMatches) -> RequestView:
        pools = self._policy.pools_for(req.prompt_tokens)
        return RequestView(
            model=req.model,
            model_version=req.model_version,
            prompt_tokens=req.prompt_tokens,
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
        now = self._clock()
        return self._scheduler.filter(
            self._request_view(req, NO_MATCHES),
            [self._unloaded(st, now) for st in self._assignable(req)],
        )

    def _unloaded(self, st: ReplicaState, now: float) -> ReplicaView:
        """The replica's view with no leases and unknown KV use (`in_flight` 0, `kv_utilization`
        None; cap and load kept), for `_candidates`: made again only when its view is (each
        Admit not granted at once, and each pass's servability check per kind, asks for every
        replica's)."""
        v = self._view(st, now)
        if st.unloaded is None or st.unloaded_of is not v:
            st.unloaded = dataclasses.replace(v, in_flight=0, kv_utilization=None)
            st.unloaded_of = v
        return st.unloaded

    def _assignable(self, req: AdmissionRequest) -> list[ReplicaState]:
        """The replica set's assignable replicas, less those the request excludes."""
        excluded = req.exclude_replicas
        return [st for st in self._replicas.assignable() if st.spec.id not in excluded]

    def _servable(self, req: AdmissionRequest) -> bool:
        return bool(self._candidates(req))

    def _pick(
        self,
        req: AdmissionRequest,
        prefix: PrefixMatches,
        kept: Sequence[ReplicaView] | None = None,
    ) -> ReplicaState | None:
        """The scheduler's choice for the request among the assignable replicas; `kept`: the
        replicas the profile's filters keep for it (`_kept`), when the caller judged them now."""
        rv = self._request_view(req, prefix)
        if kept is None:
            now = self._clock()
            states = self._assignable(req)
            views = [self._view(st, now) for st in states]
            decision = self._scheduler.decide(rv, self._judged(req, prefix, states, views, now))
        else:
            decision = self._scheduler.choose(rv, kept)
        return None if decision.replica is None else self._replicas.get(decision.replica.id)

    def _try_grant(
        self,
        req: AdmissionRequest,
        prefix: PrefixMatches,
        enqueued_at: float,
        kept: Sequence[ReplicaView] | None = None,
    ) -> Lease | None:
        st = self._pick(req, prefix, kept)
        return None if st is None else self._grant(req, prefix, enqueued_at, st)

    def _grant(
        self, req: AdmissionRequest, prefix: PrefixMatches, enqueued_at: float, st: ReplicaState
    ) -> Lease:
        lease = self._leases.grant(st.spec, enqueued_at)
        self._replicas.acquire(st, lease.granted_at)
        metrics.record_grant(
            req.model,
            st.spec.id,
            st.spec.pool,
            lease.queue_s,
            prefix.prompt_blocks,
            prefix.registered_blocks(st.spec.id),
        )
        self._feedback.routed(lease.lease_id, st.spec.id, prefix, req.prompt_tokens)
        prompt = req.prompt_tokens
        cached = prefix.cached_tokens(st.spec.id, prompt)
        self._load.grant(
            lease.lease_id,
            st.spec.id,
            prompt,
            cached,
            req.max_tokens,
            held_tokens=prefix.registered_tokens(st.spec.id, prompt),
            prefix_key=prefix.hashes[0] if len(prefix.hashes) else None,
        )
        return lease

    def _dispatch(self) -> None:
        """Grant queued requests, highest priority first, while replicas have room."""
        waiters = self._queue.drain_in_order()
        if not waiters:  # every completion comes here, mostly to an empty queue
            self._queue.prune()
            return
        blocked: list[Waiter] = []
        # Some of what the pass learns holds only while the load ledger is unchanged (a grant
        # changes it, and so may any view the pass builds, applying an engine sample stored
        # since): whether some replica has room (`room_known`); which replicas are capped by
        # their backlog, and which of those caps a waiter's cached prefix lifts (`_exempt`);
        # the kinds of waiter (`_kind`) with the caps they lift that a decision found no room
        # for (another such waiter would find none either: the filters judge its kind, the
        # cap filter those caps). Once no replica has room (`_has_room`, which lifts no cap),
        # only a waiter whose prefix lifts a cap is decided for: no other grant follows, and
        # an applied sample only lengthens a backlog. So the pass grants what one deciding for
        # each waiter in turn would. Each waiter not granted, but one waiting for a
        # scale-from-zero pool, is checked to still have a replica, once per kind. A long
        # queue costs the pass O(queue) plus a decision per kind, set of lifted caps and
        # ledger change (and `_Caps.of`, O(the fewer of the capped replicas and those it has
        # cached), for each waiter with a cached prefix while a backlog caps some replica),
        # not a decision per waiter: waiters for a full pool would otherwise cost one each at
        # every event while another pool has room.
        room = True
        room_known = False  # `room` computed with the ledger as it is
        # (kind, caps lifted) a decision found no room for
        failed: set[tuple[tuple[object, ...], frozenset[str]]] = set()
        caps = _Caps(self)  # the caps prefixes lift, with the ledger as it is
        servable: dict[tuple[object, ...], bool] = {}
        stamps = self._load.stamps
        seen = stamps.last

        def forget() -> None:
            """The ledger changed: forget what depends on it (whether some replica has room,
            the capped replicas and the caps prefixes lift, the failed kinds). Servability
            (judged without load) and a False `room` stand."""
            nonlocal seen, room_known, caps
            seen = stamps.last
            room_known, caps = False, _Caps(self)
            failed.clear()

        def decide(
            req: AdmissionRequest,
            prefix: PrefixMatches,
            enqueued_at: float,
            kind: tuple[object, ...],
        ) -> Lease | None:
            """A decision for the request, unless the pass knows it would find no room."""
            if stamps.last != seen:
                forget()
            lifted = caps.of(req, prefix)
            if not (room or lifted) or (kind, lifted) in failed:
                return None
            lease = self._try_grant(req, prefix, enqueued_at)
            if lease is None:
                if stamps.last != seen:
                    forget()  # its views applied samples: it found no room with them
                    lifted = caps.of(req, prefix)
                failed.add((kind, lifted))
            return lease

        def settle(waiter: Waiter) -> None:
            """Decide for a waiter: granted, refused (no replica will serve it) or blocked."""
            nonlocal room, room_known
            req = waiter.request
            kind = waiter.kind
            lease = decide(req, waiter.prefix, waiter.enqueued_at, kind)
            if lease is not None:
                self._hand_over(waiter, lease)
                return
            # A waiter for a scale-from-zero pool stays until its activation timeout.
            if waiter.activation is None:
                ok = servable.get(kind)
                if ok is None:
                    ok = servable[kind] = self._servable(req)
                    if stamps.last != seen:
                        forget()  # its views applied samples
                if not ok:
                    metrics.record_dequeued(req.model, waiter.pool_key)
                    metrics.record_rejection(req.model, "no_replica")
                    self._queue.unserved(waiter)
                    waiter.future.set_exception(self._no_replica(req))
                    return
            blocked.append(waiter)
            # `seen` is current here: nothing since the last check changes the ledger.
            if room and not room_known:
                room, room_known = self._has_room(), True

        restored = False
        try:
            order = waiters
            window = self._policy.admission.affinity_window
            if window > 0 and len(waiters) > 1 and self._scheduler.profile.queue_affinity:
                order = self._grant_affine(waiters, window)
            for waiter in order:
                settle(waiter)
            self._queue.restore(self._shed_late(blocked))
            restored = True
            self._queue.prune()  # after the restore: it reads which classes still wait
        finally:
            if not restored:  # a decision raised: the waiters not yet served stay queued
                self._queue.restore([w for w in waiters if not w.future.done()])
        if blocked:
            self._wake_for_backlog()

    def _grant_affine(self, waiters: list[Waiter], window: int) -> list[Waiter]:
        """Grants, for each replica with room, the waiter with the longest cached prefix there
        among the next `window` of the head's class, where the profile's filters, judging every
        replica as a decision does (`_kept`), keep that replica for it (readiness, model, pool
        and its lending, version, circuit, KV; not one it excludes).
        Each waiter it passes over counts the pass; none is passed more than `window` times:
        the search stops at one that was. Returns the waiters not granted, in service order.
        Judging a chosen waiter filters every replica: O(replicas) per replica with room."""
        now = self._clock()
        if not any(w.prefix.matched_blocks for w in waiters[:window]):
            # None of the next `window` waiters holds a cached prefix: nothing to grant out of
            # order. Each replica is viewed still, as the search would (a view applies its new
            # engine sample).
            for st in self._replicas.assignable():
                self._view(st, now)
            return waiters
        rest = waiters
        states = list(self._replicas.assignable())
        views: list[ReplicaView] | None = None  # every replica's, until a grant changes one
        for st in states:
            if len(rest) < 2:
                break
            v = self._view(st, now)  # the same view `_kept` judges
            if v.in_flight >= v.cap:
                continue
            rid = st.spec.id
            top = rest[0].priority
            best, best_i = 0, -1
            for i in range(min(len(rest), window)):
                w = rest[i]
                if w.priority != top:
                    break
                req = w.request
                if rid not in req.exclude_replicas:
                    cached = w.prefix.cached_tokens(rid, req.prompt_tokens)
                    if cached > best:
                        best, best_i = cached, i
                if w.passed >= window:
                    break
            if best_i <= 0:  # none, or the head: the pass in service order grants it
                continue
            chosen = rest[best_i]
            req = chosen.request
            if views is None:
                views = [self._view(s, now) for s in states]
            if not any(k.id == rid for k in self._kept(req, chosen.prefix, states, views, now)):
                continue
            lease = self._grant(req, chosen.prefix, chosen.enqueued_at, st)
            views = None
            for w in rest[:best_i]:
                w.passed += 1
            rest = rest[:best_i] + rest[best_i + 1 :]
            self._hand_over(chosen, lease)
        return rest

    def _hand_over(self, waiter: Waiter, lease: Lease) -> None:
        """A queued request's lease: it leaves the queue, served."""
        metrics.record_dequeued(waiter.request.model, waiter.pool_key)
        self._queue.served(waiter)
        waiter.future.set_result(lease)

    def _has_room(self) -> bool:
        """Some assignable replica has room (`_room`)."""
        now = self._clock()
        return any(self._room(st, now) for st in self._replicas.assignable())

    def _room(self, st: ReplicaState, now: float) -> bool:
        """The replica holds fewer leases (with the others' load) than its cap."""
        return st.in_flight + self._others_load(st, now) < self._cap(st, now)

    def _shed_late(self, blocked: list[Waiter]) -> list[Waiter]:
        """Refuse now, with a retry-after, the waiters (in service order) whose expected first
        token (`capacity.Outlook`) lies beyond the share of their Admit deadline an arrival may
        take (`capacity.within_share`): waiting on would only end in a timeout or a missed
        objective. A scale-from-zero waiter is left to its activation timeout."""
        if not blocked:
            return blocked
        outlook = self._outlook()
        if outlook.rate is None:
            return blocked
        now = self._clock()
        kept: list[Waiter] = []
        for w in blocked:
            position = len(kept) + 1
            first_token = outlook.first_token_s(position) or 0.0
            if w.activation is None and not capacity.within_share(
                now + first_token, w.enqueued_at, w.deadline
            ):
                metrics.record_dequeued(w.request.model, w.pool_key)
                metrics.record_rejection(w.request.model, "expected_wait")
                self._queue.unserved(w)
                w.future.set_exception(
                    QueueFull(
                        f"expected time to first token {first_token:.3f}s exceeds "
                        f"{capacity.DEADLINE_SHARE:.0%} of the admission deadline "
                        f"({max(w.deadline - now, 0.0):.3f}s left)",
                        retry_after_s=outlook.retry_after_s(position),
                    )
                )
                continue
            kept.append(w)
        return kept

    # -- membership ---------------------------------------------------------------------------
    def sync_replicas(self, specs: Sequence[ReplicaSpec]) -> None:
        """Make the non-registered replica set equal to `specs` (see `ReplicaSet.sync`)."""
        for rid in self._replicas.sync(specs).dropped:
            self._feedback.drop_replica(rid)
        self._refresh_pool_gauges()
        self._dispatch()

    async def register_replica(self, spec: ReplicaSpec) -> Registration:
        """Add (or confirm) a replica at run time and probe it once now. Idempotent;
        registering a draining replica again cancels the drain."""
        st, created = self._replicas.register(spec)
        await self._probe_replica(st)
        self._refresh_pool_gauges()
        return Registration(ready=st.routable(self._clock()), created=created)

    async def drain_replica(self, replica_id: str, wait_s: float) -> DrainResult:
        """Stop new leases on the replica now; wait up to `wait_s` for its leases to end."""
        st, started = self._replicas.start_drain(replica_id)
        if started:
            self._refresh_pool_gauges()
            self._dispatch()  # waiters it was the last replica for fail now
        await self._replicas.wait_idle(st, wait_s)
        return DrainResult(in_flight=st.in_flight, drained=st.in_flight == 0)

    def deregister_replica(self, replica_id: str) -> int:
        """Forget a registered replica now; returns its leases still live (they end normally)."""
        st = self._replicas.deregister(replica_id)
        self._feedback.drop_replica(replica_id)
        self._refresh_pool_gauges()
        self._dispatch()
        return st.in_flight

    # -- completion -----------------------------------------------------------------------
    def complete(self, lease_id: str, outcome: Outcome, reused_blocks: int | None = None) -> bool:
        """Release a lease. `reused_blocks` is the engine's kv_cache_reused_blocks, given only
        when the engine ran the prompt: it corrects the registry's predictions."""
        if not self._release(lease_id, outcome, reused_blocks):
            return False
        self._dispatch()
        return True

    def complete_many(self, reports: Iterable[tuple[str, Outcome, int | None]]) -> None:
        """`complete` for each (lease id, outcome, reused blocks), then one dispatch pass (not
        one per lease: a pass costs O(queue))."""
        released = False
        for lease_id, outcome, reused_blocks in reports:
            released |= self._release(lease_id, outcome, reused_blocks)
        if released:
            self._dispatch()

    def own(self, lease_id: str, owner: str) -> None:
        """The lease was handed to caller process `owner` (over its AdmitStream)."""
        self._leases.own(lease_id, owner)

    def release_owned(self, owner: str, keep: Collection[str] = ()) -> int:
        """End every lease `owner` still holds but those in `keep` (its process is gone, or
        their answers were lost: no Complete will come); returns how many."""
        lost = [lease_id for lease_id in self._leases.owned_by(owner) if lease_id not in keep]
        self.complete_many((lease_id, Outcome.CANCELLED, None) for lease_id in lost)
        return len(lost)

    def _release(self, lease_id: str, outcome: Outcome, reused_blocks: int | None) -> bool:
        """`complete` less the dispatch."""
        lease = self._leases.pop(lease_id)
        if lease is None:
            return False
        if outcome is Outcome.SUCCESS:
            self._service.record(self._clock() - lease.granted_at)
        self._load.complete(lease_id)
        self._feedback.completed(lease_id, lease.replica.id, reused_blocks)
        st = self._replicas.release(lease.replica.id, lease.granted_at, self._clock())
        if st is not None:
            if outcome is Outcome.REPLICA_ERROR:
                st.failures += 1
                self._health.record_error(st, reason="request failed on replica")
                self._refresh_pool_gauges()
                if not st.removed:  # a replica leaving the set is not probed back
                    self._reprobe(st)
            elif outcome is Outcome.SUCCESS:
                self._health.record_success(st)
                if lease.granted_at >= st.round_at:
                    # Taken since the last round and served: the replica is serving now.
                    st.served_since_round = True
            self._replicas.forget_if_gone(st)
        return True

    def drain_rate(self) -> float | None:
        """Requests per second the routable replicas finish when saturated
        (`capacity.drain_rate`); None before a lease has completed."""
        return self._outlook().rate

    def _outlook(self) -> capacity.Outlook:
        """What a request that must queue has ahead of it on the routable replicas: drain rate,
        engine backlog, predicted prefill (`capacity.Outlook`)."""
        now = self._clock()
        return capacity.Outlook.of(
            (
                capacity.Occupancy(
                    self._slots(st, now),
                    st.in_flight + self._others_load(st, now),
                    self._load.load(st.spec.id).prefill_s,
                )
                for st in self._replicas.live()
                if st.routable(now)
            ),
            self._service.mean_s,
        )

    def retry_after_s(self) -> float:
        """Seconds until the whole queue would have drained at the drain rate."""
        return capacity.retry_after_s(len(self._queue), self.drain_rate())

    # -- health ---------------------------------------------------------------------------
    def _refresh_pool_gauges(self) -> None:
        """Routable replicas per (pool, model version); declared scale-from-zero pools and pools
        seen before report 0 when they have none."""
        now = self._clock()
        counts = {
            (pool, sfz.model_version): 0 for pool, sfz in self._policy.scale_from_zero.items()
        }
        counts.update(dict.fromkeys(self._pool_gauge_keys, 0))
        for st in self._replicas.live():
            key = (st.spec.pool, st.spec.model_version)
            counts[key] = counts.get(key, 0) + (1 if st.routable(now) else 0)
        for key, n in counts.items():
            metrics.record_pool_ready(*key, n)
        self._pool_gauge_keys = set(counts)

    async def _probe_replica(self, st: ReplicaState) -> None:
        ok = await self._health.probe(st)
        st.probed = True
        if self._health.set_ready(st, ok):
            self._feedback.drop_replica(st.spec.id)  # its cache is gone or unreachable
        self._refresh_pool_gauges()
        # Grants to waiters when a replica comes back; fails waiters that lost their last one.
        self._dispatch()

    def _reprobe(self, st: ReplicaState) -> None:
        """Probe a replica that just failed a request now, not at the next health round; one
        probe of it at a time (a crashed replica's leases, reported in one batch, would each
        start one: as many probe calls, dispatch passes and probe failures counted). Failures
        reported while one runs get one more after it (its answer may predate them)."""
        rid = st.spec.id
        if rid in self._reprobes:
            self._reprobe_again.add(rid)
            return
        task = self._reprobes[rid] = asyncio.get_running_loop().create_task(self._probe_replica(st))

        def done(t: asyncio.Task[None]) -> None:
            del self._reprobes[rid]
            if rid in self._reprobe_again:
                self._reprobe_again.discard(rid)
                if not st.removed and not t.cancelled():
                    self._reprobe(st)

        task.add_done_callback(done)

    async def probe_once(self, spread_s: float = 0.0) -> None:
        """One health round: probe every replica due (`_probe_due`; the probes started over
        `spread_s`: `health.staggered`; the first round all at once, as Admits wait for it),
        then `tick`."""
        try:
            due = [st for st in self._replicas.live() if self._probe_due(st)]
            await staggered(self._probe_replica, due, spread_s if self._probed.is_set() else 0.0)
        finally:
            self._probed.set()
            self.tick()

    def _probe_due(self, st: ReplicaState) -> bool:
        """Whether this round probes `st`: not a ready replica on which a request granted since
        the last round succeeded (it is serving), for up to `health_passive_rounds` rounds in a
        row. A probe per replica per round is a call per model (`probe.TritonProbe`): with many
        replicas, a core's tenth or more (an idle orchestrator with 64 spends ~2 ms of CPU per
        probe on the reference machine: each call wakes its threads from idle)."""
        served, st.served_since_round = st.served_since_round, False
        st.round_at = self._clock()
        if st.ready and served and st.unprobed_rounds < self._settings.health_passive_rounds:
            st.unprobed_rounds += 1
            return False
        st.unprobed_rounds = 0
        return True

    def tick(self) -> None:
        """Time-driven upkeep: reclaim leases never completed within `lease_timeout_s`; close
        the shedding windows no Admit closed."""
        self._shedder.tick(self._clock())
        metrics.record_shed_level(self._shedder.level)
        expired = self._leases.expired()
        for lease_id in expired:
            log.warning("lease reclaimed", extra={"lease_id": lease_id})
        self.complete_many((lease_id, Outcome.REQUEST_ERROR, None) for lease_id in expired)

    def observe_sojourn(self, sojourn_s: float) -> None:
        """How long an Admit waited between its sending and its handler's start (the adapter
        reads it from the call): drives the shedding of Admits (`shedding.py`)."""
        self._shedder.observe(sojourn_s, self._clock())
        metrics.record_sojourn(sojourn_s)  # the level's gauge: each `tick`, not each Admit

    async def scrape_once(self, spread_s: float = 0.0) -> None:
        """One metrics round (the fetches started over `spread_s`; 0: one after the other).
        KV use or capacity may have changed what waiters can get: the round dispatches at its
        end, and a spread round also after each sample."""
        await self._sampler.scrape(
            list(self._replicas.live()), spread_s, self._dispatch if spread_s else None
        )
        self._dispatch()

    # -- introspection --------------------------------------------------------------------
    def replicas(self) -> list[ReplicaState]:
        return list(self._replicas.live())

    def now(self) -> float:
        """The director's clock (for adapters that report ages, e.g. ejection time left)."""
        return self._clock()

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def shed_retry_after_s(self) -> float:
        """The retry-after of a refusal for this process's own overload (BUSY and alike)."""
        return self._settings.shed_retry_after_s

    @property
    def orphan_lease_grace_s(self) -> float:
        """How long a caller's leases outlive its last AdmitStream (`release_owned`)."""
        return self._settings.orphan_lease_grace_s

    @property
    def drain_max_wait_s(self) -> float:
        return self._settings.drain_max_wait_s
