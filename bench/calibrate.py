"""Load calibration from the engine's own cost model, without a mesh.

The emulator's `Scheduler` (same cost model, paged KV cache with prefix reuse, batch and token
limits as the replicas get from `LLMMESH_EMULATOR_*`) is driven on virtual time:

- `rr_capacity`: capacity of a round-robin cluster on this exact request list. Request i goes to
  replica i mod R (round robin needs no cluster state, so replicas are simulated one by one); every
  replica gets all of its requests at t = 0 and runs them to completion (FCFS, in trace order), so
  its batch and KV cache stay full. Replica i sustains n_i / makespan_i requests per modelled
  second; round robin gives every replica the same share of arrivals, so the cluster saturates
  when its slowest replica does: capacity = R * min_i(n_i / makespan_i).
- "load L" means an arrival rate of L * capacity (modelled time); the wall-clock rate is that
  divided by the emulator TIME_SCALE (the engines sleep modelled time * TIME_SCALE).
- `simulate_open_loop`: the same replicas fed at their arrival times, for the predicted TTFT of
  round robin at the chosen rate (a sanity check printed next to the measured one).

What it leaves out: the CPU cost of the Python backend, gateway and client (~0.6-1 ms per
streamed token on this machine). The benchmarks keep the offered token rate low enough that the
engines, not the CPU, set the pace; the measured round-robin TTFT says how well that held.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

from bench.workloads import Request
from llmmesh.accelerators import DEFAULT_PROFILE, get_profile
from llmmesh.common.settings import settings_of, to_env
from llmmesh.emulator.kv_cache import PagedKvCache
from llmmesh.emulator.scheduler import GenerationRequest, Scheduler, SchedulerConfig
from llmmesh.emulator.settings import EmulatorSettings
from llmmesh.kvblocks import BlockConfig, block_hashes


@dataclass(frozen=True, slots=True)
class EngineShape:
    """The emulator settings the replicas run with (LLMMESH_EMULATOR_*)."""

    num_kv_blocks: int = 12800
    max_batch_size: int = 64
    max_num_tokens: int = 8192
    block_size: int = 32
    cost_profile: str = DEFAULT_PROFILE

    def env(self) -> dict[str, str]:
        """The emulator variables of this shape (and only those)."""
        return to_env(
            settings_of(
                EmulatorSettings,
                num_kv_blocks=self.num_kv_blocks,
                max_batch_size=self.max_batch_size,
                max_num_tokens=self.max_num_tokens,
                cost_profile=self.cost_profile,
            )
        )

    def scheduler(self, scale: int = 1) -> Scheduler:
        """An engine of this shape; with `scale` k, k replicas pooled into one engine: k times a
        replica's compute, memory bandwidth, batch, tokens per step and KV cache, the weights
        read k times per step (each replica reads its copy) (`pooled_ttft_s`)."""
        profile = get_profile(self.cost_profile)
        if scale != 1:
            profile = replace(
                profile,
                hbm_bandwidth=scale * profile.hbm_bandwidth,
                peak_flops=scale * profile.peak_flops,
                weight_reads=scale,
            )
        batch, tokens, blocks = (
            scale * self.max_batch_size,
            scale * self.max_num_tokens,
            scale * self.num_kv_blocks,
        )
        settings = EmulatorSettings(
            replica_id="calibration",
            num_kv_blocks=blocks,
            max_batch_size=batch,
            max_num_tokens=tokens,
            cost_profile=self.cost_profile,
        )
        return Scheduler(
            SchedulerConfig(batch, tokens),
            PagedKvCache(blocks, BlockConfig(self.block_size)),
            profile,
            settings,
        )


@dataclass(frozen=True, slots=True)
class Capacity:
    requests_per_s: float  # modelled time
    output_tokens_per_s: float  # modelled time
    per_replica_requests_per_s: list[float]
    hit_rate: float  # prefix reuse the round-robin replicas got in saturation


def _run_to_completion(
    sched: Scheduler, requests: Sequence[Request], arrivals_ns: Sequence[int] | None
) -> tuple[int, dict[int, int], int]:
    """Run `requests` on one scheduler; returns (end time ns, first-token ns per request, busy ns).
    With `arrivals_ns` None, everything arrives at t = 0."""
    now = 0
    busy = 0
    first: dict[int, int] = {}
    pending = list(range(len(requests)))
    nxt = 0
    while nxt < len(pending) or sched.has_work:
        while nxt < len(pending) and (arrivals_ns is None or arrivals_ns[nxt] <= now):
            i = pending[nxt]
            r = requests[i]
            sched.submit(
                GenerationRequest(str(i), tuple(r.prompt_token_ids), r.max_tokens),
                arrivals_ns[nxt] if arrivals_ns is not None else 0,
            )
            nxt += 1
        if not sched.has_work:
            assert arrivals_ns is not None
            now = arrivals_ns[nxt]
            continue
        step = sched.step(now)
        dur = int(step.duration_s * 1e9)
        if dur <= 0:
            raise RuntimeError("scheduler made no progress (a request that never fits?)")
        now += dur
        busy += dur
        for out in step.outputs:
            if out.index == 0:
                first[int(out.request_id)] = now
    return now, first, busy


def _reuse(sched: Scheduler) -> int:
    return sched.cache.reused_blocks_total * sched.cache.block_size


def engine_seconds(requests: Sequence[Request], shape: EngineShape) -> float:
    """Modelled seconds one replica takes to run `requests` to completion, all submitted at
    t = 0 (a saturated engine: full batches): the work they amount to on this engine."""
    if not requests:
        return 0.0
    end_ns, _, _ = _run_to_completion(shape.scheduler(), requests, None)
    return end_ns / 1e9


def rr_capacity(requests: Sequence[Request], replicas: int, shape: EngineShape) -> Capacity:
    per_replica: list[float] = []
    reused = 0
    for k in range(replicas):
        mine = list(requests[k::replicas])
        if not mine:
            continue
        sched = shape.scheduler()
        end_ns, _, _ = _run_to_completion(sched, mine, None)
        per_replica.append(len(mine) / (end_ns / 1e9))
        reused += _reuse(sched)
    rate = replicas * min(per_replica)
    mean_out = sum(r.max_tokens for r in requests) / len(requests)
    prompt = sum(r.prompt_tokens for r in requests)
    return Capacity(rate, rate * mean_out, per_replica, reused / prompt if prompt else math.nan)


@dataclass(frozen=True, slots=True)
class OpenLoopPrediction:
    ttft_s: list[float]  # modelled time, per request in the order given
    hit_rate: float

    @property
    def ttft_mean_s(self) -> float:
        return sum(self.ttft_s) / len(self.ttft_s)

    @property
    def ttft_p50_s(self) -> float:
        return sorted(self.ttft_s)[len(self.ttft_s) // 2]


def simulate_open_loop(
    requests: Sequence[Request],
    replicas: int,
    shape: EngineShape,
    assign: Sequence[int] | None = None,
    *,
    pooled: int = 1,
) -> OpenLoopPrediction:
    """Requests fed at their arrival times (modelled seconds) to the replica `assign[i]`
    (default: round robin in arrival order). Replicas are independent given the assignment.
    `pooled` k: each replica is k replicas pooled into one engine (`EngineShape.scheduler`)."""
    order = sorted(range(len(requests)), key=lambda i: requests[i].arrival_s)
    if assign is None:
        assign = [0] * len(requests)
        for k, i in enumerate(order):
            assign[i] = k % replicas
    ttft = [math.nan] * len(requests)
    reused = 0
    for k in range(replicas):
        mine = [i for i in order if assign[i] == k]
        if not mine:
            continue
        sched = shape.scheduler(pooled)
        arrivals = [int(requests[i].arrival_s * 1e9) for i in mine]
        _, first, _ = _run_to_completion(sched, [requests[i] for i in mine], arrivals)
        for j, i in enumerate(mine):
            ttft[i] = (first[j] - arrivals[j]) / 1e9
        reused += _reuse(sched)
    prompt = sum(r.prompt_tokens for r in requests)
    return OpenLoopPrediction(ttft, reused / prompt if prompt else math.nan)


def pooled_ttft_s(requests: Sequence[Request], replicas: int, shape: EngineShape) -> list[float]:
    """TTFT (modelled seconds, per request in the order given) of the cluster pooled into one
    engine (`EngineShape.scheduler(replicas)`) fed at the arrival times: an idealized cluster
    whose load is always perfectly balanced (one queue, no replica idle while another has a
    backlog) and whose prefixes are all shared (one cache of the cluster's size). It is more
    than a cluster in one more way: one prompt's prefill runs on the whole pool's compute
    (`replicas` times faster than on one replica), so its rate is an upper reference. A router
    can beat it in one way: the pool serves in arrival order (as each engine does), where a
    router may let a cheap request past an expensive one by sending it elsewhere. So it is a
    reference for how much a workload leaves to win, not a proven bound."""
    return simulate_open_loop(requests, 1, shape, pooled=replicas).ttft_s


def shared_working_set_blocks(requests: Sequence[Request], block_size: int) -> int:
    """Distinct KV blocks (chained hashes) that occur in at least two prompts: the cache a router
    can exploit. Per-replica KV capacity is set relative to it."""
    seen: set[int] = set()
    shared: set[int] = set()
    config = BlockConfig(block_size)
    for r in requests:
        for h in set(block_hashes(r.prompt_token_ids, config)):
            if h in seen:
                shared.add(h)
            else:
                seen.add(h)
    return len(shared)


@dataclass(frozen=True, slots=True)
class LoadPlan:
    """Arrival times and emulator TIME_SCALE that put `load` on a round-robin cluster for about
    `duration_s` of wall time."""

    requests: list[Request]  # arrivals in wall-clock seconds
    emulator_time_scale: float
    arrival_time_factor: float  # wall arrival = natural arrival * factor
    load: float
    capacity_model_req_s: float
    capacity_model_tok_s: float
    capacity_wall_req_s: float
    offered_wall_req_s: float
    offered_wall_tok_s: float
    rr_saturation_hit_rate: float
    predicted_rr_ttft_mean_s: float  # wall seconds (modelled time * TIME_SCALE), engines only
    predicted_rr_ttft_p50_s: float

    def as_dict(self) -> dict[str, float]:
        return {k: getattr(self, k) for k in self.__slots__ if k != "requests"}


def plan_load(
    requests: Sequence[Request],
    *,
    replicas: int,
    shape: EngineShape,
    load: float,
    duration_s: float,
) -> LoadPlan:
    """Scale arrivals so the run spans `duration_s`, and choose TIME_SCALE so that rate is `load`
    times the round-robin capacity: N / duration = load * capacity_model / TIME_SCALE."""
    if load <= 0 or duration_s <= 0:
        raise ValueError("load and duration must be positive")
    ordered = sorted(requests, key=lambda r: r.arrival_s)
    if len(ordered) < 2:
        raise ValueError("need at least two requests")
    span = ordered[-1].arrival_s - ordered[0].arrival_s
    if span <= 0:
        raise ValueError("arrivals span no time")
    cap = rr_capacity(ordered, replicas, shape)
    factor = duration_s / span
    wall = [replace(r, arrival_s=(r.arrival_s - ordered[0].arrival_s) * factor) for r in ordered]
    offered = (len(wall) - 1) / duration_s
    ts = load * cap.requests_per_s / offered
    # The same arrivals on modelled time (wall / TIME_SCALE) for the open-loop prediction.
    model = [replace(r, arrival_s=r.arrival_s / ts) for r in wall]
    pred = simulate_open_loop(model, replicas, shape)
    mean_out = sum(r.max_tokens for r in wall) / len(wall)
    return LoadPlan(
        requests=wall,
        emulator_time_scale=ts,
        arrival_time_factor=factor,
        load=load,
        capacity_model_req_s=cap.requests_per_s,
        capacity_model_tok_s=cap.output_tokens_per_s,
        capacity_wall_req_s=cap.requests_per_s / ts,
        offered_wall_req_s=offered,
        offered_wall_tok_s=offered * mean_out,
        rr_saturation_hit_rate=cap.hit_rate,
        predicted_rr_ttft_mean_s=pred.ttft_mean_s * ts,
        predicted_rr_ttft_p50_s=pred.ttft_p50_s * ts,
    )
