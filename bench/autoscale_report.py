"""Pure parts of `make bench-autoscale`: the compressed day-shaped workload, the replica timeline
and what is computed from it (replica-seconds, scale events), SLO attainment, the PNG plot.

Definitions:
- **Replica-seconds**: the integral over the run window of the replicas that exist (ready +
  starting + draining: a replica costs from the moment its process starts until it exits),
  piecewise constant between timeline samples.
- **Scale events**: each step up or down of the provisioned count (ready + starting) counts as
  one event per replica added or removed.
- **TTFT-SLO attainment**: requests whose TTFT (from the scheduled arrival) is at most the SLO,
  over all requests sent; a failed or aborted request counts as a miss.
- **Aborted**: requests that did not end with a complete, successful stream.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from bench import workloads as wl
from bench.replay import Result


@dataclass(frozen=True, slots=True)
class TimelinePoint:
    """The pool at one instant of the run (seconds from the run's start)."""

    t_s: float
    desired: int
    ready: int
    starting: int = 0
    draining: int = 0

    @property
    def existing(self) -> int:
        return self.ready + self.starting + self.draining

    @property
    def provisioned(self) -> int:
        return self.ready + self.starting


def compressed_day(
    requests: Sequence[wl.Request], *, duration_s: float, trough: float, peak: float
) -> list[wl.Request]:
    """The trace's arrivals warped by a day-shaped multiplier (trough at the start and end, peak
    in the middle, one period over the run) and scaled so the warped arrivals span `duration_s`.

    The warp preserves the request mix; the scale factor is found by two passes because the warp
    stretches time by the inverse of the mean multiplier."""
    if not requests:
        return []
    span = requests[-1].arrival_s - requests[0].arrival_s
    if span <= 0:
        raise ValueError("the trace's arrivals span no time")
    shape = wl.day_shape(duration_s, trough, peak)
    factor = duration_s * (trough + peak) / 2 / span
    for _ in range(3):
        warped = wl.warp_load(wl.scale_time(requests, factor), shape)
        got = warped[-1].arrival_s - warped[0].arrival_s
        if got <= 0:
            break
        factor *= duration_s / got
    return wl.warp_load(wl.scale_time(requests, factor), shape)


def thin(requests: Sequence[wl.Request], keep_every: int) -> list[wl.Request]:
    """Every `keep_every`-th request (deterministic): the same arrival process at 1/k the rate."""
    if keep_every < 1:
        raise ValueError("keep_every must be >= 1")
    return list(requests[::keep_every])


def replica_seconds(timeline: Sequence[TimelinePoint], start_s: float, end_s: float) -> float:
    """Integral of `existing` over [start_s, end_s], holding each sample until the next one."""
    if end_s <= start_s or not timeline:
        return 0.0
    pts = sorted(timeline, key=lambda p: p.t_s)
    total = 0.0
    for i, p in enumerate(pts):
        seg_start = max(p.t_s, start_s)
        seg_end = min(pts[i + 1].t_s if i + 1 < len(pts) else end_s, end_s)
        if seg_end > seg_start:
            total += p.existing * (seg_end - seg_start)
    first = pts[0]
    if first.t_s > start_s:  # before the first sample: the first sample's count
        total += first.existing * (min(first.t_s, end_s) - start_s)
    return total


def scale_events(timeline: Sequence[TimelinePoint]) -> tuple[int, int]:
    """(replicas added, replicas removed) from consecutive changes of the provisioned count."""
    up = down = 0
    pts = sorted(timeline, key=lambda p: p.t_s)
    for a, b in itertools.pairwise(pts):
        delta = b.provisioned - a.provisioned
        if delta > 0:
            up += delta
        elif delta < 0:
            down -= delta
    return up, down


def slo_attainment(results: Sequence[Result], ttft_slo_s: float) -> float:
    if not results:
        return math.nan
    met = sum(1 for r in results if r.ok and r.ttft_s is not None and r.ttft_s <= ttft_slo_s)
    return met / len(results)


def aborted(results: Sequence[Result]) -> int:
    return sum(1 for r in results if not r.ok)


def arrival_rate(
    requests: Sequence[wl.Request], bin_s: float, end_s: float
) -> tuple[list[float], list[float]]:
    """(bin centres, requests per second) of the scheduled arrivals."""
    n = max(1, math.ceil(end_s / bin_s))
    counts = [0] * n
    for r in requests:
        i = int(r.arrival_s // bin_s)
        if 0 <= i < n:
            counts[i] += 1
    return [(i + 0.5) * bin_s for i in range(n)], [c / bin_s for c in counts]


def plot(
    path: Path,
    requests: Sequence[wl.Request],
    timelines: Mapping[str, Sequence[TimelinePoint]],
    *,
    end_s: float,
    title: str,
) -> Path:
    """Load (arrivals/s) on the left axis; desired and ready replicas per arm on the right."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 5))
    xs, rate = arrival_rate(requests, max(end_s / 120, 1.0), end_s)
    ax.fill_between(xs, rate, step="mid", alpha=0.25, color="tab:gray", label="arrivals/s")
    ax.set_xlabel("time (s)")
    ax.set_ylabel("arrivals per second")
    ax2 = ax.twinx()
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:red"]
    for (arm, tl), color in zip(timelines.items(), colors, strict=False):
        pts = sorted(tl, key=lambda p: p.t_s)
        ts = [p.t_s for p in pts]
        ax2.step(ts, [p.ready for p in pts], where="post", color=color, label=f"{arm}: ready")
        ax2.step(
            ts,
            [p.desired for p in pts],
            where="post",
            color=color,
            linestyle="--",
            alpha=0.7,
            label=f"{arm}: desired",
        )
    ax2.set_ylabel("replicas")
    ax2.set_ylim(bottom=0)
    handles = ax.get_legend_handles_labels()
    handles2 = ax2.get_legend_handles_labels()
    ax2.legend(handles[0] + handles2[0], handles[1] + handles2[1], loc="upper left", fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
