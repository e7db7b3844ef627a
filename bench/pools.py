"""`make bench-pools`: one shared pool ("fifo") vs length-bucketed pools, on a mixed long/short
workload, in one run.

Workload: unique prompts (no prefix sharing), a share `--long-fraction` of long requests (prompts
of 6-8k tokens) among short ones (32-256 tokens), Poisson arrivals.
Arms (orchestrator profile `--profile`, `default` unless given, in both):
  fifo:  no pools in the policy: every replica takes every request, one admission queue;
  pools: `pools: {short: {max_prompt_tokens: 2048}, long: {max_prompt_tokens: 32768}}` with
         `--short-replicas` replicas in `short` and the rest in `long`. By default the short
         pool is sized by the short requests' share of the engine work (`short_work_share`,
         from the cost model; rounded up, at least one replica per pool): a pool split only pays
         where whole replicas can match the shares; at 4 replicas the smallest short pool is a
         quarter of the cluster for ~6% of the work, which long requests' goodput pays for.
Also, for reference, the shared pool under round-robin ("fifo-rr": what a length-blind load
balancer gives short requests).
Modes: `sim` (default; the cluster simulator, `llmmesh.sim`, on virtual time) or `live` (a fresh
local mesh per arm). Load: the arrival rate is `--load` (0.8) of the capacity of the shared
cluster with round-robin placement (cost model, `bench.calibrate`).

Judged by what matters to each class: short requests by p50 and p99 TTFT, long requests by
goodput (output tokens per second of long requests whose TTFT met `--long-slo-s`, over the same
span in both arms; by default twice the median long prompt's prefill on an idle engine, an SLO
that load can miss: a looser one, met by every long request in every arm, judged nothing). Prints TTFT per class and arm, the ratios pools/fifo measured in this run,
and the issue's targets (short p50 and p99 TTFT <= 0.2x, long goodput >= 0.95x), and the short
requests' TTFT floor: the median short prompt's one prefill step on an idle engine, which no
placement goes below (against a load-aware shared pool whose short p50 is already near it, a
0.2x p50 is below the floor); writes `bench-results/pools.json`.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from collections.abc import Sequence
from typing import Any

from bench import workloads as wl
from bench.arms import Arm, MeshSpec
from bench.calibrate import EngineShape, engine_seconds, plan_load, rr_capacity
from bench.experiment import check_code_unchanged, environment, run_arms, workload_json
from bench.replay import Result
from bench.report import (
    Check,
    Summary,
    block_size_from_env,
    checks_table,
    eprint,
    format_table,
    ratio,
    summarize,
    summary_dict,
    summary_table,
    write_json,
)
from llmmesh.accelerators import get_profile, prefill_shape

SHORT_MAX_PROMPT = 2048
LONG_MAX_PROMPT = 32768
CLASSES = ("short", "long")
# The long requests' TTFT objective (goodput), as a multiple of a long prompt's TTFT on an idle engine.
LONG_SLO_X = 2.0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench pools",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--mode", choices=["sim", "live"], default="sim")
    p.add_argument("--profile", default="default", help="Orchestrator profile of both arms.")
    p.add_argument(
        "--replicas",
        type=int,
        default=8,
        help="Cluster size (both arms). Pools are whole replicas: at 4 the smallest short pool is "
        "a quarter of the cluster for a few percent of the work.",
    )
    p.add_argument(
        "--short-replicas",
        type=int,
        default=None,
        help="Replicas of the short pool (default: sized by the short requests' share of the "
        "engine work, `short_pool_size`).",
    )
    p.add_argument("--load", type=float, default=0.8, help="Share of the shared pool's capacity.")
    p.add_argument("--requests", type=int, default=800)
    p.add_argument("--duration", type=float, default=150.0, help="Seconds of arrivals (live).")
    p.add_argument("--long-fraction", type=float, default=0.3)
    p.add_argument("--short-prompt", type=int, nargs=2, default=[32, 256], metavar=("MIN", "MAX"))
    p.add_argument("--short-output", type=int, nargs=2, default=[16, 64], metavar=("MIN", "MAX"))
    p.add_argument("--long-prompt", type=int, nargs=2, default=[6144, 7936], metavar=("MIN", "MAX"))
    p.add_argument("--long-output", type=int, nargs=2, default=[32, 128], metavar=("MIN", "MAX"))
    p.add_argument(
        "--long-slo-s",
        type=float,
        default=None,
        help=f"TTFT a long request must meet (default: {LONG_SLO_X:g}x the median long prompt's "
        "prefill on an idle engine).",
    )
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--max-in-flight", type=int, default=512, help="Load-generator safety cap.")
    p.add_argument("--out", default="pools.json", help="File name under bench-results/.")
    return p


def pools_policy() -> dict[str, Any]:
    return {
        "pools": {
            "short": {"max_prompt_tokens": SHORT_MAX_PROMPT},
            "long": {"max_prompt_tokens": LONG_MAX_PROMPT},
        }
    }


def arms(replicas: int, short_replicas: int, profile: str = "default") -> list[Arm]:
    if not 0 < short_replicas < replicas:
        raise ValueError("--short-replicas must leave at least one replica in each pool")
    pools = ["short"] * short_replicas + ["long"] * (replicas - short_replicas)
    return [
        Arm("fifo", profile=profile),
        Arm("pools", profile=profile, policy=pools_policy(), replica_pools=pools),
    ]


def workload(args: argparse.Namespace) -> list[wl.Request]:
    natural = wl.mixed_lengths(
        requests=args.requests,
        long_fraction=args.long_fraction,
        short=wl.LengthClass("short", tuple(args.short_prompt), tuple(args.short_output)),
        long=wl.LengthClass("long", tuple(args.long_prompt), tuple(args.long_output)),
        rate=1.0,  # rescaled to the load
        seed=args.seed,
    )
    if max(r.prompt_tokens + r.max_tokens for r in natural) > 8192:
        raise SystemExit("prompt + output must fit the 8192-token context (max_num_tokens)")
    return natural


def short_work_share(requests: Sequence[wl.Request], shape: EngineShape) -> float:
    """The short requests' share of the engine work (`calibrate.engine_seconds` per class)."""
    short = engine_seconds([r for r in requests if r.meta["class"] == "short"], shape)
    long = engine_seconds([r for r in requests if r.meta["class"] == "long"], shape)
    return short / (short + long) if short + long > 0 else 0.0


def short_pool_size(replicas: int, share: float) -> int:
    """Replicas for a pool doing `share` of the work: its share rounded up, at least one, and
    at least one left to the other pool."""
    if replicas < 2:
        raise ValueError("pools need at least two replicas")
    return min(replicas - 1, max(1, math.ceil(replicas * share - 1e-9)))


def short_ttft_floor_s(requests: Sequence[wl.Request], shape: EngineShape) -> float:
    """Median TTFT of a short request alone on an idle engine: its one prefill step. No
    placement can go below it."""
    return idle_ttft_s(requests, shape, "short")


def idle_ttft_s(requests: Sequence[wl.Request], shape: EngineShape, cls: str) -> float:
    """Median TTFT of a request of class `cls` alone on an idle engine: its prefill steps
    (one each `max_num_tokens` of its prompt)."""
    profile = get_profile(shape.cost_profile)
    times = []
    for r in requests:
        if r.meta["class"] != cls:
            continue
        t, done = 0.0, 0
        while done < r.prompt_tokens:
            chunk = min(shape.max_num_tokens, r.prompt_tokens - done)
            t += profile.step_time_s(prefill_shape(chunk, done))
            done += chunk
        times.append(t)
    times.sort()
    return times[len(times) // 2] if times else math.nan


def long_slo_s(
    args: argparse.Namespace, requests: Sequence[wl.Request], shape: EngineShape
) -> float:
    """`--long-slo-s`, or LONG_SLO_X times a long request's TTFT on an idle engine."""
    if args.long_slo_s is not None:
        return float(args.long_slo_s)
    return LONG_SLO_X * idle_ttft_s(requests, shape, "long")


def resolve_split(
    args: argparse.Namespace, requests: Sequence[wl.Request], shape: EngineShape
) -> float:
    """Fills `args.short_replicas` when not given; returns the short work share."""
    if args.replicas < 2:
        raise SystemExit("--replicas: pools need at least two replicas")
    share = short_work_share(requests, shape)
    if args.short_replicas is None:
        args.short_replicas = short_pool_size(args.replicas, share)
    if not 0 < args.short_replicas < args.replicas:
        raise SystemExit("--short-replicas must leave at least one replica in each pool")
    return share


def goodput_tok_s(results: Sequence[Result], slo_s: float, span_s: float) -> float:
    """Output tokens per second of the requests that completed with TTFT <= slo_s."""
    good = sum(
        r.output_tokens for r in results if r.ok and r.ttft_s is not None and r.ttft_s <= slo_s
    )
    return good / span_s if span_s > 0 else math.nan


def by_class(arm: str, results: Sequence[Result], slo_s: float, span_s: float) -> list[Summary]:
    out = []
    for cls in CLASSES:
        mine = [r for r in results if r.meta.get("class") == cls]
        s = summarize(f"{arm}/{cls}", mine)
        s.extra["goodput_tok_s"] = goodput_tok_s(mine, slo_s, span_s)
        out.append(s)
    return out


def ratio_rows(base: dict[str, Summary], pools: dict[str, Summary], label: str) -> str:
    rows = []
    for cls in CLASSES:
        f, p = base[cls], pools[cls]
        rows.append(
            [
                cls,
                f"{ratio(p.ttft_s.mean, f.ttft_s.mean):.3f}",
                f"{ratio(p.ttft_s.p50, f.ttft_s.p50):.3f}",
                f"{ratio(p.ttft_s.p99, f.ttft_s.p99):.3f}",
                f"{ratio(p.extra['goodput_tok_s'], f.extra['goodput_tok_s']):.3f}",
            ]
        )
    return format_table([f"pools / {label}", "TTFT mean x", "p50 x", "p99 x", "goodput x"], rows)


def checks(fifo: dict[str, Summary], pools: dict[str, Summary], label: str = "fifo") -> list[Check]:
    return [
        Check(
            f"short p50 TTFT pools / {label}",
            ratio(pools["short"].ttft_s.p50, fifo["short"].ttft_s.p50),
            "<=",
            0.2,
        ),
        Check(
            f"short p99 TTFT pools / {label}",
            ratio(pools["short"].ttft_s.p99, fifo["short"].ttft_s.p99),
            "<=",
            0.2,
        ),
        Check(
            f"long goodput pools / {label}",
            ratio(pools["long"].extra["goodput_tok_s"], fifo["long"].extra["goodput_tok_s"]),
            ">=",
            0.95,
        ),
    ]


def check_dicts(cs: Sequence[Check]) -> list[dict[str, Any]]:
    return [
        {"name": c.name, "value": c.value, "op": c.op, "bound": c.bound, "met": c.passed}
        for c in cs
    ]


def report(
    header: str,
    per_arm: dict[str, list[Summary]],
    overall: Sequence[Summary],
    floor_s: float,
) -> tuple[str, list[Check]]:
    """Tables and checks; `floor_s` is the short requests' TTFT floor in the run's time."""
    named = {arm: {s.arm.split("/")[1]: s for s in ss} for arm, ss in per_arm.items()}
    cs = checks(named["fifo"], named["pools"])
    rr = checks(named["fifo-rr"], named["pools"], "fifo-rr") if "fifo-rr" in named else []
    rows = [s for ss in per_arm.values() for s in ss] + list(overall)
    good = format_table(
        ["arm/class", "goodput tok/s"],
        [[s.arm, f"{s.extra['goodput_tok_s']:.1f}"] for ss in per_arm.values() for s in ss],
    )
    parts = [f"== {header}", summary_table(rows), good]
    parts.append(ratio_rows(named["fifo"], named["pools"], "fifo"))
    if "fifo-rr" in named:
        parts.append(ratio_rows(named["fifo-rr"], named["pools"], "fifo-rr"))
    parts.append(checks_table(cs))
    fifo_p50 = named["fifo"]["short"].ttft_s.p50
    parts.append(
        f"short TTFT floor (median short prompt's one prefill step on an idle engine): "
        f"{floor_s * 1e3:.1f} ms = {ratio(floor_s, fifo_p50):.3f} x fifo's short p50 "
        f"({fifo_p50 * 1e3:.1f} ms); no placement brings short p50 below it"
    )
    if rr:
        parts.append("reference (shared pool under round-robin):\n" + checks_table(rr))
    return "\n\n".join(parts), cs + rr


def span_of(requests: Sequence[wl.Request]) -> float:
    return max(r.arrival_s for r in requests) - min(r.arrival_s for r in requests)


def main_sim(args: argparse.Namespace) -> int:
    from bench.routing import at_rate
    from llmmesh.sim import ClusterSpec, PoolSpec, simulate

    logging.disable(logging.WARNING)
    block_size = block_size_from_env()
    natural = workload(args)
    shape = EngineShape(block_size=block_size)
    share = resolve_split(args, natural, shape)
    cap = rr_capacity(natural, args.replicas, shape).requests_per_s
    requests = at_rate(natural, args.load * cap)
    span = span_of(requests)
    slo_s = long_slo_s(args, requests, shape)
    n_long = args.replicas - args.short_replicas
    clusters = {
        "fifo": (
            ClusterSpec(pools=(PoolSpec(args.replicas),), block_size=block_size),
            args.profile,
        ),
        "pools": (
            ClusterSpec(
                pools=(
                    PoolSpec(args.short_replicas, name="short", max_prompt_tokens=SHORT_MAX_PROMPT),
                    PoolSpec(n_long, name="long", max_prompt_tokens=LONG_MAX_PROMPT),
                ),
                block_size=block_size,
            ),
            args.profile,
        ),
        "fifo-rr": (
            ClusterSpec(pools=(PoolSpec(args.replicas),), block_size=block_size),
            "round-robin",
        ),
    }
    per_arm: dict[str, list[Summary]] = {}
    overall: list[Summary] = []
    for arm, (cluster, profile) in clusters.items():
        res = simulate(requests, cluster, profile=profile, seed=args.seed, oracle=False)
        per_arm[arm] = by_class(arm, res.results, slo_s, span)
        s = res.summary
        s.arm = arm
        s.extra["goodput_tok_s"] = goodput_tok_s(res.results, slo_s, span)
        overall.append(s)
        eprint(f"[pools/{arm}] {profile}: mean TTFT {s.ttft_s.mean:.3f}s ({res.wall_s:.1f}s)")
    longs = sum(1 for r in requests if r.meta["class"] == "long")
    header = (
        f"mixed (sim): {len(requests)} requests ({longs} long) at {args.load * cap:.2f} req/s "
        f"(load {args.load} of shared round-robin capacity {cap:.2f} req/s); profile "
        f"{args.profile}; pools: {args.short_replicas} short + {n_long} long replicas (short "
        f"requests' share of the work {share:.3f}); "
        f"long SLO TTFT <= {slo_s:.3f}s"
    )
    floor_s = short_ttft_floor_s(requests, shape)
    text, cs = report(header, per_arm, overall, floor_s)
    print("\n" + text)
    out: dict[str, Any] = {
        "mode": "sim",
        "args": {k: str(v) for k, v in vars(args).items()},
        "env": environment(),
        "short_work_share": share,
        "short_ttft_floor_s": floor_s,
        "long_slo_s": slo_s,
        "by_class": {
            arm: [{"class": s.arm.split("/")[1], **summary_dict(s)} for s in ss]
            for arm, ss in per_arm.items()
        },
        "overall": [summary_dict(s) for s in overall],
        "checks": check_dicts(cs),
    }
    out["code_unchanged_during_run"] = check_code_unchanged(out["env"])
    path = write_json(args.out, out)
    print(f"\nwrote {path}")
    return 0


async def main_live(args: argparse.Namespace) -> int:
    env = environment()
    block_size = block_size_from_env()
    natural = workload(args)
    shape = EngineShape(block_size=block_size)
    share = resolve_split(args, natural, shape)
    plan = plan_load(
        natural, replicas=args.replicas, shape=shape, load=args.load, duration_s=args.duration
    )
    d = wl.describe(plan.requests)
    longs = sum(1 for r in plan.requests if r.meta["class"] == "long")
    header = (
        f"mixed (live): {d['requests']} requests ({longs} long) over {d['span_s']:.0f}s "
        f"({plan.offered_wall_req_s:.2f} req/s); TIME_SCALE {plan.emulator_time_scale:.3f}; "
        f"pools: {args.short_replicas} short + {args.replicas - args.short_replicas} long replicas "
        f"(short requests' share of the work {share:.3f})"
    )
    print(header, flush=True)
    spec = MeshSpec(replicas=args.replicas, time_scale=plan.emulator_time_scale, shape=shape)
    wr = await run_arms(
        "pools",
        "mixed",
        [*arms(args.replicas, args.short_replicas, args.profile), Arm("fifo-rr", "round-robin")],
        spec,
        plan.requests,
        max_in_flight=args.max_in_flight,
    )
    span = span_of(plan.requests)
    slo = long_slo_s(args, plan.requests, shape) * plan.emulator_time_scale
    per_arm = {run.arm.name: by_class(run.arm.name, run.results, slo, span) for run in wr.runs}
    for s, run in zip(wr.summaries, wr.runs, strict=True):
        s.extra["goodput_tok_s"] = goodput_tok_s(run.results, slo, span)
    floor_s = short_ttft_floor_s(plan.requests, shape) * plan.emulator_time_scale
    text, cs = report(header, per_arm, wr.summaries, floor_s)
    print("\n" + text)
    out: dict[str, Any] = {
        "mode": "live",
        "args": {k: str(v) for k, v in vars(args).items()},
        "env": env,
        **workload_json(
            wr,
            spec,
            {
                "workload": d,
                "calibration": plan.as_dict(),
                "by_class": {
                    arm: [{"class": s.arm.split("/")[1], **summary_dict(s)} for s in summaries]
                    for arm, summaries in per_arm.items()
                },
                "checks": check_dicts(cs),
                "short_work_share": share,
                "short_ttft_floor_s": floor_s,
            },
        ),
    }
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
