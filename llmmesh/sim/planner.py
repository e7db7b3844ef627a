"""Capacity planning on the simulator: the fewest replicas of each accelerator profile that meet
latency targets on a workload, what that costs, and the cheapest long/short pool split.

Search (per candidate pool): replicas are doubled, from half what the autoscaler's capacity
model asks for, until the simulated run meets the targets, then bisected down to the smallest
count that does (meeting the targets is taken to be monotone in the replica count). A refused or
timed-out request counts as infinitely late in the TTFT p99, so the runs use a queue timeout of
4 x the TTFT target (a request waiting longer misses it either way; overloaded runs end sooner). A split option routes prompts longer than `split_tokens` to a
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
from pathlib import Path

from bench.report import format_table, percentile
from bench.workloads import Request
from llmmesh.sim.cluster import ClusterSpec, PoolSpec, SimResult, simulate
from services.autoscaler.policy import CostConfig, replica_capacity


@dataclass(frozen=True, slots=True)
class Targets:
    ttft_p99_s: float = 2.0
    itl_p99_s: float = 0.05  # p99 over requests of the per-request mean inter-token latency


@dataclass(frozen=True, slots=True)
class Measured:
    replicas: int
    ok: bool  # both p99s within the targets (a request not served is infinitely late)
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
    """p99 TTFT over every request, a refused or timed-out one counting as infinitely late (so a
    queue timeout above the target changes nothing); p99 ITL over the served ones."""
    ok = [r for r in res.results if r.ok]
    ttft = percentile(
        [r.ttft_s if r.ok and r.ttft_s is not None else math.inf for r in res.results], 99
    )
    itl = percentile([r.itl_mean_s for r in ok if r.itl_mean_s is not None], 99)
    itl = 0.0 if math.isnan(itl) else itl
    failed = len(res.results) - len(ok)
    good = ttft <= targets.ttft_p99_s and itl <= targets.itl_p99_s
    return Measured(replicas, good, ttft, itl, failed)


def first_guess(requests: Sequence[Request], pool: PoolSpec, targets: Targets) -> int:
    """Half the replicas the autoscaler's capacity model (`replica_capacity`) asks for at the
    workload's mean rate and shape, at least 1: where the doubling search starts."""
    out_h, _ = _rates(requests)
    if not requests or math.isnan(out_h):
        return 1
    ts = [r.arrival_s for r in requests]
    rate = (len(requests) - 1) / (max(ts) - min(ts))
    cap = replica_capacity(
        CostConfig(profile=pool.profile, max_batch_size=pool.max_batch_size),
        targets.ttft_p99_s,
        targets.itl_p99_s,
        sum(r.prompt_tokens for r in requests) / len(requests),
        sum(r.max_tokens for r in requests) / len(requests),
    )
    return max(1, math.floor(rate / cap.requests_per_s / 2))


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

    hi = min(first_guess(requests, pool, targets), max_replicas)
    lo = 0  # fails (0 replicas serve nothing)
    while not at(hi).ok:
        if hi >= max_replicas:
            return None, runs
        lo, hi = hi, min(hi * 2, max_replicas)
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
    b = base or ClusterSpec(queue_timeout_s=4 * t.ttft_p99_s)
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


def write_png(path: Path, options: Sequence[Option], title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a_cost, a_tok) = plt.subplots(1, 2, figsize=(13, 5))
    labels = [o.label.replace(": ", ":\n").replace(", ", ",\n") for o in options]
    colors = ["tab:green" if o.feasible else "tab:red" for o in options]
    bars = a_cost.bar(range(len(options)), [o.usd_per_hour for o in options], color=colors)
    for bar, o in zip(bars, options, strict=True):
        a_cost.annotate(
            " + ".join(str(p.replicas) for p in o.pools),
            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
            ha="center",
            va="bottom",
            fontsize=8,
        )
    a_cost.set_ylabel("$ / hour (replicas on top)")
    a_tok.bar(range(len(options)), [o.usd_per_m_output for o in options], color=colors)
    a_tok.set_ylabel("$ / M output tokens")
    for ax in (a_cost, a_tok):
        ax.set_xticks(range(len(options)), labels, fontsize=7, rotation=30, ha="right")
        ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    import argparse
    import logging

    from bench import workloads as wl
    from bench.report import RESULTS_DIR, write_json
    from llmmesh.accelerators import PROFILES
    from llmmesh.sim.__main__ import WORKLOADS, load_workload

    p = argparse.ArgumentParser(prog="python -m llmmesh.sim.planner", description=__doc__)
    p.add_argument("--workload", choices=WORKLOADS, default="azure")
    p.add_argument("--sample", type=float, default=1.0)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--duration-s", type=float, default=None, help="Only arrivals before this.")
    p.add_argument(
        "--rate-scale", type=float, default=1.0, help="Arrival rate multiplier (2: twice as fast)."
    )
    p.add_argument(
        "--accelerators",
        nargs="+",
        choices=sorted(PROFILES),
        default=[n for n in sorted(PROFILES) if n.startswith("llama-3.1-8b-")],
    )
    p.add_argument("--ttft-p99-s", type=float, default=2.0)
    p.add_argument("--itl-p99-s", type=float, default=0.05)
    p.add_argument("--split-tokens", type=int, default=None, help="Long/short pool split.")
    p.add_argument("--profile", default="default", help="Scheduling profile.")
    p.add_argument("--max-batch-size", type=int, default=64)
    p.add_argument("--max-replicas", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="sim-plan.json")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    reqs = load_workload(args.workload, args.sample, args.seed, args.limit)
    if args.duration_s is not None:
        reqs = [r for r in reqs if r.arrival_s < args.duration_s]
    if args.rate_scale != 1.0:
        reqs = wl.scale_time(reqs, 1.0 / args.rate_scale)
    longest = max(r.prompt_tokens for r in reqs)
    candidates = [
        PoolSpec(
            0, profile=a, max_batch_size=args.max_batch_size, max_num_tokens=max(8192, longest)
        )
        for a in args.accelerators
    ]
    targets = Targets(args.ttft_p99_s, args.itl_p99_s)
    options = plan(
        reqs,
        candidates,
        targets,
        profile=args.profile,
        seed=args.seed,
        split_tokens=args.split_tokens,
        max_replicas=args.max_replicas,
    )
    out_h, in_h = _rates(reqs)
    print(
        f"{args.workload} x{args.rate_scale:g} rate: {len(reqs)} requests, {out_h / 3600:.0f} output and {in_h / 3600:.0f} "
        f"input tokens/s; targets TTFT p99 <= {targets.ttft_p99_s} s, ITL p99 <= "
        f"{targets.itl_p99_s * 1000:g} ms; profile {args.profile}\n"
    )
    print(options_table(options))
    path = write_json(
        args.out,
        {
            "workload": args.workload,
            "requests": len(reqs),
            "targets": dataclasses.asdict(targets),
            "options": [
                {**dataclasses.asdict(o), "pools": [dataclasses.asdict(p) for p in o.pools]}
                for o in options
            ],
        },
    )
    png = write_png(Path(RESULTS_DIR) / Path(args.out).with_suffix(".png").name, options, args.out)
    print(f"\nJSON: {path}\nPNG: {png}")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
