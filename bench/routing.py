"""`make bench-routing`: scheduling profiles compared on the same workloads in one run.

Workloads (token ids, so prefix sharing is exact):
  (a) shared-prefix: G groups of a long system prompt + a short question of its own (llm-d's
      prefix-cache benchmark shape), shuffled, Poisson arrivals;
  (b) mooncake: `../shared/traces/mooncake_synthetic_trace.jsonl.gz`, sampled by prefix family,
      prompts truncated to the engine's context, completions capped, replayed compressed in time.
Arms: orchestrator profiles round-robin, least-loaded, prefix-only and default
(`LLMMESH_ORCHESTRATOR_PROFILE`), each on a fresh local mesh (cold engines and caches).

Load: the emulator TIME_SCALE is chosen so the arrival rate is `--load` (0.8) times the capacity of
a round-robin cluster on the same requests, computed from the engines' cost model
(`bench.calibrate`). Per-replica KV capacity is `--cache-fraction` of the workload's shared
working set (blocks that occur in two or more prompts): one replica cannot hold every shared
prefix, the cluster can, as in llm-d's benchmark.

Prints mean/p50/p90/p99 TTFT, output tokens/s, engine-observed KV hit rate against the
infinite-cache oracle, ratios against round-robin measured in this run, and the spec's targets;
writes `bench-results/routing.json`.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

from bench import workloads as wl
from bench.arms import Arm, MeshSpec
from bench.calibrate import EngineShape, LoadPlan, plan_load, shared_working_set_blocks
from bench.experiment import WorkloadRun, check_code_unchanged, environment, run_arms, workload_json
from bench.report import (
    Check,
    Summary,
    block_size_from_env,
    checks_table,
    format_table,
    oracle_hit_rate,
    ratio,
    summary_table,
    write_json,
)

PROFILES = ["round-robin", "least-loaded", "prefix-only", "default"]
WORKLOADS = ["shared-prefix", "mooncake"]
BASELINE = "round-robin"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench routing",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--replicas", type=int, default=4)
    p.add_argument("--load", type=float, default=0.8, help="Share of round-robin capacity.")
    p.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=WORKLOADS)
    p.add_argument("--arms", nargs="+", default=PROFILES, help="Orchestrator profiles.")
    p.add_argument(
        "--cache-fraction",
        type=float,
        default=0.4,
        help="Per-replica KV blocks as a share of the shared working set.",
    )
    p.add_argument("--max-in-flight", type=int, default=512, help="Load-generator safety cap.")
    p.add_argument("--out", default="routing.json", help="File name under bench-results/.")
    g = p.add_argument_group("shared-prefix")
    g.add_argument("--sp-groups", type=int, default=48)
    g.add_argument("--sp-prompts-per-group", type=int, default=6)
    g.add_argument("--sp-system-tokens", type=int, default=2048)
    g.add_argument("--sp-question-tokens", type=int, default=128)
    g.add_argument("--sp-output-tokens", type=int, default=64)
    g.add_argument("--sp-duration", type=float, default=40.0, help="Seconds of arrivals.")
    g.add_argument("--sp-seed", type=int, default=1)
    g = p.add_argument_group("mooncake")
    g.add_argument("--mc-trace", type=Path, default=wl.MOONCAKE_TRACE)
    g.add_argument("--mc-sample-fraction", type=float, default=0.08)
    g.add_argument("--mc-max-input-tokens", type=int, default=7936)
    g.add_argument("--mc-max-output-tokens", type=int, default=128)
    g.add_argument("--mc-duration", type=float, default=50.0, help="Seconds of arrivals.")
    return p


def natural_requests(workload: str, args: argparse.Namespace) -> list[wl.Request]:
    if workload == "shared-prefix":
        return wl.shared_prefix(
            groups=args.sp_groups,
            prompts_per_group=args.sp_prompts_per_group,
            system_tokens=args.sp_system_tokens,
            question_tokens=args.sp_question_tokens,
            output_tokens=args.sp_output_tokens,
            rate=1.0,  # rescaled by the load plan
            seed=args.sp_seed,
        )
    return wl.mooncake(
        args.mc_trace,
        wl.MooncakeOptions(
            max_input_tokens=args.mc_max_input_tokens,
            max_output_tokens=args.mc_max_output_tokens,
            sample_fraction=args.mc_sample_fraction,
        ),
    )


def engine_shape(requests: list[wl.Request], cache_fraction: float, block_size: int) -> EngineShape:
    shared = shared_working_set_blocks(requests, block_size)
    largest = max(math.ceil((r.prompt_tokens + r.max_tokens) / block_size) for r in requests)
    return EngineShape(
        num_kv_blocks=max(int(shared * cache_fraction), 4 * largest), block_size=block_size
    )


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


def checks(summaries: list[Summary], arm: str = "default") -> list[Check]:
    by = {s.arm: s for s in summaries}
    if BASELINE not in by or arm not in by:
        return []
    s, b = by[arm], by[BASELINE]
    return [
        Check(f"{arm}: mean TTFT / {BASELINE}", ratio(s.ttft_s.mean, b.ttft_s.mean), "<=", 0.5),
        Check(
            f"{arm}: throughput / {BASELINE}",
            ratio(s.throughput_tok_s, b.throughput_tok_s),
            ">=",
            1.45,
        ),
        Check(f"{arm}: hit rate / oracle", s.hit_vs_oracle, ">=", 0.9),
    ]


def describe_plan(
    workload: str, requests: list[wl.Request], plan: LoadPlan, shape: EngineShape
) -> str:
    d = wl.describe(plan.requests)
    trunc = sum(1 for r in requests if "trace_input_length" in r.meta)
    return (
        f"{workload}: {d['requests']} requests over {d['span_s']:.0f}s "
        f"({plan.offered_wall_req_s:.2f} req/s, {plan.offered_wall_tok_s:.0f} output tok/s offered), "
        f"prompt mean {d['mean_prompt_tokens']:.0f} / max {d['max_prompt_tokens']} tokens"
        + (f" ({trunc} truncated)" if trunc else "")
        + f", output mean {d['mean_output_tokens']:.0f}\n"
        f"  engines: TIME_SCALE {plan.emulator_time_scale:.3f}, NUM_KV_BLOCKS {shape.num_kv_blocks}; "
        f"round-robin capacity (cost model) {plan.capacity_model_req_s:.2f} req/s modelled = "
        f"{plan.capacity_wall_req_s:.2f} req/s wall -> load {plan.load:.2f}; "
        f"predicted round-robin TTFT mean {plan.predicted_rr_ttft_mean_s:.3f}s "
        f"p50 {plan.predicted_rr_ttft_p50_s:.3f}s (engines only)"
    )


async def main_async(args: argparse.Namespace) -> int:
    block_size = block_size_from_env()
    arms = [Arm(name, profile=name) for name in args.arms]
    out: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}, "env": environment()}
    printed: list[str] = []
    for workload in args.workloads:
        natural = natural_requests(workload, args)
        shape = engine_shape(natural, args.cache_fraction, block_size)
        duration = args.sp_duration if workload == "shared-prefix" else args.mc_duration
        plan = plan_load(
            natural, replicas=args.replicas, shape=shape, load=args.load, duration_s=duration
        )
        oracle = oracle_hit_rate(plan.requests, block_size)
        header = describe_plan(workload, natural, plan, shape) + f"\n  oracle hit rate {oracle:.3f}"
        print(header, flush=True)
        spec = MeshSpec(replicas=args.replicas, time_scale=plan.emulator_time_scale, shape=shape)
        wr: WorkloadRun = await run_arms(
            "routing",
            workload,
            arms,
            spec,
            plan.requests,
            oracle=oracle,
            max_in_flight=args.max_in_flight,
        )
        block = [f"== {header}", summary_table(wr.summaries)]
        if any(s.arm == BASELINE for s in wr.summaries):
            block.append(ratios_table(wr.summaries))
        cs = checks(wr.summaries)
        if cs:
            block.append(checks_table(cs))
        text = "\n\n".join(block)
        printed.append(text)
        print("\n" + text + "\n", flush=True)
        out[workload] = workload_json(
            wr,
            spec,
            {
                "workload": wl.describe(plan.requests),
                "calibration": plan.as_dict(),
                "oracle_hit_rate": oracle,
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
        )
    out["code_unchanged_during_run"] = check_code_unchanged(out["env"])
    if len(printed) > 1:
        print("\n\n".join(printed))
    path = write_json(args.out, out)
    print(f"\nwrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import uvloop

    return uvloop.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
