"""The local actuator's liveness bookkeeping (services/autoscaler/actuators/liveness.py), on an
injected clock: one probe in flight per replica, the period after each, kill on the threshold."""

from __future__ import annotations

import pytest

from llmmesh.triton.launcher import LivenessProbe
from services.autoscaler.actuators.liveness import LivenessTracker

PROBE = LivenessProbe(period_s=1.0, timeout_s=9.0, request_timeout_s=8.0, failure_threshold=3)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(
    ("results", "kill_at"),
    [
        ([False, False, False], 3),  # three in a row
        ([False, True, False, False, False], 5),  # a pass resets the count
        ([True, False, False, True, False, False], None),  # never three in a row
        ([False, False, True, False, False, False], 6),
    ],
)
def test_a_replica_is_killed_after_threshold_failures_in_a_row(
    results: list[bool], kill_at: int | None
) -> None:
    clock = Clock()
    lv = LivenessTracker(PROBE, clock)
    killed = None
    for i, alive in enumerate(results, start=1):
        assert lv.due("r")
        assert not lv.due("r")  # one probe in flight
        verdict = lv.result("r", alive)
        if verdict is not None and killed is None:
            killed = i
            assert verdict == PROBE.failure_threshold
        assert not lv.due("r")  # the next one is due a period later
        clock.now += PROBE.period_s
    assert killed == kill_at


def test_a_forgotten_replica_starts_over_and_its_running_probe_is_ignored() -> None:
    clock = Clock()
    lv = LivenessTracker(PROBE, clock)
    for _ in range(2):
        assert lv.due("r")
        assert lv.result("r", False) is None
        clock.now += PROBE.period_s
    assert lv.due("r")
    lv.forget("r")  # stopped while its probe ran
    assert lv.result("r", False) is None
    assert lv.due("r")  # a new replica of that id starts with no failures
    assert lv.result("r", False) is None
