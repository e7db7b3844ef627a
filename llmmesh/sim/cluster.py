"""A cluster in one process on virtual time: llmmesh's own control-plane code around simulated
engines. `simulate(requests, cluster, profile, seed)` is the library entry point.

What runs, and what stands in for what (nothing here re-implements a policy):
- The orchestrator is `services.orchestrator.director.Orchestrator` itself, built with the
  policy's pools and the named scheduling profile (the real plugins from `default_registry()`),
  a seeded rng and the loop's virtual clock. Its readiness probe answers for the simulated
  replicas; its engine scrape (`scrape_once`, every `metrics_interval_s`) reads each engine's
  gauges as Prometheus text through the real parser.
- The prefix index is `services.kv_registry.core.KvRegistry` in-process: in `exact` mode every
  engine's KV events are ingested (the publisher's role; a gap asks for the engine's snapshot);
  in `approximate` mode engines publish nothing and the orchestrator's RecordRouting /
  ReportReuse feedback builds the predicted index; `off` routes prefix-blind.
- Each replica is a `SimEngine`: the emulator's scheduler, paged KV cache and cost model.
- The gateway's part is the request's life: its own limits (`services.gateway.limits`: the
  process's concurrent streams, a tenant's requests/tokens per minute and concurrency, when
  `GatewayLimits` sets them), Admit (with the gateway's queue timeout), the stream on the leased
  replica, Complete with the engine's reused blocks.
- The autoscaler is `services.autoscaler.policy.decide` per pool every `interval_s`, on signals
  read from the simulated cluster (the scrape/PromQL sources' role); the actuator starts a
  replica `startup_delay_s` after the decision, registers it, and drains then removes replicas
  on the way down (newest first).

Not modelled: faults, ejection and migration (no request fails on a replica), several
orchestrators or registries, the shared (Redis) rate-limit store, network and CPU costs of the
live mesh beyond the fixed per-hop latencies given in `Latencies`.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections import deque
from collections.abc import Callable, Collection, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from bench.replay import Result
from bench.report import Summary, oracle_hit_rate, summarize
from bench.workloads import Request
from llmmesh.accelerators import DEFAULT_PROFILE, get_profile
from llmmesh.common.engine_metrics import EngineSample
from llmmesh.common.errors import ServiceError
from llmmesh.common.topology import DEFAULT_POOL, TRITON_MODEL
from llmmesh.emulator.events import AllBlocksCleared, BlocksRemoved, BlocksStored, KvEvent
from llmmesh.emulator.scheduler import GenerationRequest, RequestRejectedError
from llmmesh.kvblocks import BlockConfig, PromptHashes, block_hashes
from llmmesh.sim.engine import EngineConfig, EventSink, SimEngine, Tracked
from llmmesh.triton.inflight import QueueFullError
from services.autoscaler.policy import PolicyConfig, PoolState, decide
from services.autoscaler.signals import PoolSignals
from services.gateway.limits import Slot, StreamLimits, TenantLimits
from services.kv_registry.contracts import Cleared, Event, Removed, Source, Stored
from services.kv_registry.core import KvRegistry
from services.kv_registry.metrics import NoMetrics
from services.kv_registry.settings import KvRegistrySettings
from services.orchestrator.director import Orchestrator
from services.orchestrator.domain import AdmissionRequest, Outcome
from services.orchestrator.policy import Policy as RoutingPolicy
from services.orchestrator.policy import PoolPolicy
from services.orchestrator.prefix import NO_MATCHES, PrefixMatches
from services.orchestrator.settings import OrchestratorSettings, ReplicaSpec

KvMode = Literal["exact", "approximate", "off"]


@dataclass(frozen=True, slots=True)
class Autoscale:
    """The autoscaler for one pool: its policy, evaluation period and the replica start-up
    delay of the simulated actuator."""

    policy: PolicyConfig = field(default_factory=PolicyConfig)
    interval_s: float = 15.0
    startup_delay_s: float = 60.0
    signal_window_s: float = 60.0  # rates and latency percentiles over this window
    drain_wait_s: float = 300.0


@dataclass(frozen=True, slots=True)
class PoolSpec:
    """Replicas of one accelerator profile (`llmmesh.accelerators`). `max_prompt_tokens` makes
    it a routing pool of the policy file (prompts longer go elsewhere). `num_kv_blocks` and
    `price_per_hour` (per replica) default to the profile's (`kv_blocks`, `usd_per_hour`)."""

    replicas: int
    name: str = DEFAULT_POOL
    profile: str = DEFAULT_PROFILE
    max_batch_size: int = 64
    max_num_tokens: int = 8192
    num_kv_blocks: int | None = None
    max_prompt_tokens: int | None = None
    price_per_hour: float | None = None
    autoscale: Autoscale | None = None
    time_scale: float = 1.0  # as the emulator's TIME_SCALE (compare with a live emulated mesh)
    gauge_period_s: float | None = None  # the backend's gauge copy period (EngineConfig)

    def kv_blocks(self, block_size: int) -> int:
        if self.num_kv_blocks is not None:
            return self.num_kv_blocks
        return get_profile(self.profile).kv_blocks(block_size)

    @property
    def usd_per_hour(self) -> float:
        if self.price_per_hour is not None:
            return self.price_per_hour
        return get_profile(self.profile).usd_per_hour


@dataclass(frozen=True, slots=True)
class Latencies:
    """Fixed per-hop delays of the live mesh (seconds), 0 for an ideal one."""

    admit_s: float = 0.0  # client -> gateway -> orchestrator Admit (before queueing)
    lookup_s: float = 0.0  # orchestrator -> kv_registry Lookup
    dispatch_s: float = 0.0  # lease granted -> the engine has the request (reply, stream open)
    first_token_s: float = 0.0  # engine -> client, first token
    completion_s: float = 0.0  # engine -> client, last token; the lease ends (Complete) then
    jitter: float = 0.0  # each delay drawn uniformly within +-jitter of its value (seeded)

    def draw(self, value: float, rng: random.Random) -> float:
        return value if not self.jitter else value * (1 + self.jitter * (2 * rng.random() - 1))


@dataclass(frozen=True, slots=True)
class GatewayLimits:
    """The gateway's admission limits (`services.gateway.limits`): the process's concurrent
    streams, and one tenant's requests and tokens per minute and concurrent requests."""

    max_concurrent_streams: int | None = None
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    max_concurrent_requests: int | None = None


@dataclass(frozen=True, slots=True)
class ClusterSpec:
    pools: tuple[PoolSpec, ...] = (PoolSpec(4),)
    kv_mode: KvMode = "exact"
    block_size: int = 32
    max_queue: int = 1024
    queue_timeout_s: float = 30.0
    max_in_flight_per_replica: int = 64
    metrics_interval_s: float = 1.0
    metrics_max_age_s: float = 5.0
    latencies: Latencies = field(default_factory=Latencies)
    gateway: GatewayLimits = field(default_factory=GatewayLimits)
    # The orchestrator's policy file as loaded (`services.orchestrator.policy.load_policy`):
    # plugins, profiles, health, capacity, admission. Its `pools` are completed from `pools`
    # (each PoolSpec with `max_prompt_tokens`).
    policy: RoutingPolicy | None = None


@dataclass(frozen=True, slots=True)
class Slo:
    """Latency targets for goodput: a request meets the SLO when its TTFT and its mean ITL are
    within them."""

    ttft_s: float = 2.0
    itl_s: float = 0.05

    def met(self, r: Result) -> bool:
        return (
            r.ok
            and r.ttft_s is not None
            and r.ttft_s <= self.ttft_s
            and (r.itl_mean_s is None or r.itl_mean_s <= self.itl_s)
        )


def goodput(results: Sequence[Result], slo: Slo, duration_s: float) -> dict[str, float]:
    """Share of requests within the SLO, and their output tokens per second."""
    good = [r for r in results if slo.met(r)]
    tokens = sum(r.output_tokens for r in good)
    return {
        "slo_attainment": len(good) / len(results) if results else math.nan,
        "goodput_tok_s": tokens / duration_s if duration_s > 0 else math.nan,
    }


@dataclass(frozen=True, slots=True)
class ScaleEvent:
    t_s: float
    pool: str
    current: int
    desired: int
    cause: str


@dataclass(frozen=True, slots=True)
class Sample:
    """The cluster every `timeline_interval_s`: replicas provisioned (paid for), ready, requests
    arrived since the last sample, in flight, queued."""

    t_s: float
    provisioned: dict[str, int]
    ready: dict[str, int]
    arrivals: int
    in_flight: int
    queued: int


@dataclass
class SimResult:
    profile: str
    seed: int
    results: list[Result]
    summary: Summary
    replica_seconds: dict[str, float]
    cost_usd: float
    scale_events: list[ScaleEvent]
    timeline: list[Sample]
    rejections: dict[str, int]
    wall_s: float
    cpu_s: float  # process CPU time of the run (wall time on a shared machine overstates it)
    sim_s: float
    engine_iterations: int
    loop_wakeups: int

    @property
    def events(self) -> int:
        """Simulated events: engine iterations plus request arrivals and completions."""
        return self.engine_iterations + 2 * len(self.results)

    @property
    def events_per_s(self) -> float:
        """Simulated events per second of CPU time."""
        return self.events / self.cpu_s if self.cpu_s > 0 else math.nan


def _registry_events(events: Sequence[KvEvent]) -> list[Event]:
    """The emulator's KV events as kv_registry ingests them (the publisher's mapping)."""
    out: list[Event] = []
    for ev in events:
        d = ev.data
        if isinstance(d, BlocksStored):
            out.append(Stored(ev.sequence, tuple(b.block_hash for b in d.blocks), d.parent_hash))
        elif isinstance(d, BlocksRemoved):
            out.append(Removed(ev.sequence, d.block_hashes))
        elif isinstance(d, AllBlocksCleared):
            out.append(Cleared(ev.sequence))
    return out


class RegistryIndex:
    """The orchestrator's `PrefixIndex` over an in-process `KvRegistry` (what the gRPC client
    and the registry's servicer do, without the wire)."""

    def __init__(self, registry: KvRegistry, lookup_s: float) -> None:
        self.registry = registry
        self._config = registry.block_config
        self._lookup_s = lookup_s

    async def lookup(
        self,
        token_ids: Sequence[int],
        replica_ids: Collection[str] = (),
        hashes: PromptHashes | None = None,
    ) -> PrefixMatches:
        sent = None if hashes is None else hashes.under(self._config)
        blocks = tuple(block_hashes(token_ids, self._config)) if sent is None else sent
        if not blocks:
            return NO_MATCHES
        if self._lookup_s > 0:
            await asyncio.sleep(self._lookup_s)
        res = self.registry.lookup_hashes(blocks)
        return PrefixMatches(
            res.prompt_blocks,
            {m.replica_id: m.matched_blocks for m in res.matches},
            blocks,
            exact=frozenset(m.replica_id for m in res.matches if m.source is Source.EXACT),
        )

    async def record_routing(self, replica_id: str, hashes: Sequence[int]) -> int:
        return self.registry.record_routing(replica_id, hashes).predicted_blocks

    async def report_reuse(
        self,
        replica_id: str,
        hashes: Sequence[int],
        reported: int,
        prompt_tokens: int,
        predicted: int,
    ) -> None:
        self.registry.report_reuse(
            replica_id, hashes, reported, prompt_tokens=prompt_tokens, predicted_blocks=predicted
        )

    async def drop_replica(self, replica_id: str) -> None:
        self.registry.drop_replica(replica_id)


@dataclass(slots=True)
class _Replica:
    spec: ReplicaSpec
    pool: PoolSpec
    engine: SimEngine | None  # None while starting
    started_at: float  # provisioned (paid for) since
    draining: bool = False


class _Probe:
    def __init__(self, cluster: Cluster) -> None:
        self._cluster = cluster

    async def ready(self, replica: ReplicaSpec, models: Sequence[str], timeout_s: float) -> bool:
        r = self._cluster.replicas.get(replica.id)
        return r is not None and r.engine is not None


def _code(exc: ServiceError) -> str:
    return str(exc.code.name)


class Cluster:
    """One simulation run; use `simulate()`."""

    def __init__(self, spec: ClusterSpec, profile: str, seed: int) -> None:
        self.spec = spec
        self.profile = profile
        self.seed = seed
        self.loop = asyncio.get_running_loop()
        self.block_config = BlockConfig(spec.block_size)
        self.replicas: dict[str, _Replica] = {}
        self._pools = {p.name: p for p in spec.pools}
        if len(self._pools) != len(spec.pools):
            raise ValueError("pool names must be distinct")
        self._index: RegistryIndex | None = None
        if spec.kv_mode != "off":
            registry = KvRegistry(
                KvRegistrySettings(),
                self.block_config,
                clock=self.loop.time,
                metrics=NoMetrics(),
            )
            self._index = RegistryIndex(registry, spec.latencies.lookup_s)
        routing_pools = {
            p.name: PoolPolicy(max_prompt_tokens=p.max_prompt_tokens)
            for p in spec.pools
            if p.max_prompt_tokens is not None
        }
        self._next_id: dict[str, int] = dict.fromkeys(self._pools, 0)
        # A pool the autoscaler manages starts with registered replicas (as the actuator's, so
        # they may be drained and deregistered); the others are the static list.
        static: list[ReplicaSpec] = []
        self._initial: list[_Replica] = []
        for p in spec.pools:
            for _ in range(p.replicas):
                rep = self._provision(p)
                if p.autoscale is None:
                    static.append(rep.spec)
                else:
                    self._initial.append(rep)
        self.orchestrator = Orchestrator(
            OrchestratorSettings(
                replicas=static,
                profile=profile,
                max_queue=spec.max_queue,
                default_queue_timeout_s=spec.queue_timeout_s,
                max_in_flight_per_replica=spec.max_in_flight_per_replica,
                metrics_interval_s=spec.metrics_interval_s,
                metrics_max_age_s=spec.metrics_max_age_s,
                # As old as the engines' gauges may be (exact when not modelled).
                engine_gauge_period_s=max((p.gauge_period_s or 0.0) for p in spec.pools),
                engine_time_scale=_engine_time_scale(spec.pools),
            ),
            _Probe(self),
            (spec.policy or RoutingPolicy()).model_copy(
                update={"pools": {**(spec.policy.pools if spec.policy else {}), **routing_pools}}
            ),
            self._index,
            random.Random(seed),
            self._fetch_metrics,
            self.loop.time,
            kv_block_size=spec.block_size,
        )
        for rid in [s.id for s in static]:
            self._start_engine(self.replicas[rid])
        g = spec.gateway
        self._streams = (
            None
            if g.max_concurrent_streams is None
            else StreamLimits(g.max_concurrent_streams, self.loop.time)
        )
        self._tenant = (
            None
            if g.requests_per_minute is None
            and g.tokens_per_minute is None
            and g.max_concurrent_requests is None
            else TenantLimits(
                "sim",
                g.requests_per_minute,
                g.tokens_per_minute,
                self.loop.time,
                max_concurrent=g.max_concurrent_requests,
            )
        )
        self._waiters: dict[str, asyncio.Future[Tracked]] = {}
        self._first: dict[str, float] = {}
        self.replica_seconds: dict[str, float] = dict.fromkeys(self._pools, 0.0)
        self.scale_events: list[ScaleEvent] = []
        self.iterations_total = 0
        self._tasks: set[asyncio.Task[object]] = set()
        self._jitter = random.Random(seed + 1)  # per-hop delay draws (Latencies.jitter)
        self._errors: list[BaseException] = []  # of background tasks: the run fails with them
        self.timeline: list[Sample] = []
        self._arrivals = 0
        self._in_flight = 0
        # Per pool, recent (time, ttft, itl, prompt, completion) and admissions, for signals.
        self._recent: dict[str, deque[tuple[float, float, float, int, int]]] = {
            p: deque() for p in self._pools
        }
        self._admitted: dict[str, deque[float]] = {p: deque() for p in self._pools}

    # -------------------------------------------------------------------- replicas
    def _provision(self, pool: PoolSpec) -> _Replica:
        n = self._next_id[pool.name]
        self._next_id[pool.name] = n + 1
        rid = f"{pool.name}-{n}"
        spec = ReplicaSpec(
            id=rid,
            grpc_address=f"{rid}:8001",
            pool=pool.name,
            metrics_url=f"sim://{rid}/metrics",
        )
        rep = self.replicas[rid] = _Replica(spec, pool, None, self.loop.time())
        return rep

    def _start_engine(self, rep: _Replica) -> None:
        p = rep.pool
        engine = SimEngine(
            rep.spec.id,
            EngineConfig(
                get_profile(p.profile),
                p.max_batch_size,
                p.max_num_tokens,
                p.kv_blocks(self.spec.block_size),
                self.spec.block_size,
                time_scale=p.time_scale,
                gauge_period_s=p.gauge_period_s,
            ),
            self.loop,
            on_events=self._publisher(rep.spec.id) if self.spec.kv_mode == "exact" else None,
            on_first_token=self._first_token,
            on_finished=self._finished,
        )
        rep.engine = engine

    def _publisher(self, replica_id: str) -> EventSink:
        assert self._index is not None
        registry = self._index.registry

        def publish(events: Sequence[KvEvent]) -> None:
            rep = self.replicas.get(replica_id)
            if rep is None or rep.engine is None:
                return
            res = registry.ingest(
                replica_id, rep.engine.epoch, self.block_config, _registry_events(events)
            )
            if res.resync_required:
                snap = rep.engine.scheduler.cache.snapshot()
                registry.ingest(
                    replica_id, rep.engine.epoch, self.block_config, _registry_events(snap)
                )

        return publish

    async def _fetch_metrics(self, url: str, host: str, timeout_s: float) -> EngineSample:
        rid = url.removeprefix("sim://").removesuffix("/metrics")
        rep = self.replicas.get(rid)
        if rep is None or rep.engine is None:
            raise OSError(f"replica {rid} is not running")
        return rep.engine.sample()

    def _first_token(self, request_id: str, tracked: Tracked) -> None:
        pass

    def _finished(self, request_id: str, tracked: Tracked) -> None:
        fut = self._waiters.pop(request_id, None)
        if fut is not None and not fut.done():
            fut.set_result(tracked)

    # -------------------------------------------------------------------- requests
    async def request(self, index: int, req: Request, start: float) -> Result:
        lat = self.spec.latencies
        due = start + req.arrival_s
        rid = f"sim-{index}"
        res = Result(
            index=index,
            request_id=rid,
            scheduled_s=req.arrival_s,
            send_lag_s=0.0,
            ttft_s=None,
            itl_mean_s=None,
            e2e_s=None,
            output_tokens=0,
            prompt_tokens=req.prompt_tokens,
            meta=dict(req.meta),
        )
        self._arrivals += 1
        self._in_flight += 1
        slot: Slot | None = None
        try:
            try:
                if self._streams is not None:
                    slot = self._streams.enter(self._tenant)
                elif self._tenant is not None and self._tenant.concurrency is not None:
                    # The tenant's own limit holds without a process-wide one too.
                    self._tenant.concurrency.enter()
                    slot = Slot((self._tenant.concurrency,))
                if self._tenant is not None:
                    self._tenant.admit(req.prompt_tokens)
            except ServiceError as exc:  # RESOURCE_EXHAUSTED: rate limited or overloaded
                res.outcome, res.error = _code(exc), str(exc)
                return res
            if lat.admit_s > 0:
                await asyncio.sleep(lat.draw(lat.admit_s, self._jitter))
            try:
                lease = await self.orchestrator.admit(
                    AdmissionRequest(rid, TRITON_MODEL, req.prompt_token_ids, req.max_tokens),
                    self.spec.queue_timeout_s,
                )
            except ServiceError as exc:
                if self._tenant is not None:  # never served: the budget goes back, as live
                    self._tenant.refund(req.prompt_tokens)
                res.outcome, res.error = _code(exc), str(exc)
                return res
            rep = self.replicas[lease.replica.id]
            assert rep.engine is not None
            pool = rep.pool.name
            self._admitted[pool].append(self.loop.time())
            if lat.dispatch_s > 0:
                await asyncio.sleep(lat.draw(lat.dispatch_s, self._jitter))
            fut: asyncio.Future[Tracked] = self.loop.create_future()
            self._waiters[rid] = fut
            try:
                rep.engine.submit(
                    GenerationRequest(rid, tuple(req.prompt_token_ids), req.max_tokens)
                )
            except RequestRejectedError as exc:  # never fits, or the engine's queue is full
                self._waiters.pop(rid, None)
                self.orchestrator.complete(lease.lease_id, Outcome.REQUEST_ERROR)
                full = isinstance(exc, QueueFullError)
                res.outcome = "RESOURCE_EXHAUSTED" if full else "INVALID_ARGUMENT"
                res.error = str(exc)
                return res
            tracked = await fut
            if lat.completion_s > 0:
                await asyncio.sleep(lat.draw(lat.completion_s, self._jitter))
            self.orchestrator.complete(lease.lease_id, Outcome.SUCCESS, tracked.reused_blocks)
            assert tracked.first_token_s is not None
            assert tracked.finished_s is not None
            first = tracked.first_token_s + lat.first_token_s
            last = tracked.finished_s + lat.completion_s
            res.ttft_s = first - due
            res.e2e_s = last - due
            res.output_tokens = tracked.output_tokens
            res.cached_prompt_tokens = min(
                tracked.reused_blocks * self.spec.block_size, req.prompt_tokens
            )
            res.replica_id = lease.replica.id
            res.queue_ms = lease.queue_s * 1000
            if tracked.output_tokens > 1:
                res.itl_mean_s = (last - first) / (tracked.output_tokens - 1)
            self._recent[pool].append(
                (last, res.ttft_s, res.itl_mean_s or 0.0, req.prompt_tokens, res.output_tokens)
            )
            if self._tenant is not None:
                self._tenant.charge(res.output_tokens)
            return res
        finally:
            if slot is not None:
                slot.release()
            self._in_flight -= 1

    # -------------------------------------------------------------------- background
    async def _every(
        self, period_s: float, fn: Callable[[], object], first_at: float = 0.0
    ) -> None:
        await asyncio.sleep(first_at)
        while True:
            r = fn()
            if isinstance(r, Coroutine):
                await r
            await asyncio.sleep(period_s)

    def _sample(self) -> None:
        prov = dict.fromkeys(self._pools, 0)
        ready = dict.fromkeys(self._pools, 0)
        for rep in self.replicas.values():
            prov[rep.pool.name] += 1
            if rep.engine is not None and not rep.draining:
                ready[rep.pool.name] += 1
        self.timeline.append(
            Sample(
                self.loop.time(),
                prov,
                ready,
                self._arrivals,
                self._in_flight,
                self.orchestrator.queue_depth,
            )
        )
        self._arrivals = 0

    def _signals(self, pool: PoolSpec, window_s: float) -> PoolSignals:
        now = self.loop.time()
        recent, admitted = self._recent[pool.name], self._admitted[pool.name]
        while recent and recent[0][0] < now - window_s:
            recent.popleft()
        while admitted and admitted[0] < now - window_s:
            admitted.popleft()
        engines = [
            r.engine for r in self.replicas.values() if r.pool is pool and r.engine is not None
        ]
        active = waiting = used = total = 0
        for e in engines:
            m = e.metrics()
            active += m.active
            waiting += m.waiting
            used += m.kv_used_blocks
            total += m.kv_max_blocks
        ttfts = sorted(x[1] for x in recent)
        itls = sorted(x[2] for x in recent if x[2] > 0)

        def p90(v: list[float]) -> float | None:
            return v[min(len(v) - 1, int(0.9 * len(v)))] if v else None

        span = min(window_s, now) or window_s
        n = len(recent)
        return PoolSignals(
            sampled_at=now,
            replicas_known=len(engines),
            reporting_replicas=len(engines),
            engine_active=float(active),
            engine_waiting=float(waiting),
            kv_utilization=used / total if total else None,
            queue_depth=float(self.orchestrator.queue_depth),
            leases_in_flight=float(
                sum(
                    st.in_flight for st in self.orchestrator.replicas() if st.spec.pool == pool.name
                )
            ),
            ttft_p90_s=p90(ttfts),
            itl_p90_s=p90(itls),
            arrival_rate=len(admitted) / span,
            prompt_tokens_rate=sum(x[3] for x in recent) / span if n else None,
            completion_tokens_rate=sum(x[4] for x in recent) / span if n else None,
        )

    async def _autoscale(self, pool: PoolSpec, auto: Autoscale) -> None:
        state = PoolState()
        while True:
            await asyncio.sleep(auto.interval_s)
            mine = [r for r in self.replicas.values() if r.pool is pool and not r.draining]
            current = len(mine)
            sig = self._signals(pool, auto.signal_window_s)
            d = decide(auto.policy, state, sig, current, self.loop.time(), math.inf)
            if d.desired == current:
                continue
            self.scale_events.append(
                ScaleEvent(self.loop.time(), pool.name, current, d.desired, str(d.cause))
            )
            if d.desired > current:
                for _ in range(d.desired - current):
                    rep = self._provision(pool)
                    self.loop.call_later(auto.startup_delay_s, self._ready_replica, rep)
            else:
                # Newest first; a replica still starting is cancelled before a serving one.
                for rep in sorted(mine, key=lambda r: (r.engine is not None, -r.started_at))[
                    : current - d.desired
                ]:
                    rep.draining = True
                    self._spawn(self._retire(rep, auto.drain_wait_s))

    def _ready_replica(self, rep: _Replica) -> None:
        if rep.draining:
            return
        self._start_engine(rep)
        self._spawn(self.orchestrator.register_replica(rep.spec))

    async def _retire(self, rep: _Replica, wait_s: float) -> None:
        if rep.engine is not None:
            await self.orchestrator.drain_replica(rep.spec.id, wait_s)
            self.orchestrator.deregister_replica(rep.spec.id)
        self._remove(rep)

    def _remove(self, rep: _Replica) -> None:
        if self.replicas.pop(rep.spec.id, None) is not None:
            if rep.engine is not None:
                rep.engine.stop()
                self.iterations_total += rep.engine.iterations
            self.replica_seconds[rep.pool.name] += self.loop.time() - rep.started_at
            if self._index is not None:
                self._index.registry.drop_replica(rep.spec.id)

    def _spawn(self, coro: Coroutine[Any, Any, object]) -> None:
        task = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self._errors.append(task.exception())  # type: ignore[arg-type]

    # -------------------------------------------------------------------- run
    async def run(self, requests: Sequence[Request], timeline_interval_s: float) -> list[Result]:
        for rep in self._initial:
            self._start_engine(rep)
            await self.orchestrator.register_replica(rep.spec)
        await self.orchestrator.probe_once()
        # The scrape's phase against the arrivals is arbitrary in a live mesh; the seed picks it.
        phase = random.Random(self.seed).random() * self.spec.metrics_interval_s
        background = [
            self.loop.create_task(
                self._every(self.spec.metrics_interval_s, self.orchestrator.scrape_once, phase)
            ),
            self.loop.create_task(self._every(1.0, self.orchestrator.tick, 1.0)),
            self.loop.create_task(self._every(timeline_interval_s, self._sample)),
        ]
        for p in self.spec.pools:
            if p.autoscale is not None:
                background.append(self.loop.create_task(self._autoscale(p, p.autoscale)))
        start = self.loop.time()
        order = sorted(range(len(requests)), key=lambda i: requests[i].arrival_s)
        tasks: list[asyncio.Task[Result]] = []
        for i in order:
            delay = start + requests[i].arrival_s - self.loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(self.loop.create_task(self.request(i, requests[i], start)))
        done = await asyncio.gather(*tasks)
        self._sample()
        pending: list[asyncio.Task[Any]] = [*background, *self._tasks]
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        if self._errors:
            raise RuntimeError("a simulated control-plane task failed") from self._errors[0]
        for rep in list(self.replicas.values()):
            self._remove(rep)
        results: list[Result | None] = [None] * len(requests)
        for r in done:
            results[r.index] = r
        return [r for r in results if r is not None]


def simulate(
    requests: Sequence[Request],
    cluster: ClusterSpec | None = None,
    profile: str = "default",
    seed: int = 0,
    *,
    timeline_interval_s: float = 10.0,
    oracle: bool = True,
    slo: Slo | None = None,
) -> SimResult:
    """Run `requests` (arrivals in seconds from the start) through the cluster on virtual time.
    Runs its own event loop: call it from synchronous code (from a coroutine, through
    `asyncio.to_thread`)."""
    from llmmesh.sim.loop import VirtualTimeLoop

    spec = cluster or ClusterSpec()
    wall, cpu = time.perf_counter(), time.process_time()
    loop = VirtualTimeLoop()
    holder: dict[str, Cluster] = {}

    async def main() -> list[Result]:
        c = holder["c"] = Cluster(spec, profile, seed)
        return await c.run(requests, timeline_interval_s)

    try:
        results = loop.run_until_complete(main())
        wakeups = loop.jumps
        sim_s = loop.time()
    finally:
        loop.close()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    c = holder["c"]
    rejections: dict[str, int] = {}
    for r in results:
        if not r.ok:
            rejections[r.outcome] = rejections.get(r.outcome, 0) + 1
    orc = oracle_hit_rate(requests, spec.block_size) if oracle and requests else math.nan
    summary = summarize(profile, results, oracle=orc)
    summary.extra.update(goodput(results, slo or Slo(), summary.duration_s))
    prices = {p.name: p.usd_per_hour for p in spec.pools}
    cost = sum(prices[p] * s / 3600 for p, s in c.replica_seconds.items())
    return SimResult(
        profile=profile,
        seed=seed,
        results=results,
        summary=summary,
        replica_seconds=c.replica_seconds,
        cost_usd=cost,
        scale_events=c.scale_events,
        timeline=c.timeline,
        rejections=rejections,
        wall_s=wall,
        cpu_s=cpu,
        sim_s=sim_s,
        engine_iterations=c.iterations_total,
        loop_wakeups=wakeups,
    )


def _engine_time_scale(pools: Sequence[PoolSpec]) -> float:
    """The pools' one time scale, which the orchestrator models (as the local mesh sets it)."""
    scales = {p.time_scale for p in pools}
    if not scales:
        return 1.0
    if len(scales) > 1:
        raise ValueError(
            f"pools run at different time scales {sorted(scales)}: the orchestrator "
            "models one engine speed"
        )
    return scales.pop()
