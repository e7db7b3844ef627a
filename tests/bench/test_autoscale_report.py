from __future__ import annotations

import math
from array import array
from pathlib import Path

import pytest

from bench import workloads as wl
from bench.autoscale_report import (
    TimelinePoint,
    aborted,
    compressed_day,
    plot,
    replica_seconds,
    scale_events,
    slo_attainment,
    thin,
)
from bench.replay import Result


def _requests(n: int, gap_s: float) -> list[wl.Request]:
    return [wl.Request(i * gap_s, array("I", [1, 2, 3]), 4, {}) for i in range(n)]


def _result(ttft: float | None, outcome: str = "ok") -> Result:
    return Result(0, "r", 0.0, 0.0, ttft, None, None, 1, 3, outcome=outcome)


def test_compressed_day_spans_duration_and_peaks_in_the_middle() -> None:
    reqs = compressed_day(_requests(4001, 1.0), duration_s=100.0, trough=0.1, peak=1.0)
    assert len(reqs) == 4001
    assert reqs[-1].arrival_s - reqs[0].arrival_s == pytest.approx(100.0, rel=0.02)
    edges = sum(1 for r in reqs if r.arrival_s < 10 or r.arrival_s > 90)
    middle = sum(1 for r in reqs if 45 <= r.arrival_s < 55)
    assert middle > 2 * edges  # 10 s around the peak hold far more than 20 s of night


def test_thin_keeps_every_kth() -> None:
    reqs = _requests(10, 1.0)
    assert [r.arrival_s for r in thin(reqs, 3)] == [0.0, 3.0, 6.0, 9.0]
    with pytest.raises(ValueError, match="keep_every"):
        thin(reqs, 0)


@pytest.mark.parametrize(
    ("points", "start", "end", "expected"),
    [
        ([TimelinePoint(0, 2, 2)], 0.0, 10.0, 20.0),
        ([TimelinePoint(0, 1, 1), TimelinePoint(5, 3, 2, starting=1)], 0.0, 10.0, 5 + 15),
        ([TimelinePoint(0, 1, 1, draining=1), TimelinePoint(4, 1, 1)], 2.0, 6.0, 2 * 2 + 1 * 2),
        ([TimelinePoint(3, 2, 2)], 0.0, 5.0, 10.0),  # before the first sample: its count
        ([TimelinePoint(0, 2, 2)], 5.0, 5.0, 0.0),
    ],
)
def test_replica_seconds(
    points: list[TimelinePoint], start: float, end: float, expected: float
) -> None:
    assert replica_seconds(points, start, end) == pytest.approx(expected)


def test_scale_events_count_replicas_added_and_removed() -> None:
    tl = [
        TimelinePoint(0, 1, 1),
        TimelinePoint(1, 3, 1, starting=2),
        TimelinePoint(2, 3, 3),
        TimelinePoint(3, 1, 1, draining=2),
        TimelinePoint(4, 2, 2),
    ]
    assert scale_events(tl) == (3, 2)


def test_slo_attainment_counts_failures_as_misses() -> None:
    results = [_result(0.1), _result(0.5), _result(None, "UNAVAILABLE"), _result(2.0)]
    assert slo_attainment(results, 1.0) == pytest.approx(0.5)
    assert aborted(results) == 1
    assert math.isnan(slo_attainment([], 1.0))


def test_plot_writes_png(tmp_path: Path) -> None:
    reqs = _requests(50, 0.5)
    tl = {"autoscaled": [TimelinePoint(0, 1, 1), TimelinePoint(10, 2, 1, starting=1)]}
    out = plot(tmp_path / "p.png", reqs, tl, end_s=25.0, title="t")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
