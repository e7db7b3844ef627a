"""`make bench-pools`: one shared FIFO pool vs length-bucketed pools, on a mixed long/short
workload, in one run.

Workload: unique prompts (no prefix sharing), a share `--long-fraction` of long requests (prompts
of 6-8k tokens) among short ones (32-256 tokens), Poisson arrivals.
Arms (each on a fresh local mesh, orchestrator profile `default` in both):
  fifo:  no pools in the policy: every replica takes every request, one admission queue;
  pools: `pools: {short: {max_prompt_tokens: 2048}, long: {max_prompt_tokens: 32768}}` with
         `--short-replicas` replicas in `short` and the rest in `long`.
Load: the emulator TIME_SCALE puts the arrival rate at `--load` (0.8) of the capacity of the
shared cluster with round-robin placement (cost model, `bench.calibrate`).

Prints TTFT and throughput per class and arm, the ratios pools/fifo measured in this run, and the
spec's targets (short p50 TTFT <= 0.05x, long throughput >= 0.95x); writes
`bench-results/pools.json`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from bench import workloads as wl
from bench.arms import Arm, MeshSpec
from bench.calibrate import EngineShape, plan_load
from bench.experiment import check_code_unchanged, environment, run_arms, workload_json
from bench.replay import Result
from bench.report import (
    Check,
    Summary,
    block_size_from_env,
    checks_table,
    format_table,
    ratio,
    summarize,
    summary_dict,
    summary_table,
    write_json,
)

SHORT_MAX_PROMPT = 2048
LONG_MAX_PROMPT = 32768


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench pools",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--replicas", type=int, default=4)
    p.add_argument("--short-replicas", type=int, default=1)
    p.add_argument("--load", type=float, default=0.8, help="Share of the shared pool's capacity.")
    p.add_argument("--requests", type=int, default=800)
    p.add_argument("--duration", type=float, default=150.0, help="Seconds of arrivals.")
    p.add_argument("--long-fraction", type=float, default=0.3)
    p.add_argument("--short-prompt", type=int, nargs=2, default=[32, 256], metavar=("MIN", "MAX"))
    p.add_argument("--short-output", type=int, nargs=2, default=[16, 64], metavar=("MIN", "MAX"))
    p.add_argument("--long-prompt", type=int, nargs=2, default=[6144, 7936], metavar=("MIN", "MAX"))
    p.add_argument("--long-output", type=int, nargs=2, default=[32, 128], metavar=("MIN", "MAX"))
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--max-in-flight", type=int, default=512, help="Load-generator safety cap.")
    p.add_argument("--out", default="pools.json", help="File name under bench-results/.")
    return p


def arms(replicas: int, short_replicas: int) -> list[Arm]:
    if not 0 < short_replicas < replicas:
        raise ValueError("--short-replicas must leave at least one replica in each pool")
    policy = {
        "pools": {
            "short": {"max_prompt_tokens": SHORT_MAX_PROMPT},
            "long": {"max_prompt_tokens": LONG_MAX_PROMPT},
        }
    }
    pools = ["short"] * short_replicas + ["long"] * (replicas - short_replicas)
    return [Arm("fifo"), Arm("pools", policy=policy, replica_pools=pools)]


def by_class(arm: str, results: Sequence[Result]) -> list[Summary]:
    out = []
    for cls in ("short", "long"):
        mine = [r for r in results if r.meta.get("class") == cls]
        out.append(summarize(f"{arm}/{cls}", mine))
    return out


def class_table(summaries: Sequence[Summary]) -> str:
    return summary_table(summaries)


def ratio_rows(fifo: dict[str, Summary], pools: dict[str, Summary]) -> str:
    rows = []
    for cls in ("short", "long"):
        f, p = fifo[cls], pools[cls]
        rows.append(
            [
                cls,
                f"{ratio(p.ttft_s.mean, f.ttft_s.mean):.3f}",
                f"{ratio(p.ttft_s.p50, f.ttft_s.p50):.3f}",
                f"{ratio(p.ttft_s.p90, f.ttft_s.p90):.3f}",
                f"{ratio(p.ttft_s.p99, f.ttft_s.p99):.3f}",
                f"{ratio(p.throughput_tok_s, f.throughput_tok_s):.3f}",
            ]
        )
    return format_table(["pools / fifo", "TTFT mean x", "p50 x", "p90 x", "p99 x", "tok/s x"], rows)


async def main_async(args: argparse.Namespace) -> int:
    env = environment()
    block_size = block_size_from_env()
    natural = wl.mixed_lengths(
        requests=args.requests,
        long_fraction=args.long_fraction,
        short=wl.LengthClass("short", tuple(args.short_prompt), tuple(args.short_output)),
        long=wl.LengthClass("long", tuple(args.long_prompt), tuple(args.long_output)),
        rate=1.0,  # rescaled by the load plan
        seed=args.seed,
    )
    if max(r.prompt_tokens + r.max_tokens for r in natural) > 8192:
        raise SystemExit("prompt + output must fit the 8192-token context (max_num_tokens)")
    shape = EngineShape(block_size=block_size)
    plan = plan_load(
        natural, replicas=args.replicas, shape=shape, load=args.load, duration_s=args.duration
    )
    d = wl.describe(plan.requests)
    longs = sum(1 for r in plan.requests if r.meta["class"] == "long")
    header = (
        f"mixed: {d['requests']} requests ({longs} long) over {d['span_s']:.0f}s "
        f"({plan.offered_wall_req_s:.2f} req/s, {plan.offered_wall_tok_s:.0f} output tok/s offered); "
        f"short prompts {args.short_prompt[0]}-{args.short_prompt[1]} tokens, "
        f"long {args.long_prompt[0]}-{args.long_prompt[1]}\n"
        f"  engines: TIME_SCALE {plan.emulator_time_scale:.3f}, NUM_KV_BLOCKS {shape.num_kv_blocks}; "
        f"shared-pool round-robin capacity (cost model) {plan.capacity_model_req_s:.2f} req/s "
        f"modelled = {plan.capacity_wall_req_s:.2f} req/s wall -> load {plan.load:.2f}; "
        f"pools: {args.short_replicas} short + {args.replicas - args.short_replicas} long replicas"
    )
    print(header, flush=True)
    spec = MeshSpec(replicas=args.replicas, time_scale=plan.emulator_time_scale, shape=shape)
    wr = await run_arms(
        "pools",
        "mixed",
        arms(args.replicas, args.short_replicas),
        spec,
        plan.requests,
        max_in_flight=args.max_in_flight,
    )
    per_arm = {run.arm.name: by_class(run.arm.name, run.results) for run in wr.runs}
    fifo = {s.arm.split("/")[1]: s for s in per_arm["fifo"]}
    pools = {s.arm.split("/")[1]: s for s in per_arm["pools"]}
    cs = [
        Check(
            "short p50 TTFT pools / fifo",
            ratio(pools["short"].ttft_s.p50, fifo["short"].ttft_s.p50),
            "<=",
            0.05,
        ),
        Check(
            "long throughput pools / fifo",
            ratio(pools["long"].throughput_tok_s, fifo["long"].throughput_tok_s),
            ">=",
            0.95,
        ),
    ]
    rows = [*per_arm["fifo"], *per_arm["pools"], *wr.summaries]
    text = "\n\n".join(
        [f"== {header}", class_table(rows), ratio_rows(fifo, pools), checks_table(cs)]
    )
    print("\n" + text)
    out: dict[str, Any] = {
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
                "checks": [
                    {
                        "name": c.name,
                        "value": c.value,
                        "op": c.op,
                        "bound": c.bound,
                        "met": c.passed,
                    }
                    for c in cs
                ],
            },
        ),
    }
    out["code_unchanged_during_run"] = check_code_unchanged(out["env"])
    path = write_json(args.out, out)
    print(f"\nwrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import uvloop

    return uvloop.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
