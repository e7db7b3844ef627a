"""`make bench-overload`: goodput and latency far beyond capacity, on the local emulator mesh.

One mesh (`--replicas` 2 emulated Triton replicas, `LocalMesh`; `--max-batch-size` 8 and
`--time-scale` 4 so that the engines bound capacity, not this machine's CPUs, and 10x capacity
stays within what one load generator offers), one workload shape: open-loop
Poisson arrivals of unique prompts (`--prompt-tokens` 64, `--output-tokens` 100), priorities
mixed 20% interactive / 60% standard / 20% batch, unkeyed gRPC requests.

1. Capacity (unless `--capacity` is given): the highest arrival rate at which at least 99% of
   the requests complete with TTFT within `--slo-s` (a refused or failed request counts as over
   the SLO, so refusing is no way to pass). Probes of `--probe-s` seconds: the rate doubles from
   `--start-rate` until a probe fails, then `--bisections` halvings of the interval.
   The gateway runs with `admission_max_wait_s` = the SLO (`--admission-max-wait-s`): it admits
   only work that can start within the objective. The orchestrator runs with its own defaults
   (`--start-soon-s` sets its `start_soon_s`: services/orchestrator/OVERLOAD.md compares them).
2. Steps: `--multipliers` (1 2 5 10) x capacity for `--step-s` seconds (60) each, once with
   clients that do not retry and once with clients that honour retry-after
   (`bench.replay.RetryingClient`: OpenAI SDK policy, 2 retries, retry-after + jitter).

Per step: offered and completed requests/s, goodput (completions whose first token came within
the step and whose admitted attempt had it within the SLO, per second of the step) as a share of
capacity,
refusals by code and how many carried retry-after, admitted p50/p99 TTFT per priority (the
admitted attempt's, from its send: `AttemptTimes`), gateway and orchestrator RSS at the
start and end of the step (VmRSS from /proc), engine deaths (the supervisor's restarts of a
replica plus Triton's "not healthy" stub reports in the replica logs), streams cut after
their first token, end-to-end goodput (TTFT from the first attempt's scheduled arrival, so a
retried request's wait before its retry counts; equal to goodput without retries, up to the
send lag), and recovery: after each step, the seconds until a lone request meets the SLO
again (no step starts on what the previous one left behind). Targets are checked and printed; JSON and a PNG go to bench-results/.
Measurements are ratios against the capacity measured in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import random
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.client import GatewayClient
from bench.replay import (
    RETRIED_CODES,
    Chunk,
    Client,
    Final,
    Refused,
    Result,
    RetryingClient,
    replay,
)
from bench.report import RESULTS_DIR, eprint, results_dicts, write_json
from bench.workloads import NS_UNIQUE, Request, poisson_arrivals, unique_tokens
from llmmesh.localmesh import LocalMesh, MeshOptions

PRIORITY_MIX = (("interactive", 0.2), ("standard", 0.6), ("batch", 0.2))
PRIORITIES = tuple(p for p, _ in PRIORITY_MIX)
_PRIORITY_WEIGHTS = tuple(w for _, w in PRIORITY_MIX)
GOODPUT_TARGET = 0.9
RSS_GROWTH_BOUND_MIB = 64.0  # per process over one step, whatever the offered load


# ------------------------------------------------------------------------------ workload
def workload(
    rate: float, duration_s: float, prompt_tokens: int, output_tokens: int, seed: int
) -> list[Request]:
    """Poisson arrivals at `rate` for `duration_s`, unique prompts, the priority mix."""
    rng = random.Random(seed)
    n = max(1, round(rate * duration_s))
    out = []
    for i, t in enumerate(poisson_arrivals(n, rate, rng)):
        if t >= duration_s and i:
            break
        out.append(mixed_request(rng, t, i, prompt_tokens, output_tokens, seed))
    return out


def mixed_request(
    rng: random.Random, arrival_s: float, i: int, prompt_tokens: int, output_tokens: int, seed: int
) -> Request:
    """Request `i` of a run: a unique prompt, a priority drawn from `PRIORITY_MIX`."""
    priority = rng.choices(PRIORITIES, _PRIORITY_WEIGHTS)[0]
    prompt = unique_tokens(NS_UNIQUE, seed * 1_000_003 + i, prompt_tokens)
    return Request(arrival_s, prompt, output_tokens, {"priority": priority})


def count_refusals(results: Sequence[Result]) -> tuple[Counter[str], Counter[str]]:
    """Every refusal (retried or final) by code, and those that carried a retry-after."""
    refusals: Counter[str] = Counter()
    with_retry_after: Counter[str] = Counter()
    for r in results:
        for code, retry_after in r.refusals:
            refusals[code] += 1
            if retry_after is not None:
                with_retry_after[code] += 1
    return refusals, with_retry_after


class AttemptTimes:
    """Wraps the client every attempt goes through (under `RetryingClient`): per request id, the
    seconds from the send of the attempt that produced the first token to that token (the
    admitted attempt's TTFT, without the waits before earlier retries)."""

    def __init__(self, inner: Client) -> None:
        self.inner = inner
        self.ttft_s: dict[str, float] = {}

    async def generate(
        self, request: Request, request_id: str
    ) -> AsyncIterator[Chunk | Final | Refused]:
        sent = time.monotonic()
        first = True
        async for event in self.inner.generate(request, request_id):
            if first and isinstance(event, Chunk):
                first = False
                self.ttft_s[request_id] = time.monotonic() - sent
            yield event


# ------------------------------------------------------------------------------ statistics
def pct(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (None for no values)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


def within_slo_share(results: Sequence[Result], slo_s: float) -> float:
    """Share of requests that completed with TTFT within the SLO (failures count as misses)."""
    if not results:
        return 0.0
    good = sum(1 for r in results if r.ok and r.ttft_s is not None and r.ttft_s <= slo_s)
    return good / len(results)


@dataclass
class Step:
    mode: str  # "no-retry" | "retry"
    multiplier: float
    offered_rps: float
    duration_s: float
    requests: int
    completed_rps: float
    goodput_rps: float
    goodput_share: float  # of capacity; TTFT of the admitted attempt within the SLO
    goodput_e2e_share: float = 0.0  # TTFT from the first attempt's scheduled arrival
    refusals: dict[str, int] = field(default_factory=dict)  # code -> count (every attempt)
    refusals_with_retry_after: dict[str, int] = field(default_factory=dict)
    failures: dict[str, int] = field(default_factory=dict)  # final outcome -> count (not ok)
    ttft_ms: dict[str, dict[str, float | int | None]] = field(default_factory=dict)
    retried_requests: int = 0
    cut_after_first_token: int = 0
    engine_deaths: int = 0
    recovery_s: float | None = None  # after the step: until a lone request met the SLO again
    rss_mib: dict[str, tuple[float, float]] = field(default_factory=dict)  # start, end


def summarize(
    results: Sequence[Result],
    *,
    mode: str,
    multiplier: float,
    offered_rps: float,
    duration_s: float,
    capacity_rps: float,
    slo_s: float,
    wall_s: float | None = None,
    admitted_ttft_s: dict[str, float] | None = None,
) -> Step:
    """One step's numbers from its per-request results (no mesh needed: unit-tested).
    Completions per second are over the step and the drain after it (`wall_s`, from the first
    send to the last answer). Goodput counts the completions whose first token came within the
    step (`duration_s` from the first scheduled arrival; retried requests and the drain finish
    after it, and counting them over the step alone would exceed capacity). `admitted_ttft_s`:
    the admitted attempt's TTFT per request id (`AttemptTimes`); without it, each result's own
    (from its scheduled arrival)."""
    ok = [r for r in results if r.ok]
    in_step = [r for r in ok if r.ttft_s is not None and r.scheduled_s + r.ttft_s <= duration_s]

    def first_token_s(r: Result) -> float | None:
        if admitted_ttft_s is not None and r.request_id in admitted_ttft_s:
            return admitted_ttft_s[r.request_id]
        return r.ttft_s

    good = [r for r in in_step if (t := first_token_s(r)) is not None and t <= slo_s]
    good_e2e = [r for r in in_step if r.ttft_s is not None and r.ttft_s <= slo_s]
    refusals, with_retry_after = count_refusals(results)
    ttft: dict[str, dict[str, float | int | None]] = {}
    for priority in (*PRIORITIES, "all"):
        values = [
            t * 1000
            for r in ok
            if (t := first_token_s(r)) is not None
            and (priority == "all" or r.meta.get("priority") == priority)
        ]
        ttft[priority] = {"n": len(values), "p50": pct(values, 50), "p99": pct(values, 99)}
    goodput = len(good) / duration_s
    return Step(
        mode=mode,
        multiplier=multiplier,
        offered_rps=offered_rps,
        duration_s=duration_s,
        requests=len(results),
        completed_rps=len(ok) / max(duration_s, wall_s or 0.0),
        goodput_rps=goodput,
        goodput_share=goodput / capacity_rps if capacity_rps > 0 else 0.0,
        goodput_e2e_share=len(good_e2e) / duration_s / capacity_rps if capacity_rps > 0 else 0.0,
        refusals=dict(refusals),
        refusals_with_retry_after=dict(with_retry_after),
        failures=dict(Counter(r.outcome for r in results if not r.ok)),
        ttft_ms=ttft,
        retried_requests=sum(1 for r in results if _retries(r) > 0),
        cut_after_first_token=sum(1 for r in results if not r.ok and r.output_tokens > 0),
    )


def _retries(r: Result) -> int:
    """Attempts after the first (the final refusal of a request that gave up is no retry)."""
    return len(r.refusals) - (0 if r.ok or r.outcome not in RETRIED_CODES else 1)


def targets(step: Step, slo_s: float) -> dict[str, bool]:
    """The issue's targets for one step (checked at 5x and 10x)."""
    interactive_p99 = step.ttft_ms["interactive"]["p99"]
    refused = sum(step.refusals.values())
    # Every request that did not complete was refused with RESOURCE_EXHAUSTED (no timeouts,
    # UNAVAILABLE, cut streams), and every refusal, retried or final, carried a retry-after.
    other_failures = {c: n for c, n in step.failures.items() if c != "RESOURCE_EXHAUSTED"}
    growth = [end - start for start, end in step.rss_mib.values()]
    return {
        "goodput>=90%": step.goodput_share >= GOODPUT_TARGET,
        "interactive p99 within SLO": interactive_p99 is not None
        and interactive_p99 <= slo_s * 1000,
        "refusals all RESOURCE_EXHAUSTED+retry-after": not other_failures
        and set(step.refusals) <= {"RESOURCE_EXHAUSTED"}
        and step.refusals_with_retry_after.get("RESOURCE_EXHAUSTED", 0) == refused,
        "0 engine deaths": step.engine_deaths == 0,
        "0 streams cut": step.cut_after_first_token == 0,
        f"RSS growth<={RSS_GROWTH_BOUND_MIB:.0f}MiB": all(
            g <= RSS_GROWTH_BOUND_MIB for g in growth
        ),
    }


# ------------------------------------------------------------------------------ the mesh
def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return math.nan


class Mesh:
    """The local mesh and what the steps read from it."""

    def __init__(self, mesh: LocalMesh) -> None:
        self.mesh = mesh

    def pids(self) -> dict[str, int]:
        out = {}
        for name, svc in self.mesh.services.items():
            if (name == "gateway" or name.startswith("orchestrator")) and svc.proc is not None:
                out[name] = svc.proc.pid
        return out

    def rss(self) -> dict[str, float]:
        return {name: rss_mib(pid) for name, pid in self.pids().items()}

    def engine_deaths(self) -> int:
        """Replica restarts by the supervisor plus stub deaths Triton logged."""
        replicas = set(self.mesh.replica_ids)
        restarts = sum(1 for e in self.mesh.supervisor.history if e.name in replicas)
        stubs = 0
        for log in self.mesh.workdir.glob("*.triton.log"):
            stubs += log.read_text(errors="replace").count("is not healthy")
        return restarts + stubs


async def run_step(
    mesh: Mesh,
    client: Client,
    attempts: AttemptTimes,
    *,
    rate: float,
    args: argparse.Namespace,
    mode: str,
    multiplier: float,
    capacity: float,
    seed: int,
) -> Step:
    requests = workload(rate, args.step_s, args.prompt_tokens, args.output_tokens, seed)
    rss_start = mesh.rss()
    deaths = mesh.engine_deaths()
    t0 = time.monotonic()
    results = await replay(
        requests,
        client,
        max_in_flight=args.max_in_flight,
        request_id_prefix=f"{mode}-{multiplier:g}-{seed}",
    )
    wall = time.monotonic() - t0
    rss_end = mesh.rss()
    admitted = dict(attempts.ttft_s)
    attempts.ttft_s.clear()
    if args.dump_results:
        rows = results_dicts(results)
        for row in rows:
            row["admitted_ttft_s"] = admitted.get(row["request_id"])
        write_json(f"{args.out}-{mode}-{multiplier:g}x-results.json", {"results": rows})
    step = summarize(
        results,
        mode=mode,
        multiplier=multiplier,
        offered_rps=len(requests) / args.step_s,
        duration_s=args.step_s,
        capacity_rps=capacity,
        slo_s=args.slo_s,
        wall_s=wall,
        admitted_ttft_s=admitted,
    )
    step.engine_deaths = mesh.engine_deaths() - deaths
    step.rss_mib = {k: (rss_start[k], rss_end.get(k, math.nan)) for k in rss_start}
    step.recovery_s = await recovered(client, args, seed)
    eprint(
        f"  {mode} {multiplier:g}x ({rate:.1f}/s): {step.completed_rps:.1f}/s completed, "
        f"goodput {step.goodput_share:.0%} (end to end {step.goodput_e2e_share:.0%}), "
        f"refusals {step.refusals}, "
        f"failures {step.failures}, {wall:.0f}s"
    )
    return step


async def recovered(
    client: Client, args: argparse.Namespace, seed: int, limit_s: float = 60.0
) -> float | None:
    """Seconds until a lone request has its first token within the SLO again (one a second),
    so that no step starts on what the previous one left behind; None: not within `limit_s`."""
    start = time.monotonic()
    probe = workload(1.0, 1.0, args.prompt_tokens, args.output_tokens, seed + 10_000)[:1]
    while time.monotonic() - start < limit_s:
        [res] = await replay(probe, client, request_id_prefix=f"settle-{seed}")
        if res.ok and res.ttft_s is not None and res.ttft_s <= args.slo_s:
            return time.monotonic() - start
        await asyncio.sleep(1.0)
    eprint(f"  the mesh did not recover within {limit_s:.0f} s")
    return None


async def measure_capacity(mesh: Mesh, client: Client, args: argparse.Namespace) -> float:
    """Coarse: double from --start-rate until a probe misses, then bisect."""

    async def passes(rate: float, seed: int) -> bool:
        requests = workload(rate, args.probe_s, args.prompt_tokens, args.output_tokens, seed)
        results = await replay(
            requests, client, max_in_flight=args.max_in_flight, request_id_prefix=f"cap-{seed}"
        )
        share = within_slo_share(results, args.slo_s)
        ok = share >= 0.99
        eprint(f"  capacity probe {rate:.2f}/s: {share:.1%} within {args.slo_s:g} s -> {ok}")
        return ok

    lo, hi, rate, seed = 0.0, math.inf, args.start_rate, 1000
    while math.isinf(hi) and rate <= args.max_rate:
        seed += 1
        if await passes(rate, seed):
            lo, rate = rate, rate * 2
        else:
            hi = rate
    if math.isinf(hi):
        return lo
    for _ in range(args.bisections):
        mid = (lo + hi) / 2 if lo > 0 else hi / 2
        seed += 1
        if await passes(mid, seed):
            lo = mid
        else:
            hi = mid
    if lo <= 0:
        raise SystemExit("capacity: no rate passed; lower --start-rate")
    return lo


# ------------------------------------------------------------------------------ output
def table(steps: Sequence[Step], capacity: float, slo_s: float) -> str:
    head = (
        f"{'mode':<9}{'load':>5}{'offered/s':>10}{'done/s':>8}{'goodput':>8}{'e2e':>5}"
        f"  {'refused (with retry-after)':<34}{'other failures':<40}"
        f"{'inter p50/p99':>15}{'std p50/p99':>15}{'batch p50/p99':>15}"
        f"{'cut':>5}{'deaths':>7}{'gw RSS MiB':>13}{'orch RSS MiB':>14}{'recovery':>9}"
    )
    lines = [f"capacity {capacity:.2f} req/s (p99 TTFT <= {slo_s:g} s)", head]

    def ms(v: float | int | None) -> str:
        return "-" if v is None else f"{v:.0f}"

    for s in steps:
        refused = ", ".join(
            f"{c}:{n}({s.refusals_with_retry_after.get(c, 0)})"
            for c, n in sorted(s.refusals.items())
        )
        other = ", ".join(f"{c}:{n}" for c, n in sorted(s.failures.items()) if c not in s.refusals)
        lat = [f"{ms(s.ttft_ms[p]['p50'])}/{ms(s.ttft_ms[p]['p99'])}" for p in PRIORITIES]
        gw = s.rss_mib.get("gateway", (math.nan, math.nan))
        orch = s.rss_mib.get("orchestrator", (math.nan, math.nan))
        lines.append(
            f"{s.mode:<9}{s.multiplier:>4g}x{s.offered_rps:>10.1f}{s.completed_rps:>8.1f}"
            f"{s.goodput_share:>8.0%}{s.goodput_e2e_share:>5.0%}  {refused or '-':<34}"
            f"{other or '-':<40}"
            f"{lat[0]:>15}{lat[1]:>15}{lat[2]:>15}{s.cut_after_first_token:>5}"
            f"{s.engine_deaths:>7}{gw[0]:>6.0f}->{gw[1]:<5.0f}{orch[0]:>7.0f}->{orch[1]:<5.0f}"
            f"{'-' if s.recovery_s is None else f'{s.recovery_s:.0f}s':>9}"
        )
    return "\n".join(lines)


def plot(steps: Sequence[Step], slo_s: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for mode in ("no-retry", "retry"):
        mine = [s for s in steps if s.mode == mode]
        xs = [s.multiplier for s in mine]
        ax1.plot(xs, [s.goodput_share * 100 for s in mine], marker="o", label=mode)
        for priority, style in (("interactive", "-"), ("all", ":")):
            ys = [s.ttft_ms[priority]["p99"] or math.nan for s in mine]
            ax2.plot(xs, ys, style, marker="o", label=f"{mode} {priority}")
    ax1.axhline(GOODPUT_TARGET * 100, color="grey", ls="--", lw=1)
    ax1.set(xlabel="offered load (x capacity)", ylabel="goodput (% of capacity)", xscale="log")
    ax2.axhline(slo_s * 1000, color="grey", ls="--", lw=1)
    ax2.set(
        xlabel="offered load (x capacity)",
        ylabel="admitted p99 TTFT (ms)",
        xscale="log",
        yscale="log",
    )
    ax1.legend()
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# ------------------------------------------------------------------------------ main
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.overload", description=__doc__)
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument(
        "--time-scale",
        type=float,
        default=4.0,
        help="emulator TIME_SCALE (4: engines 4x slower than the cost model)",
    )
    p.add_argument(
        "--max-batch-size",
        type=int,
        default=8,
        help="emulator max_batch_size: with --time-scale, what bounds capacity is the engines",
    )
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--output-tokens", type=int, default=100)
    p.add_argument("--slo-s", type=float, default=2.0, help="TTFT SLO")
    p.add_argument("--step-s", type=float, default=60.0, help="seconds per load step")
    p.add_argument("--probe-s", type=float, default=20.0, help="seconds per capacity probe")
    p.add_argument("--capacity", type=float, default=None, help="skip the capacity search")
    p.add_argument(
        "--admission-max-wait-s",
        type=float,
        default=None,
        help="the gateway's admission_max_wait_s (default: the SLO; 0: unset, the deadline)",
    )
    p.add_argument(
        "--start-soon-s",
        type=float,
        default=-1.0,
        help="the orchestrator's start_soon_s (negative: the orchestrator's default)",
    )
    p.add_argument("--start-rate", type=float, default=4.0)
    p.add_argument("--max-rate", type=float, default=400.0)
    p.add_argument("--bisections", type=int, default=2)
    p.add_argument("--multipliers", type=float, nargs="+", default=[1, 2, 5, 10])
    p.add_argument("--modes", nargs="+", default=["no-retry", "retry"])
    p.add_argument("--max-retries", type=int, default=2)
    p.add_argument("--max-in-flight", type=int, default=8192, help="load generator safety cap")
    p.add_argument("--timeout-s", type=float, default=120.0, help="client deadline per attempt")
    p.add_argument(
        "--out",
        default="overload",
        type=lambda name: name.removesuffix(".json"),
        help="Name under bench-results/ (a trailing .json is dropped): writes NAME.json and "
        "NAME.png.",
    )
    p.add_argument(
        "--dump-results",
        action="store_true",
        help="also write each step's per-request results (bench-results/OUT-MODE-Nx-results.json)",
    )
    return p


async def main_async(args: argparse.Namespace) -> int:
    emulator_env = {}
    if args.max_batch_size is not None:
        emulator_env["LLMMESH_EMULATOR_MAX_BATCH_SIZE"] = str(args.max_batch_size)
    wait_s = args.slo_s if args.admission_max_wait_s is None else args.admission_max_wait_s
    gateway_env = {"LLMMESH_GATEWAY_ADMISSION_MAX_WAIT_S": str(wait_s)} if wait_s > 0 else {}
    if args.start_soon_s >= 0:
        gateway_env["LLMMESH_ORCHESTRATOR_START_SOON_S"] = str(args.start_soon_s)
    mesh = LocalMesh(
        MeshOptions(
            replicas=args.replicas,
            time_scale=args.time_scale,
            emulator_env=emulator_env,
            extra_env=gateway_env,
            log_json=True,
        )
    )
    await mesh.start()
    steps: list[Step] = []
    try:
        m = Mesh(mesh)
        plain = GatewayClient(
            mesh.services["gateway"].address, timeout_s=args.timeout_s, keyed=False
        )
        await plain.wait_ready()
        try:
            if args.capacity is None:
                eprint("measuring capacity")
                capacity = await measure_capacity(m, plain, args)
            else:
                capacity = args.capacity
            eprint(f"capacity {capacity:.2f} req/s")
            attempts = AttemptTimes(plain)
            clients: dict[str, Client] = {
                "no-retry": attempts,
                "retry": RetryingClient(attempts, max_retries=args.max_retries),
            }
            seed = 0
            for mode in args.modes:
                for mult in args.multipliers:
                    seed += 1
                    steps.append(
                        await run_step(
                            m,
                            clients[mode],
                            attempts,
                            rate=capacity * mult,
                            args=args,
                            mode=mode,
                            multiplier=mult,
                            capacity=capacity,
                            seed=seed,
                        )
                    )
        finally:
            await plain.close()
    finally:
        await mesh.stop()
    print(table(steps, capacity, args.slo_s))
    verdicts = {
        f"{s.mode} {s.multiplier:g}x": targets(s, args.slo_s) for s in steps if s.multiplier >= 5
    }
    for name, checks in verdicts.items():
        print(f"{name}: " + ", ".join(f"{k} {'met' if v else 'MISSED'}" for k, v in checks.items()))
    payload: dict[str, Any] = {
        "args": vars(args),
        "capacity_rps": capacity,
        "rss_growth_bound_mib": RSS_GROWTH_BOUND_MIB,
        "steps": [asdict(s) for s in steps],
        "targets": verdicts,
    }
    path = write_json(f"{args.out}.json", payload)
    png = RESULTS_DIR / f"{args.out}.png"
    plot(steps, args.slo_s, png)
    print(f"wrote {path} and {png}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return asyncio.run(main_async(parser().parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
