"""Tables, JSON and PNG of simulation runs (the live benchmarks' metrics, `bench.report`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench.report import format_table, summary_dict, summary_table
from llmmesh.sim.cluster import SimResult


def _f(v: float, spec: str) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def run_table(runs: Sequence[tuple[str, SimResult]]) -> str:
    """Cluster-level numbers per run: goodput, replica-seconds, cost, scale events, rejections,
    and what the simulation cost (CPU seconds, simulated events per CPU second)."""
    headers = [
        "run",
        "in SLO",
        "goodput tok/s",
        "replica-s",
        "$",
        "$/M out",
        "scale ev",
        "rejected",
        "sim s",
        "cpu s",
        "wall s",
        "events",
        "events/s",
    ]
    rows = []
    for name, r in runs:
        out = r.summary.output_tokens
        rows.append(
            [
                name,
                _f(r.summary.extra.get("slo_attainment", math.nan), ".3f"),
                _f(r.summary.extra.get("goodput_tok_s", math.nan), ".1f"),
                _f(sum(r.replica_seconds.values()), ".0f"),
                _f(r.cost_usd, ".2f"),
                _f(r.cost_usd / out * 1e6 if out else math.nan, ".3f"),
                str(len(r.scale_events)),
                str(sum(r.rejections.values())),
                _f(r.sim_s, ".0f"),
                _f(r.cpu_s, ".1f"),
                _f(r.wall_s, ".1f"),
                str(r.events),
                _f(r.events_per_s, ".0f"),
            ]
        )
    return format_table(headers, rows)


def tables(runs: Sequence[tuple[str, SimResult]]) -> str:
    summaries = []
    for name, r in runs:
        s = r.summary
        s.arm = name
        summaries.append(s)
    return summary_table(summaries) + "\n\n" + run_table(runs)


def result_dict(r: SimResult) -> dict[str, Any]:
    return {
        "profile": r.profile,
        "seed": r.seed,
        "summary": summary_dict(r.summary),
        "replica_seconds": r.replica_seconds,
        "cost_usd": r.cost_usd,
        "scale_events": [asdict(e) for e in r.scale_events],
        "timeline": [asdict(s) for s in r.timeline],
        "rejections": r.rejections,
        "wall_s": r.wall_s,
        "cpu_s": r.cpu_s,
        "sim_s": r.sim_s,
        "events": r.events,
        "events_per_cpu_s": r.events_per_s,
        "engine_iterations": r.engine_iterations,
        "loop_wakeups": r.loop_wakeups,
    }


def _cdf(ax: Any, values: Sequence[float], label: str) -> None:
    v = sorted(values)
    if not v:
        return
    n = len(v)
    ax.plot(v, [(i + 1) / n for i in range(n)], label=label)


def write_png(path: Path, runs: Sequence[tuple[str, SimResult]], title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    (a_ttft, a_itl), (a_e2e, a_time) = axes
    for name, r in runs:
        ok = [x for x in r.results if x.ok]
        _cdf(a_ttft, [x.ttft_s for x in ok if x.ttft_s is not None], name)
        _cdf(a_itl, [x.itl_mean_s * 1000 for x in ok if x.itl_mean_s is not None], name)
        _cdf(a_e2e, [x.e2e_s for x in ok if x.e2e_s is not None], name)
        t = [s.t_s for s in r.timeline]
        a_time.step(
            t,
            [sum(s.provisioned.values()) for s in r.timeline],
            where="post",
            label=f"{name} replicas",
        )
    a_ttft.set_xscale("log")
    for ax, label in ((a_ttft, "TTFT s"), (a_e2e, "E2E s")):
        ax.set_xlabel(label)
        ax.set_ylabel("CDF")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    a_itl.set_xlabel("ITL ms (per-request mean)")
    a_itl.set_ylabel("CDF")
    a_itl.grid(True, alpha=0.3)
    a_itl.legend(fontsize=8)
    if runs:
        r0 = runs[0][1]
        if len(r0.timeline) > 1:
            twin = a_time.twinx()
            dt = [
                (b.t_s - a.t_s) or 1.0 for a, b in zip(r0.timeline, r0.timeline[1:], strict=False)
            ]
            twin.plot(
                [s.t_s for s in r0.timeline[1:]],
                [s.arrivals / d for s, d in zip(r0.timeline[1:], dt, strict=True)],
                color="grey",
                alpha=0.5,
                label="arrivals/s",
            )
            twin.set_ylabel("arrivals / s")
    a_time.set_xlabel("virtual time s")
    a_time.set_ylabel("replicas provisioned")
    a_time.legend(fontsize=8, loc="upper left")
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
