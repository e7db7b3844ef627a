"""Capacity planning on the simulator: the fewest replicas of each accelerator profile that meet
latency targets on a workload, what that costs, and the cheapest long/short pool split.

Search (per candidate pool): replicas are doubled from 1 until the simulated run meets the
targets, then bisected down to the smallest count that does (meeting the targets is taken to be
monotone in the replica count). A split option routes prompts longer than `split_tokens` to a
"long" pool and the rest to a "short" one (the orchestrator's pool policy); the two request
sets are disjoint, so each pool is sized on its own requests (a p99 within the target on each
part bounds the whole's), and the cheapest pair is then checked in one joint run.

Cost: $/h = sum over pools of replicas x the pool's price per replica-hour. $/M output tokens =
$/h / (output tokens the workload asks for per hour) x 1e6, likewise for input (prompt) tokens;
each carries the whole cost (the usual "blended" figures would split it).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

from bench.report import format_table, percentile
from bench.workloads import Request
from llmmesh.sim.cluster import ClusterSpec, PoolSpec, SimResult, simulate


@dataclass(frozen=True, slots=True)
class Targets:
    ttft_p99_s: float = 2.0
    itl_p99_s: float = 0.05  # p99 over requests of the per-request mean inter-token latency


@dataclass(frozen=True, slots=True)
class Measured:
    replicas: int
    ok: bool  # every request served and both p99s within the targets
    ttft_p99_s: float
    itl_p99_s: float
    failed: int


@dataclass(frozen=True, slots=True)
class Option:
    label: str
    pools: tuple[PoolSpec, ...]
    feasible: bool
    ttft_p99_s: float
    itl_p99_s: float
    usd_per_hour: float
    usd_per_m_output: float
    usd_per_m_input: float
    runs: int  # simulations the search took


def measure(res: SimResult, replicas: int, targets: Targets) -> Measured:
    ok = [r for r in res.results if r.ok]
    ttft = percentile([r.ttft_s for r in ok if r.ttft_s is not None], 99)
    itl = percentile([r.itl_mean_s for r in ok if r.itl_mean_s is not None], 99)
    itl = 0.0 if math.isnan(itl) else itl
    failed = len(res.results) - len(ok)
    good = failed == 0 and ttft <= targets.ttft_p99_s and itl <= targets.itl_p99_s
    return Measured(replicas, good, ttft, itl, failed)


def size_pool(
    requests: Sequence[Request],
    pool: PoolSpec,
    targets: Targets,
    *,
    base: ClusterSpec,
    profile: str,
    seed: int,
    max_replicas: int = 1024,
) -> tuple[Measured | None, int]:
    """The smallest replica count of `pool` that meets `targets` on `requests` (None when even
    `max_replicas` does not), and how many simulations it took."""
    runs = 0
    cache: dict[int, Measured] = {}

    def at(n: int) -> Measured:
        nonlocal runs
        if n not in cache:
            runs += 1
            spec = dataclasses.replace(base, pools=(dataclasses.replace(pool, replicas=n),))
            res = simulate(requests, spec, profile, seed, oracle=False)
            cache[n] = measure(res, n, targets)
        return cache[n]

    hi = 1
    while not at(hi).ok:
        if hi >= max_replicas:
            return None, runs
        hi = min(hi * 2, max_replicas)
    lo = hi // 2  # fails (or 0)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if at(mid).ok:
            hi = mid
        else:
            lo = mid
    return at(hi), runs


def _rates(requests: Sequence[Request]) -> tuple[float, float]:
    """Output and input tokens per hour the workload asks for."""
    ts = [r.arrival_s for r in requests]
    span = max(ts) - min(ts) if ts else 0.0
    hours = span / 3600 if span > 0 else math.nan
    return (
        sum(r.max_tokens for r in requests) / hours,
        sum(r.prompt_tokens for r in requests) / hours,
    )


def _option(
    label: str,
    pools: tuple[PoolSpec, ...],
    m: Measured | None,
    requests: Sequence[Request],
    runs: int,
) -> Option:
    per_h = sum(p.replicas * p.usd_per_hour for p in pools)
    out_h, in_h = _rates(requests)
    return Option(
        label,
        pools,
        m is not None and m.ok,
        m.ttft_p99_s if m else math.nan,
        m.itl_p99_s if m else math.nan,
        per_h,
        per_h / out_h * 1e6,
        per_h / in_h * 1e6,
        runs,
    )


def plan(
    requests: Sequence[Request],
    candidates: Sequence[PoolSpec],
    targets: Targets | None = None,
    *,
    base: ClusterSpec | None = None,
    profile: str = "default",
    seed: int = 0,
    split_tokens: int | None = None,
    max_replicas: int = 1024,
) -> list[Option]:
    """One option per candidate pool (a homogeneous fleet) and, with `split_tokens`, the
    cheapest long/short split over every pair of candidates; sorted by $/h, infeasible last."""
    t = targets or Targets()
    b = base or ClusterSpec()
    options: list[Option] = []
    for cand in candidates:
        m, runs = size_pool(
            requests, cand, t, base=b, profile=profile, seed=seed, max_replicas=max_replicas
        )
        pool = dataclasses.replace(cand, replicas=m.replicas if m else max_replicas)
        options.append(_option(cand.profile, (pool,), m, requests, runs))
    if split_tokens is not None:
        long_reqs = [r for r in requests if r.prompt_tokens > split_tokens]
        short_reqs = [r for r in requests if r.prompt_tokens <= split_tokens]
        if long_reqs and short_reqs:
            options.append(
                _split(
                    requests,
                    long_reqs,
                    short_reqs,
                    candidates,
                    t,
                    b,
                    profile,
                    seed,
                    split_tokens,
                    max_replicas,
                )
            )
    return sorted(options, key=lambda o: (not o.feasible, o.usd_per_hour))


def _split(
    requests: Sequence[Request],
    long_reqs: Sequence[Request],
    short_reqs: Sequence[Request],
    candidates: Sequence[PoolSpec],
    t: Targets,
    b: ClusterSpec,
    profile: str,
    seed: int,
    split_tokens: int,
    max_replicas: int,
) -> Option:
    runs = 0
    best: dict[str, tuple[float, PoolSpec]] = {}
    for part, reqs, limit in (("long", long_reqs, None), ("short", short_reqs, split_tokens)):
        for cand in candidates:
            m, n = size_pool(
                reqs, cand, t, base=b, profile=profile, seed=seed, max_replicas=max_replicas
            )
            runs += n
            if m is None:
                continue
            pool = dataclasses.replace(
                cand, name=part, replicas=m.replicas, max_prompt_tokens=limit
            )
            cost = pool.replicas * pool.usd_per_hour
            if part not in best or cost < best[part][0]:
                best[part] = (cost, pool)
    if len(best) < 2:
        return _option("split (infeasible)", (), None, requests, runs)
    # The long pool takes every prompt above the short pool's limit; the policy needs a bound.
    longest = max(r.prompt_tokens for r in requests)
    long_pool = dataclasses.replace(best["long"][1], max_prompt_tokens=longest)
    pools = (best["short"][1], long_pool)
    res = simulate(requests, dataclasses.replace(b, pools=pools), profile, seed, oracle=False)
    m = measure(res, sum(p.replicas for p in pools), t)
    label = f"split >{split_tokens}: long {long_pool.profile}, short {pools[0].profile}"
    return _option(label, pools, m, requests, runs + 1)


def options_table(options: Sequence[Option]) -> str:
    rows = [
        [
            o.label,
            " + ".join(f"{p.replicas}x{p.profile}" for p in o.pools) or "-",
            "yes" if o.feasible else "NO",
            f"{o.ttft_p99_s:.3f}",
            f"{o.itl_p99_s * 1000:.1f}",
            f"{o.usd_per_hour:.2f}",
            f"{o.usd_per_m_output:.3f}",
            f"{o.usd_per_m_input:.4f}",
            str(o.runs),
        ]
        for o in options
    ]
    return format_table(
        [
            "option",
            "replicas",
            "meets",
            "TTFT p99 s",
            "ITL p99 ms",
            "$/h",
            "$/M out",
            "$/M in",
            "sims",
        ],
        rows,
    )
