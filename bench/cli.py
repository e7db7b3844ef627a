"""`python -m bench`: the load generator.

    python -m bench run --gateway HOST:PORT --workload mooncake|shared-prefix|azure|mixed [...]
        Replay a workload open-loop against an already running mesh; prints the summary and
        writes JSON under bench-results/.
    python -m bench routing [...]   the `make bench-routing` comparison (starts its own meshes)
    python -m bench pools [...]     the `make bench-pools` comparison (starts its own meshes)

Time: `--time-scale F` multiplies every arrival time (0.1 = ten times faster); `--target-rate R`
instead scales the trace to a mean of R requests/s. `--day-period/--day-trough/--day-peak` then
apply a day-shaped load multiplier (raised cosine, trough at t = 0, peak at period / 2) by
time-warping arrivals: the request mix is kept, the rate follows the curve.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from bench import workloads as wl
from bench.client import GatewayClient
from bench.experiment import compact_results, environment
from bench.replay import Progress, replay
from bench.report import (
    block_size_from_env,
    oracle_hit_rate,
    summarize,
    summary_dict,
    summary_table,
    write_json,
)
from llmmesh.localmesh import MODEL_NAME

WORKLOADS = ["shared-prefix", "mooncake", "azure", "mixed"]


def add_run_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("run", help="Replay a workload against a running gateway.")
    p.add_argument("--gateway", default="127.0.0.1:50051", help="Gateway gRPC address.")
    p.add_argument("--model", default=MODEL_NAME)
    p.add_argument("--workload", choices=WORKLOADS, required=True)
    p.add_argument("--trace", type=Path, help="Trace file (mooncake, azure); default in ../shared.")
    p.add_argument("--seed", type=int, default=0)
    t = p.add_argument_group("time")
    t.add_argument("--time-scale", type=float, default=1.0, help="Arrival-time multiplier.")
    t.add_argument("--target-rate", type=float, help="Scale arrivals to this mean req/s instead.")
    t.add_argument("--day-period", type=float, help="Seconds of one day-shaped load cycle.")
    t.add_argument("--day-trough", type=float, default=0.25, help="Load multiplier at night.")
    t.add_argument("--day-peak", type=float, default=1.0, help="Load multiplier at mid-day.")
    tr = p.add_argument_group("traces (mooncake, azure)")
    tr.add_argument("--max-input-tokens", type=int, help="Truncate longer prompts.")
    tr.add_argument(
        "--drop-long", action="store_true", help="Drop longer prompts instead (mooncake)."
    )
    tr.add_argument("--max-output-tokens", type=int, help="Cap completions.")
    tr.add_argument(
        "--sample-fraction",
        type=float,
        default=1.0,
        help="Keep this share of the trace's 10 s time windows (mooncake).",
    )
    tr.add_argument(
        "--start-s", type=float, default=0.0, help="Trace window start (trace seconds)."
    )
    tr.add_argument("--duration-s", type=float, help="Trace window length (trace seconds).")
    tr.add_argument("--limit", type=int, help="At most this many requests.")
    sp = p.add_argument_group("shared-prefix, mixed")
    sp.add_argument("--rate", type=float, default=2.0, help="Poisson arrivals per second.")
    sp.add_argument("--groups", type=int, default=16)
    sp.add_argument("--prompts-per-group", type=int, default=8)
    sp.add_argument("--system-tokens", type=int, default=2048)
    sp.add_argument("--question-tokens", type=int, default=128)
    sp.add_argument("--output-tokens", type=int, default=64)
    sp.add_argument("--requests", type=int, default=200, help="mixed: number of requests.")
    sp.add_argument("--long-fraction", type=float, default=0.3, help="mixed: share of long.")
    r = p.add_argument_group("replay and output")
    r.add_argument("--max-in-flight", type=int, default=512, help="Safety cap on open streams.")
    r.add_argument("--timeout-s", type=float, default=600.0, help="Deadline of one request.")
    r.add_argument("--no-oracle", action="store_true", help="Skip the infinite-cache oracle.")
    r.add_argument("--out", help="File name under bench-results/ (default run-<workload>.json).")


def build_workload(args: argparse.Namespace) -> list[wl.Request]:
    if args.workload == "mooncake":
        reqs = wl.mooncake(
            args.trace or wl.MOONCAKE_TRACE,
            wl.MooncakeOptions(
                max_input_tokens=args.max_input_tokens,
                drop_long=args.drop_long,
                max_output_tokens=args.max_output_tokens,
                sample_fraction=args.sample_fraction,
                start_s=args.start_s,
                duration_s=args.duration_s,
                limit=args.limit,
            ),
        )
    elif args.workload == "azure":
        reqs = wl.azure(
            args.trace or wl.AZURE_TRACE,
            wl.AzureOptions(
                max_input_tokens=args.max_input_tokens,
                max_output_tokens=args.max_output_tokens,
                start_s=args.start_s,
                duration_s=args.duration_s,
                limit=args.limit,
            ),
        )
    elif args.workload == "shared-prefix":
        reqs = wl.shared_prefix(
            groups=args.groups,
            prompts_per_group=args.prompts_per_group,
            system_tokens=args.system_tokens,
            question_tokens=args.question_tokens,
            output_tokens=args.output_tokens,
            rate=args.rate,
            seed=args.seed,
        )
    else:
        reqs = wl.mixed_lengths(
            requests=args.requests,
            long_fraction=args.long_fraction,
            short=wl.LengthClass("short", (32, 256), (16, 64)),
            long=wl.LengthClass("long", (6144, 7936), (32, 128)),
            rate=args.rate,
            seed=args.seed,
        )
    return apply_time(reqs, args)


def apply_time(reqs: list[wl.Request], args: argparse.Namespace) -> list[wl.Request]:
    if not reqs:
        raise SystemExit("the workload selected no requests")
    if args.target_rate is not None:
        d = wl.describe(reqs)
        if not d["rate_per_s"]:
            raise SystemExit("--target-rate needs arrivals that span some time")
        reqs = wl.scale_time(reqs, d["rate_per_s"] / args.target_rate)
    elif args.time_scale != 1.0:
        reqs = wl.scale_time(reqs, args.time_scale)
    if args.day_period is not None:
        reqs = wl.warp_load(reqs, wl.day_shape(args.day_period, args.day_trough, args.day_peak))
    return reqs


async def run_async(args: argparse.Namespace) -> int:
    reqs = build_workload(args)
    d = wl.describe(reqs)
    print(
        f"{args.workload}: {d['requests']} requests over {d.get('span_s', 0):.1f}s, "
        f"prompt mean {d['mean_prompt_tokens']:.0f} tokens, output mean {d['mean_output_tokens']:.0f}",
        flush=True,
    )
    oracle = float("nan") if args.no_oracle else oracle_hit_rate(reqs, block_size_from_env())
    client = GatewayClient(args.gateway, model=args.model, timeout_s=args.timeout_s)
    try:
        await client.wait_ready()
        results = await replay(
            reqs,
            client,
            max_in_flight=args.max_in_flight,
            progress=Progress(args.workload, len(reqs)),
            request_id_prefix=f"bench-{int(time.time())}",
        )
    finally:
        await client.close()
    summary = summarize(args.workload, results, oracle=oracle)
    print()
    print(summary_table([summary]))
    if summary.errors:
        print(f"errors: {summary.errors}")
    payload: dict[str, Any] = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "env": environment(),
        "workload": d,
        "summary": summary_dict(summary),
        "requests": compact_results(results),
    }
    path = write_json(args.out or f"run-{args.workload}.json", payload)
    print(f"\nwrote {path}")
    return 0 if summary.ok else 1


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # The comparison benchmarks own their argument parsers.
    if argv and argv[0] == "routing":
        from bench import routing

        return routing.main(argv[1:])
    if argv and argv[0] == "pools":
        from bench import pools

        return pools.main(argv[1:])
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    add_run_parser(sub)
    sub.add_parser("routing", help="make bench-routing (see python -m bench routing --help)")
    sub.add_parser("pools", help="make bench-pools (see python -m bench pools --help)")
    args = parser.parse_args(argv)
    import uvloop

    return uvloop.run(run_async(args))
