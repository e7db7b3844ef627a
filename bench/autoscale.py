"""`make bench-autoscale`: static provisioning for the peak vs the autoscaler with the local
actuator, on the same compressed day of the Azure conversation trace, in one run.

Workload: `../shared/traces/azure_llm_2023_conv.csv` (prompts capped at `--max-input-tokens`,
completions at `--max-output-tokens`), every `--keep-every`-th request, warped by a day-shaped
load multiplier (raised cosine from `--trough` at night to `--peak` at noon, one period) and
compressed so the day lasts `--duration` seconds.
Engines: emulated replicas (`max_batch_size` `--max-batch`), with the emulator TIME_SCALE chosen
so that `--static-replicas` replicas run at `--peak-load` of their round-robin saturation capacity
(cost model, `bench.calibrate`) in the busiest `--bin` seconds of the day.
Arms, each on a fresh local mesh:
  static:     `--static-replicas` replicas for the whole day (provisioned for the peak);
  autoscaled: one pool run by the autoscaler's local actuator (Triton processes started,
              registered when ready, drained before SIGTERM), between `--min-replicas` and
              `--static-replicas + 1`, with the policy below on 1 s evaluations.
Policy windows are compressed with the day (the replica start time, a few seconds, is not):
scale-down stabilization `--down-window` s, cooldown, panic and forecast horizon as printed.

Prints replica-seconds, TTFT-SLO attainment (`--ttft-slo`, from the scheduled arrival; failures
are misses), scale events and aborted requests per arm, the autoscaled/static ratio and the
issue's targets (replica-hours <= 0.6x static at >= 99% attainment, 0 aborted); writes
`bench-results/autoscale.json` and `bench-results/autoscale.png` (load, desired and ready
replicas over time). Definitions: `bench/autoscale_report.py`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import grpc

from bench import workloads as wl
from bench.arms import TRITON_STOP_GRACE_S, fresh_dir, wait_replicas_ready
from bench.autoscale_report import (
    TimelinePoint,
    aborted,
    arrival_rate,
    compressed_day,
    plot,
    replica_seconds,
    scale_events,
    slo_attainment,
    thin,
)
from bench.calibrate import EngineShape, rr_capacity
from bench.client import GatewayClient
from bench.experiment import WORK, environment
from bench.replay import Progress, Result, replay
from bench.report import (
    RESULTS_DIR,
    Check,
    checks_table,
    eprint,
    format_table,
    ratio,
    summarize,
    write_json,
)
from llmmesh.common.settings import KvBlockSettings, settings_of, to_env
from llmmesh.common.topology import DEFAULT_MODEL_VERSION, DEFAULT_POOL
from llmmesh.generated.autoscaler.v1 import autoscaler_pb2 as as_pb
from llmmesh.generated.autoscaler.v1 import autoscaler_pb2_grpc as as_grpc
from llmmesh.generated.orchestrator.v1 import orchestrator_pb2 as orch_pb
from llmmesh.generated.orchestrator.v1 import orchestrator_pb2_grpc as orch_grpc
from llmmesh.localmesh import AutoscaledPool, LocalMesh, MeshOptions
from services.autoscaler.policy import CostConfig, PolicyConfig, replica_capacity
from services.autoscaler.settings import AutoscalerSettings

POOL, VERSION = DEFAULT_POOL, DEFAULT_MODEL_VERSION


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.autoscale",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--duration", type=float, default=360.0, help="Seconds of the compressed day.")
    p.add_argument("--trough", type=float, default=0.1, help="Night load multiplier.")
    p.add_argument("--peak", type=float, default=1.0, help="Noon load multiplier.")
    p.add_argument("--keep-every", type=int, default=20, help="Thin the trace to every k-th.")
    p.add_argument("--max-input-tokens", type=int, default=2048)
    p.add_argument("--max-output-tokens", type=int, default=32)
    p.add_argument("--max-batch", type=int, default=8, help="Emulator max_batch_size.")
    p.add_argument("--static-replicas", type=int, default=4)
    p.add_argument("--min-replicas", type=int, default=1)
    p.add_argument("--peak-load", type=float, default=0.75)
    p.add_argument("--bin", type=float, default=10.0, help="Seconds per load bin (peak, plot).")
    p.add_argument("--ttft-slo", type=float, default=2.0, help="TTFT SLO in seconds.")
    p.add_argument(
        "--utilization",
        type=float,
        default=0.9,
        help="Share of the SLO-sustainable rate the autoscaler plans per replica.",
    )
    p.add_argument("--down-window", type=float, default=15.0)
    p.add_argument("--cooldown", type=float, default=5.0)
    p.add_argument(
        "--rate-window", type=float, default=15.0, help="Autoscaler rate/percentile window (s)."
    )
    p.add_argument("--arms", nargs="+", choices=["static", "autoscaled"], default=None)
    p.add_argument("--out", default="autoscale", help="Base name under bench-results/.")
    return p


@dataclass
class Plan:
    requests: list[wl.Request]
    time_scale: float
    peak_rate: float
    mean_prompt: float
    mean_completion: float
    capacity_model_req_s: float


def plan(args: argparse.Namespace, shape: EngineShape) -> Plan:
    trace = wl.azure(
        options=wl.AzureOptions(
            max_input_tokens=args.max_input_tokens, max_output_tokens=args.max_output_tokens
        )
    )
    day = compressed_day(
        thin(trace, args.keep_every), duration_s=args.duration, trough=args.trough, peak=args.peak
    )
    _, rates = arrival_rate(day, args.bin, args.duration)
    peak_rate = max(rates)
    cap = rr_capacity(day, 1, shape).requests_per_s  # one replica, modelled seconds
    # static_replicas * cap / TIME_SCALE = peak_rate / peak_load
    time_scale = args.peak_load * args.static_replicas * cap / peak_rate
    return Plan(
        day,
        time_scale,
        peak_rate,
        sum(r.prompt_tokens for r in day) / len(day),
        sum(r.max_tokens for r in day) / len(day),
        cap,
    )


def policy(args: argparse.Namespace, pl: Plan, shape: EngineShape) -> PolicyConfig:
    cost = CostConfig(
        profile=shape.cost_profile,
        time_scale=pl.time_scale,
        max_batch_size=shape.max_batch_size,
        prompt_tokens=pl.mean_prompt,
        completion_tokens=pl.mean_completion,
        utilization=args.utilization,
    )
    return PolicyConfig(
        min_replicas=args.min_replicas,
        max_replicas=args.static_replicas + 1,
        target_signal="requests_per_replica",
        target_value=shape.max_batch_size * args.utilization,
        slo_ttft_s=args.ttft_slo,
        slo_itl_s=max(args.ttft_slo / 4, 0.05),
        scale_up_window_s=0.0,
        scale_down_window_s=args.down_window,
        scale_up_period_s=5.0,
        scale_up_max_pods=2,
        scale_down_period_s=args.cooldown,
        scale_down_max_percent=50.0,
        panic_window_s=6.0,
        panic_hold_s=20.0,
        cooldown_s=args.cooldown,
        scale_to_zero_idle_s=60.0,
        forecast=True,
        forecast_alpha=0.3,
        forecast_beta=0.1,
        forecast_horizon_s=5.0,  # about a replica's start time here
        cost=cost,
    )


@dataclass
class ArmOutcome:
    name: str
    results: list[Result]
    timeline: list[TimelinePoint]
    wall_s: float
    workdir: str


async def _sample_static(
    address: str, replicas: int, t0: float, out: list[TimelinePoint], stop: asyncio.Event
) -> None:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = orch_grpc.OrchestratorServiceStub(channel)
        while not stop.is_set():
            with contextlib.suppress(grpc.aio.AioRpcError):
                resp = await stub.ListReplicas(orch_pb.ListReplicasRequest(), timeout=2)
                healthy = sum(1 for r in resp.replicas if r.healthy)
                out.append(TimelinePoint(time.monotonic() - t0, replicas, healthy))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)


async def _sample_autoscaled(
    address: str, t0: float, out: list[TimelinePoint], stop: asyncio.Event
) -> None:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = as_grpc.AutoscalerServiceStub(channel)
        while not stop.is_set():
            with contextlib.suppress(grpc.aio.AioRpcError):
                resp = await stub.GetRecommendations(as_pb.GetRecommendationsRequest(), timeout=2)
                for rec in resp.pools:
                    if (rec.pool, rec.model_version) == (POOL, VERSION):
                        out.append(
                            TimelinePoint(
                                time.monotonic() - t0,
                                rec.desired_replicas,
                                rec.ready_replicas,
                                rec.starting_replicas,
                                rec.draining_replicas,
                            )
                        )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)


async def _autoscaler_sees_ready(address: str, ready: int, timeout_s: float = 60.0) -> None:
    """Wait until the autoscaler's latest decision counts `ready` replicas, so the timeline
    starts from what exists (its first decisions may predate the first replica)."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = as_grpc.AutoscalerServiceStub(channel)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            resp = await stub.GetRecommendations(as_pb.GetRecommendationsRequest(), timeout=5)
            if any(
                (r.pool, r.model_version) == (POOL, VERSION) and r.ready_replicas >= ready
                for r in resp.pools
            ):
                return
            await asyncio.sleep(0.2)  # polling a remote status; nothing to await instead
        raise TimeoutError(f"the autoscaler did not see {ready} ready replicas in {timeout_s}s")


async def run_arm(
    name: str, options: MeshOptions, requests: Sequence[wl.Request], ready: int
) -> ArmOutcome:
    mesh = LocalMesh(options)
    t_start = time.monotonic()
    timeline: list[TimelinePoint] = []
    try:
        await mesh.start()
        orch = mesh.services["orchestrator"].address
        await wait_replicas_ready(orch, ready, timeout_s=120.0)
        if options.autoscaled_pools:
            await _autoscaler_sees_ready(mesh.services["autoscaler"].address, ready)
        eprint(f"[autoscale/{name}] mesh up in {time.monotonic() - t_start:.1f}s")
        client = GatewayClient(mesh.services["gateway"].address, timeout_s=600.0)
        stop = asyncio.Event()
        t0 = time.monotonic()
        sampler = asyncio.create_task(
            _sample_autoscaled(mesh.services["autoscaler"].address, t0, timeline, stop)
            if options.autoscaled_pools
            else _sample_static(orch, options.replicas, t0, timeline, stop)
        )
        try:
            await client.wait_ready()
            results = await replay(
                requests,
                client,
                max_in_flight=1024,
                progress=Progress(f"autoscale/{name}", len(requests)),
                request_id_prefix=f"autoscale-{name}",
            )
            wall = time.monotonic() - t0
        finally:
            stop.set()
            await sampler
            await client.close()
    finally:
        await asyncio.gather(
            *(t.stop(grace_s=TRITON_STOP_GRACE_S) for t in mesh.tritons if t.is_running),
            return_exceptions=True,
        )
        await mesh.stop()
    return ArmOutcome(name, results, timeline, wall, str(options.workdir))


def arm_row(o: ArmOutcome, end_s: float, slo: float) -> dict[str, float]:
    up, down = scale_events(o.timeline)
    s = summarize(o.name, o.results)
    rs = replica_seconds(o.timeline, 0.0, end_s)
    return {
        "end_s": end_s,
        "replica_seconds": rs,
        "mean_replicas": rs / end_s if end_s > 0 else math.nan,
        "slo_attainment": slo_attainment(o.results, slo),
        "ttft_p50_s": s.ttft_s.p50,
        "ttft_mean_s": s.ttft_s.mean,
        "ttft_p99_s": s.ttft_s.p99,
        "requests": len(o.results),
        "aborted": aborted(o.results),
        "scale_ups": up,
        "scale_downs": down,
        "peak_replicas": max((p.existing for p in o.timeline), default=0),
    }


async def main_async(args: argparse.Namespace) -> int:
    shape = EngineShape(max_batch_size=args.max_batch)
    pl = plan(args, shape)
    pol = policy(args, pl, shape)
    cap = replica_capacity(
        pol.cost, pol.slo_ttft_s, pol.slo_itl_s, pl.mean_prompt, pl.mean_completion
    )
    eprint(
        f"workload: {len(pl.requests)} requests over {args.duration:.0f}s, peak "
        f"{pl.peak_rate:.2f} req/s ({args.bin:.0f}s bin), mean prompt {pl.mean_prompt:.0f} / "
        f"completion {pl.mean_completion:.1f} tokens; emulator TIME_SCALE {pl.time_scale:.2f}; "
        f"saturation capacity {pl.capacity_model_req_s / pl.time_scale:.2f} req/s per replica; "
        f"policy capacity at the SLO {cap.requests_per_s:.2f} req/s (batch {cap.batch})"
    )
    arms = args.arms or ["static", "autoscaled"]
    common = {
        "time_scale": pl.time_scale,
        "emulator_env": shape.env(),
        "extra_env": {
            **to_env(settings_of(KvBlockSettings, block_size=shape.block_size)),
            **to_env(settings_of(AutoscalerSettings, rate_window_s=args.rate_window)),
        },
        "context_length": args.max_input_tokens + args.max_output_tokens + 64,
    }
    outcomes: dict[str, ArmOutcome] = {}
    for name in arms:
        workdir = fresh_dir(WORK / "autoscale" / name)
        if name == "static":
            opts = MeshOptions(replicas=args.static_replicas, workdir=workdir, **common)
            ready = args.static_replicas
        else:
            opts = MeshOptions(
                replicas=0,
                workdir=workdir,
                autoscaled_pools=[
                    AutoscaledPool(
                        pool=POOL,
                        model_version=VERSION,
                        min_replicas=args.min_replicas,
                        max_replicas=args.static_replicas + 1,
                        initial_replicas=max(args.min_replicas, 1),
                        policy=pol.model_dump(mode="json"),
                    )
                ],
                **common,
            )
            ready = max(args.min_replicas, 1)
        outcomes[name] = await run_arm(name, opts, pl.requests, ready)

    end_s = max(
        (r.scheduled_s + (r.e2e_s or 0.0) for o in outcomes.values() for r in o.results),
        default=args.duration,
    )
    rows = {name: arm_row(o, end_s, args.ttft_slo) for name, o in outcomes.items()}
    headers = [
        "arm",
        "replica-s",
        "mean repl",
        "peak repl",
        f"TTFT<={args.ttft_slo:g}s",
        "TTFT p50",
        "TTFT p99",
        "scale +/-",
        "aborted",
    ]
    table = format_table(
        headers,
        [
            [
                name,
                f"{r['replica_seconds']:.0f}",
                f"{r['mean_replicas']:.2f}",
                f"{r['peak_replicas']:.0f}",
                f"{100 * r['slo_attainment']:.2f}%",
                f"{r['ttft_p50_s']:.3f}",
                f"{r['ttft_p99_s']:.3f}",
                f"{r['scale_ups']:.0f}/{r['scale_downs']:.0f}",
                f"{r['aborted']:.0f}/{r['requests']:.0f}",
            ]
            for name, r in rows.items()
        ],
    )
    print(table)
    checks: list[Check] = []
    if "static" in rows and "autoscaled" in rows:
        rh = ratio(rows["autoscaled"]["replica_seconds"], rows["static"]["replica_seconds"])
        checks = [
            Check("replica-hours autoscaled / static", rh, "<=", 0.6),
            Check(
                "autoscaled TTFT-SLO attainment", rows["autoscaled"]["slo_attainment"], ">=", 0.99
            ),
            Check("autoscaled aborted requests", rows["autoscaled"]["aborted"], "<=", 0),
        ]
        print(checks_table(checks))
    png = plot(
        RESULTS_DIR / f"{args.out}.png",
        pl.requests,
        {name: o.timeline for name, o in outcomes.items()},
        end_s=end_s,
        title=(
            f"Azure conv trace, compressed day ({args.duration:.0f}s, trough {args.trough:g}, "
            f"peak {args.peak:g}): static {args.static_replicas} vs autoscaled"
        ),
    )
    path = write_json(
        f"{args.out}.json",
        {
            "benchmark": "autoscale",
            "args": vars(args),
            "environment": environment(),
            "plan": {
                "requests": len(pl.requests),
                "time_scale": pl.time_scale,
                "peak_rate": pl.peak_rate,
                "mean_prompt": pl.mean_prompt,
                "mean_completion": pl.mean_completion,
                "replica_capacity_saturation_req_s": pl.capacity_model_req_s / pl.time_scale,
                "replica_capacity_slo_req_s": cap.requests_per_s,
            },
            "policy": json.loads(pol.model_dump_json()),
            "arms": rows,
            "checks": [asdict(c) | {"passed": c.passed} for c in checks],
            "timelines": {n: [asdict(p) for p in o.timeline] for n, o in outcomes.items()},
            "workdirs": {n: o.workdir for n, o in outcomes.items()},
        },
    )
    eprint(f"wrote {path} and {png}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import uvloop

    return uvloop.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
