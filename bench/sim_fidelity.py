"""Simulator fidelity: the same workload live on the local mesh (emulated replicas, the routing
benchmark's machinery) and in the simulator (`llmmesh.sim`), side by side.

Per workload (a shared-prefix set and a Mooncake sample, a few hundred requests each) the load
is calibrated as in `bench.routing` live mode (`bench.calibrate.plan_load`: arrivals over
`--duration` s at `--load` x round-robin capacity, emulator TIME_SCALE to match); each profile
runs `--live-runs` times live (a fresh mesh each) and `--sim-seeds` times simulated with the same
engines (batch, token budget, KV blocks, TIME_SCALE), the mesh's scrape period, and the fixed
per-hop latencies of `--latency-*`; the medians are compared, next to both ranges. One run is
not enough on either side: which requests queue behind which long prefill is decided by a few
ms (the scrape's phase, a lease cap skipping a replica for one round), so the mean TTFT of a
few hundred requests moves by tens of percent between live runs of the same code.

Autoscaled (`--autoscaled-duration`): `bench.autoscale`'s autoscaled arm (a compressed day of
the Azure trace, the local actuator starting and draining Triton processes) live once, and the
same requests, engines and autoscaler policy simulated (`Autoscale`, with the live run's median
start-up delay): replica-seconds, TTFT and scale events side by side.

The live mesh's fixed per-hop costs (`--latency-*`, defaults for this 2-core machine): 10.5 ms
from arrival to first token outside the engine, the median per-request TTFT difference live -
simulated without latencies (3 live runs per arm, 2026-12-04: shared-prefix 9.8-13.9 ms, Mooncake
7.7-10.5 ms), split by hop in the proportions `make bench-overhead` gave: admit 3 ms, registry lookup 1.5 ms, lease to engine
2.5 ms, first token to client 3.5 ms, last token to Complete 3 ms.

Targets (the issue's): p50 TTFT, mean TTFT and throughput within 10% of live, KV hit rate within
0.03, same ranking of profiles by mean TTFT. `--live-from` reuses the live half of an earlier
JSON (the live runs take minutes; run them under `flock /tmp/llmmesh-heavy.lock`).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import itertools
import json
import logging
import math
import statistics
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench import workloads as wl
from bench.arms import Arm, MeshSpec
from bench.autoscale_report import TimelinePoint
from bench.calibrate import EngineShape, plan_load
from bench.experiment import environment, run_arms
from bench.replay import Result
from bench.report import (
    RESULTS_DIR,
    Check,
    Summary,
    block_size_from_env,
    checks_table,
    format_table,
    oracle_hit_rate,
    summarize,
    summary_dict,
    write_json,
)
from bench.routing import engine_shape
from llmmesh.localmesh import PROBE_INTERVAL_S
from llmmesh.sim import Autoscale, ClusterSpec, Latencies, PoolSpec, SimResult, simulate

METRICS: tuple[tuple[str, Callable[[Summary], float]], ...] = (
    ("TTFT p50 s", lambda s: s.ttft_s.p50),
    ("TTFT mean s", lambda s: s.ttft_s.mean),
    ("TTFT p99 s", lambda s: s.ttft_s.p99),
    ("ITL mean ms", lambda s: s.itl_s.mean * 1e3),
    ("out tok/s", lambda s: s.throughput_tok_s),
    ("hit rate", lambda s: s.hit_rate),
)
TARGETED = ("TTFT p50 s", "TTFT mean s", "out tok/s")
WORKLOADS = {"shared-prefix": ("shared-prefix-few", 0.6), "mooncake": ("mooncake", 0.1)}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.sim_fidelity", description=__doc__)
    p.add_argument("--workloads", nargs="*", choices=sorted(WORKLOADS), default=sorted(WORKLOADS))
    p.add_argument("--profiles", nargs="+", default=["round-robin", "default"])
    p.add_argument("--replicas", type=int, default=4)
    p.add_argument("--requests", type=int, default=300, help="At most this many per workload.")
    p.add_argument("--load", type=float, default=0.8)
    p.add_argument("--duration", type=float, default=40.0, help="Seconds of arrivals.")
    p.add_argument("--cache-fraction", type=float, default=0.4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--latency-admit-s", type=float, default=0.003)
    p.add_argument("--latency-lookup-s", type=float, default=0.0015)
    p.add_argument("--latency-dispatch-s", type=float, default=0.0025)
    p.add_argument(
        "--gauge-period-s",
        type=float,
        default=0.1,
        help="Model the backend's gauge copy period (LLMMESH_EMULATOR_METRICS_INTERVAL_MS).",
    )
    p.add_argument(
        "--latency-jitter",
        type=float,
        default=1.0,
        help="+- fraction per hop, drawn uniformly per request (seeded). 1.0, the widest the "
        "draw allows (a delay in [0, 2x]): live, unqueued cached requests' TTFT minus their "
        "simulated TTFT without latencies spreads over an IQR of about 20 ms (shared-prefix "
        "default, 6 runs, 2026-12-05), where jitter 1.0 on these hops gives about 4 ms. Without "
        "timing noise every seed takes the same branch where a few ms decide a placement, and "
        "live runs take both.",
    )
    p.add_argument("--latency-first-token-s", type=float, default=0.0035)
    p.add_argument("--latency-completion-s", type=float, default=0.003)
    p.add_argument(
        "--sim-seeds",
        type=int,
        default=9,
        help="Simulated runs per profile (seeds: scrape phase, rng); the median is compared.",
    )
    p.add_argument(
        "--autoscaled-duration",
        type=float,
        default=120.0,
        help="Seconds of the autoscaled run's compressed day (`bench.autoscale`'s workload, "
        "policy and local actuator); 0 skips it.",
    )
    p.add_argument(
        "--startup-delay-s",
        type=float,
        default=None,
        help="Simulated replica start-up (default: the live run's median, start to ready; "
        f"{FALLBACK_STARTUP_DELAY_S:g} s when it started none).",
    )
    p.add_argument(
        "--live-runs",
        type=int,
        default=3,
        help="Live runs per workload (fresh mesh each); their median is compared. Mean TTFT of a "
        "few hundred requests moves by tens of percent between live runs of the same code.",
    )
    p.add_argument("--live-from", type=Path, default=None, help="Reuse live results (JSON).")
    p.add_argument("--out", default="sim-fidelity.json")
    return p


def latencies(args: argparse.Namespace) -> Latencies:
    """The live mesh's fixed per-hop costs (`--latency-*`)."""
    return Latencies(
        admit_s=args.latency_admit_s,
        lookup_s=args.latency_lookup_s,
        dispatch_s=args.latency_dispatch_s,
        jitter=args.latency_jitter,
        first_token_s=args.latency_first_token_s,
        completion_s=args.latency_completion_s,
    )


def _results(records: list[dict[str, Any]]) -> list[Result]:
    return [Result(**r) for r in records]


def _rel(sim: float, live: float) -> float:
    return (sim - live) / live if live and not math.isnan(live) else math.nan


def startup_delays(timeline: Sequence[TimelinePoint]) -> list[float]:
    """Seconds from each replica's start (a rise of `starting`) to it being ready (a rise of
    `ready`, counting replicas that moved on to `draining` in the same interval), first started
    first ready, from a live autoscaler timeline. Starts that leave `starting` without becoming
    ready were cancelled, newest first (as the local actuator does)."""
    pts = sorted(timeline, key=lambda p: p.t_s)
    # Replicas starting at the first sample count from it.
    started: list[float] = [pts[0].t_s] * pts[0].starting if pts else []
    out: list[float] = []
    for a, b in itertools.pairwise(pts):
        up = max(0, b.ready - a.ready + max(0, b.draining - a.draining))
        new = b.starting - a.starting + up  # starts in the interval, less cancellations
        if new > 0:
            started.extend([b.t_s] * new)
        elif new < 0:
            del started[max(0, len(started) + new) :]
        for _ in range(up):
            if started:
                out.append(b.t_s - started.pop(0))
    return out


def _sim_timeline(res: SimResult) -> list[TimelinePoint]:
    """The simulator's samples as the live timeline's points: ready, and the rest of the
    provisioned replicas (starting or draining) as `starting`, so `existing` is what is paid for;
    a simulated scale-down therefore counts when its drain ends (live: when it starts)."""
    out = []
    for smp in res.timeline:
        prov, ready = sum(smp.provisioned.values()), sum(smp.ready.values())
        out.append(TimelinePoint(smp.t_s, prov, ready, max(0, prov - ready)))
    return out


# Start-up delay for the simulated actuator when the live run started no replica (a Triton
# process with the emulator becomes ready in 2-3 s on this machine: the live timelines).
FALLBACK_STARTUP_DELAY_S = 3.0

AUTOSCALED_METRICS = (
    ("replica-s", "replica_seconds"),
    ("mean replicas", "mean_replicas"),
    ("TTFT p50 s", "ttft_p50_s"),
    ("TTFT mean s", "ttft_mean_s"),
    ("TTFT p99 s", "ttft_p99_s"),
    ("TTFT-SLO attainment", "slo_attainment"),
    ("replicas added", "scale_ups"),
    ("replicas removed", "scale_downs"),
)


def autoscaled(
    args: argparse.Namespace, previous: dict[str, Any] | None
) -> tuple[list[list[str]], list[Check], dict[str, Any]]:
    """`bench.autoscale`'s autoscaled arm (compressed Azure day, local actuator) live, and the
    same requests, engines and autoscaler policy in the simulator (`Autoscale`, start-up delay
    from the live run)."""
    from bench import autoscale as ab

    argv = ["--arms", "autoscaled", "--duration", f"{args.autoscaled_duration:g}"]
    aargs = ab.build_parser().parse_args([*argv, "--out", "sim-fidelity-autoscale"])
    shape = EngineShape(max_batch_size=aargs.max_batch)
    pl = ab.plan(aargs, shape)
    pol = ab.policy(aargs, pl, shape)
    if previous is not None:
        earlier = previous["autoscaled"]
        if float(earlier.get("duration_s", math.nan)) != args.autoscaled_duration:
            raise SystemExit(
                f"--live-from holds an autoscaled run of {earlier.get('duration_s')} s, not "
                f"--autoscaled-duration {args.autoscaled_duration:g}"
            )
        live = earlier["live"]
        timeline = [TimelinePoint(**p) for p in earlier["live_timeline"]]
    else:
        if ab.main([*argv, "--out", "sim-fidelity-autoscale"]) != 0:
            raise SystemExit("the live autoscaled run failed")
        got = json.loads((RESULTS_DIR / "sim-fidelity-autoscale.json").read_text())
        live = got["arms"]["autoscaled"]
        timeline = [TimelinePoint(**p) for p in got["timelines"]["autoscaled"]]
    delays = startup_delays(timeline)
    delay = args.startup_delay_s
    if delay is None:
        delay = statistics.median(delays) if delays else FALLBACK_STARTUP_DELAY_S
    end_s = float(live["end_s"])
    cluster = ClusterSpec(
        pools=(
            PoolSpec(
                max(aargs.min_replicas, 1),
                max_batch_size=shape.max_batch_size,
                max_num_tokens=shape.max_num_tokens,
                num_kv_blocks=shape.num_kv_blocks,
                time_scale=pl.time_scale,
                gauge_period_s=args.gauge_period_s,
                autoscale=Autoscale(
                    policy=pol,
                    interval_s=1.0,
                    startup_delay_s=delay,
                    signal_window_s=aargs.rate_window,
                ),
            ),
        ),
        block_size=shape.block_size,
        metrics_interval_s=PROBE_INTERVAL_S,
        latencies=latencies(args),
    )
    sims: list[dict[str, float]] = []
    for k in range(args.sim_seeds):
        res = simulate(
            pl.requests, cluster, "default", args.seed + k, oracle=False, timeline_interval_s=1.0
        )
        sims.append(
            ab.arm_row(
                ab.ArmOutcome("sim", res.results, _sim_timeline(res), res.wall_s, ""),
                end_s,
                aargs.ttft_slo,
            )
        )
    rows: list[list[str]] = []
    checks: list[Check] = []
    name = f"autoscaled (start-up {delay:.1f} s)"
    for metric, key in AUTOSCALED_METRICS:
        a = float(live[key]) if key in live else math.nan
        values = sorted(x[key] for x in sims)
        b = statistics.median(values)
        diff = f"{b - a:+.3f}" if key == "slo_attainment" else f"{_rel(b, a):+.1%}"
        rows.append(
            [
                name,
                "default",
                metric,
                f"{a:.4g}",
                "1 run",
                f"{b:.4g}",
                f"{values[0]:.4g}-{values[-1]:.4g}",
                diff,
            ]
        )
        if key in ("replica_seconds", "ttft_p50_s", "ttft_mean_s"):
            checks.append(Check(f"autoscaled {metric} |rel err|", abs(_rel(b, a)), "<=", 0.10))
    data = {
        "duration_s": args.autoscaled_duration,
        "live": live,
        "live_timeline": [dataclasses.asdict(p) for p in timeline],
        "startup_delays_s": delays,
        "startup_delay_s": delay,
        "sim": sims,
        "time_scale": pl.time_scale,
    }
    return rows, checks, data


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.live_runs < 1:
        raise SystemExit("--live-runs must be at least 1")
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("services").setLevel(logging.ERROR)  # the simulated orchestrator's
    block_size = block_size_from_env()
    previous = json.loads(args.live_from.read_text()) if args.live_from else None
    out: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}}
    out["env"] = environment()
    rows: list[list[str]] = []
    checks: list[Check] = []
    for name in args.workloads:
        matrix_name, sample = WORKLOADS[name]
        natural = sorted(wl.MATRIX[matrix_name].build(sample, args.seed), key=lambda r: r.arrival_s)
        natural = natural[: args.requests]
        shape = engine_shape(natural, args.cache_fraction, block_size)
        plan = plan_load(
            natural, replicas=args.replicas, shape=shape, load=args.load, duration_s=args.duration
        )
        oracle = oracle_hit_rate(plan.requests, block_size)
        print(
            f"{name}: {len(plan.requests)} requests over {args.duration:.0f} s, TIME_SCALE "
            f"{plan.emulator_time_scale:.3f}, NUM_KV_BLOCKS {shape.num_kv_blocks}, oracle "
            f"{oracle:.3f}",
            flush=True,
        )
        lives: dict[str, list[Summary]] = {p: [] for p in args.profiles}
        live_records: dict[str, list[list[dict[str, Any]]]] = {p: [] for p in args.profiles}
        if previous is not None:
            earlier = previous["workloads"][name]
            # One run per profile in files written before `--live-runs`.
            runs_of = earlier.get("live_runs") or {
                p: [recs] for p, recs in earlier["live_results"].items()
            }
            for prof, runs in runs_of.items():
                for recs in runs:
                    lives.setdefault(prof, []).append(
                        summarize(prof, _results(recs), oracle=oracle)
                    )
                    live_records.setdefault(prof, []).append(recs)
        else:
            mesh = MeshSpec(args.replicas, plan.emulator_time_scale, shape)
            for _ in range(args.live_runs):
                run = asyncio.run(
                    run_arms(
                        "sim-fidelity",
                        name,
                        [Arm(p, profile=p) for p in args.profiles],
                        mesh,
                        plan.requests,
                        oracle=oracle,
                    )
                )
                for arm_run, s in zip(run.runs, run.summaries, strict=True):
                    lives[s.arm].append(s)
                    live_records[s.arm].append(
                        [{**r.__dict__, "gaps_s": []} for r in arm_run.results]
                    )
        cluster = ClusterSpec(
            pools=(
                PoolSpec(
                    args.replicas,
                    max_batch_size=shape.max_batch_size,
                    max_num_tokens=shape.max_num_tokens,
                    num_kv_blocks=shape.num_kv_blocks,
                    time_scale=plan.emulator_time_scale,
                    gauge_period_s=args.gauge_period_s,
                ),
            ),
            block_size=block_size,
            metrics_interval_s=PROBE_INTERVAL_S,
            latencies=latencies(args),
        )
        sims: dict[str, list[Summary]] = {}
        for prof in args.profiles:
            sims[prof] = []
            for k in range(args.sim_seeds):
                res = simulate(plan.requests, cluster, prof, args.seed + k, oracle=False)
                res.summary.oracle_hit_rate = oracle
                sims[prof].append(res.summary)
        sim_mean_ttft: dict[str, float] = {}
        live_mean_ttft: dict[str, float] = {}
        for prof in args.profiles:
            lv, runs = lives[prof], sims[prof]
            for metric, get in METRICS:
                live_values = sorted(get(s) for s in lv)
                a = statistics.median(live_values)
                values = sorted(get(s) for s in runs)
                b = statistics.median(values)
                diff = f"{b - a:+.3f}" if metric == "hit rate" else f"{_rel(b, a):+.1%}"
                spread = f"{values[0]:.4g}-{values[-1]:.4g}"
                live_spread = f"{live_values[0]:.4g}-{live_values[-1]:.4g}"
                rows.append([name, prof, metric, f"{a:.4g}", live_spread, f"{b:.4g}", spread, diff])
                if metric == "hit rate":
                    checks.append(Check(f"{name}/{prof} hit rate |diff|", abs(b - a), "<=", 0.03))
                elif metric in TARGETED:
                    checks.append(
                        Check(f"{name}/{prof} {metric} |rel err|", abs(_rel(b, a)), "<=", 0.10)
                    )
                if metric == "TTFT mean s":
                    sim_mean_ttft[prof] = b
                    live_mean_ttft[prof] = a
        rank_live = sorted(args.profiles, key=lambda p: live_mean_ttft[p])
        rank_sim = sorted(args.profiles, key=lambda p: sim_mean_ttft[p])
        checks.append(
            Check(
                f"{name} same profile ranking (mean TTFT)", float(rank_live == rank_sim), ">=", 1.0
            )
        )
        out.setdefault("workloads", {})[name] = {
            "calibration": plan.as_dict(),
            "num_kv_blocks": shape.num_kv_blocks,
            "oracle_hit_rate": oracle,
            "live": {p: [summary_dict(s) for s in runs] for p, runs in lives.items()},
            "sim": {p: [summary_dict(s) for s in runs] for p, runs in sims.items()},
            "ranking": {"live": rank_live, "sim": rank_sim},
            "live_runs": live_records,
        }
    if args.autoscaled_duration > 0 and previous is not None and "autoscaled" not in previous:
        print("(no autoscaled run in --live-from: skipped)")
    elif args.autoscaled_duration > 0:
        a_rows, a_checks, out["autoscaled"] = autoscaled(args, previous)
        rows += a_rows
        checks += a_checks
    print()
    headers = [
        "workload",
        "profile",
        "metric",
        "live (median)",
        "live range",
        f"sim (median of {args.sim_seeds})",
        "sim range",
        "sim vs live",
    ]
    print(format_table(headers, rows))
    print()
    print(checks_table(checks))
    out["checks"] = [
        {"name": c.name, "value": c.value, "op": c.op, "bound": c.bound, "passed": c.passed}
        for c in checks
    ]
    path = write_json(args.out, out, RESULTS_DIR)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
