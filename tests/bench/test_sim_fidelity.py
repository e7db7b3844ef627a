from __future__ import annotations

import pytest

from bench.autoscale_report import TimelinePoint as P
from bench.sim_fidelity import build_parser, startup_delays


@pytest.mark.parametrize(
    ("timeline", "expected"),
    [
        ([], []),
        # One replica starts at 2 s and is ready at 6 s.
        ([P(0, 1, 1), P(2, 2, 1, 1), P(4, 2, 1, 1), P(6, 2, 2, 0)], [4.0]),
        # Two start 1 s apart; the first started is the first ready.
        ([P(0, 1, 1), P(1, 2, 1, 1), P(2, 3, 1, 2), P(5, 3, 2, 1), P(7, 3, 3, 0)], [4.0, 5.0]),
        # Started and ready between two samples: at most a sample period, counted as 0.
        ([P(0, 1, 1), P(1, 2, 2, 0)], [0.0]),
        # A drain (ready falls) is no start.
        ([P(0, 2, 2), P(1, 1, 1, 0, 1), P(2, 1, 1)], []),
        # One becomes ready while another starts in the same interval.
        ([P(0, 2, 1, 1), P(3, 3, 2, 1), P(8, 3, 3, 0)], [3.0, 5.0]),
        # A start cancelled before it was ready does not pair with a later start's ready.
        ([P(0, 1, 1), P(1, 2, 1, 1), P(2, 1, 1, 0), P(5, 2, 1, 1), P(8, 2, 2, 0)], [3.0]),
        # Two starting, the newer cancelled while the older becomes ready.
        ([P(0, 1, 1), P(1, 2, 1, 1), P(2, 3, 1, 2), P(4, 2, 2, 0)], [3.0]),
        # One becomes ready while another starts draining: ready is flat, yet one is ready.
        ([P(0, 2, 2), P(1, 3, 2, 1), P(4, 2, 2, 0, 1)], [3.0]),
    ],
)
def test_startup_delays(timeline: list[P], expected: list[float]) -> None:
    assert startup_delays(timeline) == pytest.approx(expected)


def test_workloads_may_be_none_for_the_autoscaled_run_alone() -> None:
    args = build_parser().parse_args(["--workloads"])
    assert args.workloads == []
    assert args.autoscaled_duration > 0


def test_live_runs_must_be_positive() -> None:
    from bench.sim_fidelity import main

    with pytest.raises(SystemExit, match="live-runs"):
        main(["--live-runs", "0", "--workloads", "--autoscaled-duration", "0"])
