"""`make bench-routing`: scheduling profiles against round-robin on every workload of the matrix
(`bench.workloads.MATRIX`), in one run.

Two modes:
  sim  (default): the cluster simulator (`llmmesh.sim`: the real orchestrator, plugins and
       kv_registry on virtual time, engines on the emulator's scheduler and cost model) on the
       full workloads: seconds per arm, no mesh;
  live: a fresh local mesh per arm (cold engines and caches) on a sample of each workload
       (`--live-sample`: traces by time window, sessions by session), replayed in real time.

Per workload: KV blocks per replica are `--cache-fraction` of the workload's shared working set
(blocks in two or more prompts; at least four of the longest request), so one replica cannot
hold every shared prefix and the cluster can. The load is `--load` (0.8) times the capacity of a
round-robin cluster on the same requests from the engines' cost model (`bench.calibrate`).

Reported per workload and profile: TTFT mean/p50/p99 at that fixed load, the ratios against
round-robin measured in the same run, the engine-observed KV hit rate against the infinite-cache
oracle and the capacity-limited bound (per-replica LRU of the real KV size with perfect
placement, `bench.report.capacity_limited_hit_rate`), and (sim) the highest arrival rate each
profile sustains with p99 TTFT <= `--slo-p99-s` and nothing refused: bisection on the rate over
`--bisect-sample` of the workload. Then the issue's targets, met or missed; JSON under
bench-results/ (routing.json).
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from bench import workloads as wl
from bench.arms import Arm, MeshSpec
from bench.calibrate import EngineShape, plan_load, rr_capacity, shared_working_set_blocks
from bench.experiment import WorkloadRun, check_code_unchanged, environment, run_arms, workload_json
from bench.report import (
    Check,
    Summary,
    block_size_from_env,
    capacity_limited_hit_rate,
    checks_table,
    eprint,
    format_table,
    oracle_hit_rate,
    ratio,
    summary_dict,
    summary_table,
    write_json,
)

PROFILES = ["round-robin", "least-loaded", "prefix-only", "default"]
BASELINE = "round-robin"
# Profiles that must never lose to the baseline, on any workload.
NEVER_WORSE = ("default", "least-loaded")
HEADLINE = "default"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench routing",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--mode", choices=["sim", "live"], default="sim")
    p.add_argument("--replicas", type=int, default=4)
    p.add_argument("--load", type=float, default=0.8, help="Share of round-robin capacity.")
    p.add_argument("--workloads", nargs="+", choices=sorted(wl.MATRIX), default=list(wl.MATRIX))
    p.add_argument("--arms", nargs="+", default=PROFILES, help="Orchestrator profiles.")
    p.add_argument(
        "--cache-fraction",
        type=float,
        default=0.4,
        help="Per-replica KV blocks as a share of the shared working set.",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="routing.json", help="File name under bench-results/.")
    g = p.add_argument_group("sim")
    g.add_argument(
        "--sim-sample",
        type=float,
        default=1.0,
        help="Share of each workload simulated at the fixed load (1: full; Azure: see below).",
    )
    g.add_argument(
        "--azure-sample",
        type=float,
        default=0.1,
        help="Share of the Azure hour (time windows) in sim mode (19k requests in full).",
    )
    g.add_argument("--slo-p99-s", type=float, default=1.0, help="p99 TTFT the rate must keep.")
    g.add_argument(
        "--bisect-sample",
        type=float,
        default=1.0,
        help="Share of each workload the rate bisection runs on (0: no bisection).",
    )
    g.add_argument(
        "--bisect-trace-sample",
        type=float,
        default=0.1,
        help="Share of the Mooncake trace (time windows) the rate bisection runs on.",
    )
    g.add_argument("--bisect-steps", type=int, default=6)
    g.add_argument(
        "--bisect-profiles", nargs="+", default=["round-robin", "least-loaded", "default"]
    )
    g = p.add_argument_group("live")
    g.add_argument("--live-sample", type=float, default=0.15, help="Share of each workload.")
    g.add_argument("--duration", type=float, default=40.0, help="Seconds of arrivals (live).")
    g.add_argument("--max-in-flight", type=int, default=512, help="Load-generator safety cap.")
    return p


def engine_shape(requests: list[wl.Request], cache_fraction: float, block_size: int) -> EngineShape:
    shared = shared_working_set_blocks(requests, block_size)
    largest = max(math.ceil((r.prompt_tokens + r.max_tokens) / block_size) for r in requests)
    return EngineShape(
        num_kv_blocks=max(int(shared * cache_fraction), 4 * largest), block_size=block_size
    )


def at_rate(requests: Sequence[wl.Request], rate: float) -> list[wl.Request]:
    """The requests with arrivals rescaled to a mean rate of `rate` per second."""
    ordered = sorted(requests, key=lambda r: r.arrival_s)
    span = ordered[-1].arrival_s - ordered[0].arrival_s
    if span <= 0 or rate <= 0:
        raise ValueError("need arrivals spanning time and a positive rate")
    factor = (len(ordered) - 1) / span / rate
    return [
        wl.Request(
            (r.arrival_s - ordered[0].arrival_s) * factor, r.prompt_token_ids, r.max_tokens, r.meta
        )
        for r in ordered
    ]


def sample_of(workload: str, args: argparse.Namespace, share: float) -> float:
    if workload == "azure":
        return min(1.0, float(args.azure_sample) * share)
    return share


# ------------------------------------------------------------------------------ sim
@dataclass
class WorkloadResult:
    workload: str
    prefix_heavy: bool
    requests: int
    rate_req_s: float
    rr_capacity_req_s: float
    num_kv_blocks: int
    oracle: float
    bound: float
    summaries: list[Summary]
    sustainable_req_s: dict[str, float] = field(default_factory=dict)
    sustainable_bounded: dict[str, str] = field(default_factory=dict)  # "" or ">=" / "<="

    def summary(self, arm: str) -> Summary | None:
        return next((s for s in self.summaries if s.arm == arm), None)


def _sim_ok(summary: Summary, slo_s: float) -> bool:
    return summary.ok == summary.requests and summary.ttft_s.p99 <= slo_s


def sustainable_rate(
    requests: Sequence[wl.Request],
    cluster: Any,
    profile: str,
    *,
    lo: float,
    hi: float,
    steps: int,
    slo_s: float,
    seed: int,
) -> tuple[float, str]:
    """Highest rate in [lo, hi] (bisection in log space) whose run keeps p99 TTFT <= slo with
    nothing refused; ("<=", lo) when even lo misses, (">=", hi) when hi holds."""
    from llmmesh.sim import simulate

    def holds(rate: float) -> bool:
        res = simulate(at_rate(requests, rate), cluster, profile=profile, seed=seed, oracle=False)
        return _sim_ok(res.summary, slo_s)

    if not holds(lo):
        return lo, "<="
    if holds(hi):
        return hi, ">="
    for _ in range(steps):
        mid = math.sqrt(lo * hi)
        if holds(mid):
            lo = mid
        else:
            hi = mid
    return lo, ""


def run_sim_workload(name: str, args: argparse.Namespace, block_size: int) -> WorkloadResult:
    from llmmesh.sim import ClusterSpec, PoolSpec, simulate

    spec = wl.MATRIX[name]
    natural = spec.build(sample_of(name, args, args.sim_sample), args.seed)
    shape = engine_shape(natural, args.cache_fraction, block_size)
    cap = rr_capacity(natural, args.replicas, shape).requests_per_s
    cluster = ClusterSpec(
        pools=(
            PoolSpec(
                args.replicas,
                max_batch_size=shape.max_batch_size,
                max_num_tokens=shape.max_num_tokens,
                num_kv_blocks=shape.num_kv_blocks,
            ),
        ),
        block_size=block_size,
    )
    requests = at_rate(natural, args.load * cap)
    oracle = oracle_hit_rate(requests, block_size)
    bound = capacity_limited_hit_rate(requests, block_size, args.replicas, shape.num_kv_blocks)
    eprint(
        f"[{name}] {len(requests)} requests at {args.load * cap:.2f} req/s "
        f"(load {args.load} of round-robin capacity {cap:.2f} req/s), "
        f"{shape.num_kv_blocks} KV blocks/replica, oracle {oracle:.3f}, bound {bound:.3f}"
    )
    summaries = []
    for arm in args.arms:
        t = time.perf_counter()
        res = simulate(requests, cluster, profile=arm, seed=args.seed, oracle=False)
        s = res.summary
        s.oracle_hit_rate = oracle
        s.extra["capacity_bound_hit_rate"] = bound
        summaries.append(s)
        eprint(
            f"[{name}/{arm}] mean TTFT {s.ttft_s.mean:.3f}s p99 {s.ttft_s.p99:.3f}s "
            f"hit {s.hit_rate:.3f} ({time.perf_counter() - t:.1f}s)"
        )
    out = WorkloadResult(
        name,
        spec.prefix_heavy,
        len(requests),
        args.load * cap,
        cap,
        shape.num_kv_blocks,
        oracle,
        bound,
        summaries,
    )
    if args.bisect_sample > 0:
        share = args.bisect_trace_sample if name == "mooncake" else args.bisect_sample
        small = spec.build(sample_of(name, args, share), args.seed)
        small_cap = rr_capacity(small, args.replicas, shape).requests_per_s
        for arm in [a for a in args.bisect_profiles if a in args.arms]:
            t = time.perf_counter()
            rate, bounded = sustainable_rate(
                small,
                cluster,
                arm,
                lo=0.25 * small_cap,
                hi=4.0 * small_cap,
                steps=args.bisect_steps,
                slo_s=args.slo_p99_s,
                seed=args.seed,
            )
            out.sustainable_req_s[arm] = rate
            out.sustainable_bounded[arm] = bounded
            eprint(
                f"[{name}/{arm}] sustains {bounded}{rate:.2f} req/s at p99 TTFT <= "
                f"{args.slo_p99_s}s ({time.perf_counter() - t:.1f}s)"
            )
    return out


# ------------------------------------------------------------------------------ tables, targets
def ratios_table(summaries: list[Summary]) -> str:
    base = next(s for s in summaries if s.arm == BASELINE)
    rows = [
        [
            s.arm,
            f"{ratio(s.ttft_s.mean, base.ttft_s.mean):.2f}",
            f"{ratio(s.ttft_s.p50, base.ttft_s.p50):.2f}",
            f"{ratio(s.ttft_s.p99, base.ttft_s.p99):.2f}",
            f"{ratio(s.throughput_tok_s, base.throughput_tok_s):.2f}",
            f"{ratio(s.hit_rate, base.hit_rate):.2f}",
        ]
        for s in summaries
    ]
    return format_table(
        [f"vs {BASELINE}", "TTFT mean x", "p50 x", "p99 x", "tok/s x", "hit rate x"], rows
    )


def _bound(s: Summary) -> float:
    return s.extra.get("capacity_bound_hit_rate", math.nan)


def matrix_table(results: Sequence[WorkloadResult], arms: Sequence[str]) -> str:
    """Per workload x profile: mean and p99 TTFT ratio vs round-robin, hit rate / bound,
    sustainable rate ratio."""
    headers = ["workload", "profile", "mean x", "p99 x", "hit", "hit/oracle", "hit/bound", "rate x"]
    rows: list[list[str]] = []
    for w in results:
        base = w.summary(BASELINE)
        for arm in arms:
            s = w.summary(arm)
            if s is None or base is None:
                continue
            rr = w.sustainable_req_s.get(BASELINE, math.nan)
            mine = w.sustainable_req_s.get(arm, math.nan)
            rate = ratio(mine, rr)
            mark = w.sustainable_bounded.get(arm, "") + (
                "/" + w.sustainable_bounded[BASELINE] if w.sustainable_bounded.get(BASELINE) else ""
            )
            rows.append(
                [
                    w.workload + (" *" if w.prefix_heavy else ""),
                    arm,
                    f"{ratio(s.ttft_s.mean, base.ttft_s.mean):.2f}",
                    f"{ratio(s.ttft_s.p99, base.ttft_s.p99):.2f}",
                    f"{s.hit_rate:.3f}",
                    f"{s.hit_vs_oracle:.2f}",
                    f"{ratio(s.hit_rate, _bound(s)):.2f}",
                    "-"
                    if math.isnan(rate)
                    else f"{rate:.2f}{(' ' + mark) if mark.strip('/') else ''}",
                ]
            )
    return format_table(headers, rows)


def checks(results: Sequence[WorkloadResult]) -> list[Check]:
    out: list[Check] = []
    for w in results:
        base = w.summary(BASELINE)
        if base is None:
            continue
        for arm in NEVER_WORSE:
            s = w.summary(arm)
            if s is None:
                continue
            out.append(
                Check(
                    f"{w.workload}: {arm} mean TTFT / rr",
                    ratio(s.ttft_s.mean, base.ttft_s.mean),
                    "<=",
                    1.0,
                )
            )
            out.append(
                Check(
                    f"{w.workload}: {arm} p99 TTFT / rr",
                    ratio(s.ttft_s.p99, base.ttft_s.p99),
                    "<=",
                    1.0,
                )
            )
        s = w.summary(HEADLINE)
        if not w.prefix_heavy or s is None:
            continue
        out.append(
            Check(
                f"{w.workload}: {HEADLINE} mean TTFT / rr",
                ratio(s.ttft_s.mean, base.ttft_s.mean),
                "<=",
                0.5,
            )
        )
        if HEADLINE in w.sustainable_req_s and BASELINE in w.sustainable_req_s:
            out.append(
                Check(
                    f"{w.workload}: {HEADLINE} sustainable rate / rr",
                    ratio(w.sustainable_req_s[HEADLINE], w.sustainable_req_s[BASELINE]),
                    ">=",
                    1.4,
                )
            )
        out.append(
            Check(
                f"{w.workload}: {HEADLINE} hit rate / capacity bound",
                ratio(s.hit_rate, w.bound),
                ">=",
                0.9,
            )
        )
    return out


def check_dicts(cs: Sequence[Check]) -> list[dict[str, Any]]:
    return [
        {"name": c.name, "value": c.value, "op": c.op, "bound": c.bound, "met": c.passed}
        for c in cs
    ]


def main_sim(args: argparse.Namespace) -> int:
    logging.disable(logging.WARNING)  # the orchestrator's per-replica readiness logs
    block_size = block_size_from_env()
    out: dict[str, Any] = {
        "mode": "sim",
        "args": {k: str(v) for k, v in vars(args).items()},
        "env": environment(),
        "workloads": {},
    }
    results: list[WorkloadResult] = []
    for name in args.workloads:
        w = run_sim_workload(name, args, block_size)
        results.append(w)
        print(f"== {name} ({w.requests} requests, {w.rate_req_s:.2f} req/s)\n")
        print(summary_table(w.summaries) + "\n")
        if w.summary(BASELINE) is not None:
            print(ratios_table(w.summaries) + "\n", flush=True)
        out["workloads"][name] = {
            "prefix_heavy": w.prefix_heavy,
            "requests": w.requests,
            "rate_req_s": w.rate_req_s,
            "rr_capacity_req_s": w.rr_capacity_req_s,
            "num_kv_blocks": w.num_kv_blocks,
            "oracle_hit_rate": w.oracle,
            "capacity_bound_hit_rate": w.bound,
            "summaries": [summary_dict(s) for s in w.summaries],
            "sustainable_req_s": w.sustainable_req_s,
            "sustainable_bounded": w.sustainable_bounded,
        }
    cs = checks(results)
    print(
        "== matrix (* prefix-heavy; ratios vs round-robin at load "
        f"{args.load}; rate x: sustainable rate at p99 TTFT <= {args.slo_p99_s}s)\n"
    )
    print(matrix_table(results, args.arms) + "\n")
    print(checks_table(cs))
    out["checks"] = check_dicts(cs)
    out["code_unchanged_during_run"] = check_code_unchanged(out["env"])
    path = write_json(args.out, out)
    print(f"\nwrote {path}")
    return 0


# ------------------------------------------------------------------------------ live
async def main_live(args: argparse.Namespace) -> int:
    block_size = block_size_from_env()
    arms = [Arm(name, profile=name) for name in args.arms]
    out: dict[str, Any] = {
        "mode": "live",
        "args": {k: str(v) for k, v in vars(args).items()},
        "env": environment(),
    }
    results: list[WorkloadResult] = []
    for workload in args.workloads:
        spec = wl.MATRIX[workload]
        natural = spec.build(sample_of(workload, args, args.live_sample), args.seed)
        shape = engine_shape(natural, args.cache_fraction, block_size)
        plan = plan_load(
            natural, replicas=args.replicas, shape=shape, load=args.load, duration_s=args.duration
        )
        oracle = oracle_hit_rate(plan.requests, block_size)
        bound = capacity_limited_hit_rate(
            plan.requests, block_size, args.replicas, shape.num_kv_blocks
        )
        d = wl.describe(plan.requests)
        header = (
            f"{workload}: {d['requests']} requests over {d['span_s']:.0f}s "
            f"({plan.offered_wall_req_s:.2f} req/s), TIME_SCALE {plan.emulator_time_scale:.3f}, "
            f"NUM_KV_BLOCKS {shape.num_kv_blocks}, oracle {oracle:.3f}, bound {bound:.3f}"
        )
        print(header, flush=True)
        mesh = MeshSpec(replicas=args.replicas, time_scale=plan.emulator_time_scale, shape=shape)
        wr: WorkloadRun = await run_arms(
            "routing",
            workload,
            arms,
            mesh,
            plan.requests,
            oracle=oracle,
            max_in_flight=args.max_in_flight,
        )
        for s in wr.summaries:
            s.extra["capacity_bound_hit_rate"] = bound
        results.append(
            WorkloadResult(
                workload,
                spec.prefix_heavy,
                len(plan.requests),
                plan.offered_wall_req_s,
                plan.capacity_wall_req_s,
                shape.num_kv_blocks,
                oracle,
                bound,
                wr.summaries,
            )
        )
        print(f"\n== {header}\n\n{summary_table(wr.summaries)}\n")
        if any(s.arm == BASELINE for s in wr.summaries):
            print(ratios_table(wr.summaries) + "\n", flush=True)
        out[workload] = workload_json(
            wr,
            mesh,
            {
                "workload": d,
                "calibration": plan.as_dict(),
                "oracle_hit_rate": oracle,
                "capacity_bound_hit_rate": bound,
            },
        )
    cs = checks(results)
    print(matrix_table(results, args.arms) + "\n")
    print(checks_table(cs))
    out["checks"] = check_dicts(cs)
    out["code_unchanged_during_run"] = check_code_unchanged(out["env"])
    path = write_json(args.out, out)
    print(f"\nwrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.mode == "sim":
        return main_sim(args)
    import uvloop

    return uvloop.run(main_live(args))


if __name__ == "__main__":
    sys.exit(main())
