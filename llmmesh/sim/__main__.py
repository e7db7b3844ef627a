"""python -m llmmesh.sim: run a workload through the simulated cluster, one run per scheduling
profile; prints tables, writes JSON (and a PNG) under bench-results/."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from bench import workloads as wl
from bench.report import RESULTS_DIR, write_json
from llmmesh.accelerators import DEFAULT_PROFILE, PROFILES
from llmmesh.sim.cluster import (
    Autoscale,
    ClusterSpec,
    Latencies,
    PoolSpec,
    SimResult,
    Slo,
    simulate,
)
from llmmesh.sim.report import result_dict, tables, write_png
from services.autoscaler.policy import CostConfig, PolicyConfig

WORKLOADS = ["mooncake", "azure", "day", *sorted(wl.MATRIX)]


def load_workload(name: str, sample: float, seed: int, limit: int | None) -> list[wl.Request]:
    """Full traces at their real rates (`mooncake`, `azure`), the Azure hour warped to a day
    shape (`day`: trough 0.25x, peak 2x over the trace's span), or a routing-matrix workload."""
    if name == "mooncake":
        reqs = wl.mooncake(options=wl.MooncakeOptions(limit=limit))
    elif name == "azure":
        reqs = wl.azure(options=wl.AzureOptions(limit=limit))
    elif name == "day":
        base = wl.azure(options=wl.AzureOptions(limit=limit))
        span = max(r.arrival_s for r in base) or 1.0
        reqs = wl.warp_load(base, wl.day_shape(span, 0.25, 2.0))
    else:
        reqs = wl.MATRIX[name].build(sample, seed)
        if limit is not None:
            reqs = sorted(reqs, key=lambda r: r.arrival_s)[:limit]
    return reqs


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m llmmesh.sim", description=__doc__)
    p.add_argument("--workload", choices=WORKLOADS, default="shared-prefix-few")
    p.add_argument("--sample", type=float, default=1.0, help="Share of a matrix workload.")
    p.add_argument("--limit", type=int, default=None, help="At most this many requests.")
    p.add_argument("--replicas", type=int, default=4)
    p.add_argument("--accelerator", choices=sorted(PROFILES), default=DEFAULT_PROFILE)
    p.add_argument("--max-batch-size", type=int, default=64)
    p.add_argument(
        "--max-num-tokens",
        type=int,
        default=None,
        help="Engine token budget per iteration (default: 8192, raised to the longest prompt; "
        "the emulator has no chunked prefill).",
    )
    p.add_argument(
        "--kv-blocks", type=int, default=None, help="Per replica (default: from the profile)."
    )
    p.add_argument("--kv-mode", choices=["exact", "approximate", "off"], default="exact")
    p.add_argument("--profiles", nargs="+", default=["round-robin", "default"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--price", type=float, default=None, help="$ per replica-hour.")
    p.add_argument("--metrics-interval-s", type=float, default=1.0)
    p.add_argument("--autoscale", action="store_true", help="Autoscaler policy on the pool.")
    p.add_argument("--min-replicas", type=int, default=1)
    p.add_argument("--max-replicas", type=int, default=64)
    p.add_argument("--startup-delay-s", type=float, default=60.0)
    p.add_argument("--slo-ttft-s", type=float, default=2.0)
    p.add_argument("--slo-itl-s", type=float, default=0.05)
    p.add_argument("--admit-latency-s", type=float, default=0.0)
    p.add_argument("--out", default=None, help="JSON file name under bench-results/.")
    p.add_argument("--no-png", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    reqs = load_workload(args.workload, args.sample, args.seed, args.limit)
    longest = max(r.prompt_tokens for r in reqs)
    max_num_tokens = args.max_num_tokens or max(8192, longest)
    auto = None
    if args.autoscale:
        auto = Autoscale(
            PolicyConfig(
                min_replicas=args.min_replicas,
                max_replicas=args.max_replicas,
                slo_ttft_s=args.slo_ttft_s,
                slo_itl_s=args.slo_itl_s,
                cost=CostConfig(profile=args.accelerator, max_batch_size=args.max_batch_size),
            ),
            startup_delay_s=args.startup_delay_s,
        )
    cluster = ClusterSpec(
        pools=(
            PoolSpec(
                args.replicas,
                profile=args.accelerator,
                max_batch_size=args.max_batch_size,
                max_num_tokens=max_num_tokens,
                num_kv_blocks=args.kv_blocks,
                price_per_hour=args.price,
                autoscale=auto,
            ),
        ),
        kv_mode=args.kv_mode,
        metrics_interval_s=args.metrics_interval_s,
        latencies=Latencies(admit_s=args.admit_latency_s),
    )
    desc = wl.describe(sorted(reqs, key=lambda r: r.arrival_s))
    print(
        f"workload {args.workload}: {desc['requests']} requests over {desc.get('span_s', 0):.0f} s "
        f"({desc.get('rate_per_s', 0):.2f}/s), mean prompt {desc.get('mean_prompt_tokens', 0):.0f}, "
        f"mean output {desc.get('mean_output_tokens', 0):.0f}; {args.replicas} x {args.accelerator}"
        + (" (autoscaled)" if auto else ""),
        file=sys.stderr,
    )
    runs: list[tuple[str, SimResult]] = []
    for i, profile in enumerate(args.profiles):
        res = simulate(
            reqs,
            cluster,
            profile,
            args.seed,
            oracle=i == 0,
            slo=Slo(args.slo_ttft_s, args.slo_itl_s),
        )
        if i:
            res.summary.oracle_hit_rate = runs[0][1].summary.oracle_hit_rate
        runs.append((profile, res))
        print(
            f"[{profile}] {res.summary.ok}/{res.summary.requests} ok in {res.cpu_s:.1f} CPU s "
            f"({res.wall_s:.1f} s wall), {res.events} events, {res.events_per_s:.0f} events/s",
            file=sys.stderr,
        )
    print(tables(runs))
    name = args.out or f"sim-{args.workload}-{args.replicas}.json"
    path = write_json(
        name,
        {
            "workload": args.workload,
            "describe": desc,
            "cluster": repr(cluster),
            "runs": {n: result_dict(r) for n, r in runs},
        },
    )
    print(f"JSON: {path}")
    if not args.no_png:
        png = write_png(Path(RESULTS_DIR) / Path(name).with_suffix(".png").name, runs, name)
        print(f"PNG: {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
