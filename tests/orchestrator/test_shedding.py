"""Admit shedding on the calls' sojourn: the level's control per window and the refusal order by
class (unit), and the director refusing with BUSY before any work (core, on a manual clock)."""

from __future__ import annotations

import random

import pytest

from llmmesh.common.errors import Reason
from services.orchestrator.domain import Outcome, Priority
from services.orchestrator.errors import Busy
from services.orchestrator.shedding import MIN_SAMPLES, STEP, AdmitShedder
from tests.orchestrator.test_clock import ready_on_manual_clock
from tests.orchestrator.test_core import req, settings

TARGET = 0.02
WINDOW = 0.05
OVER = [0.5, 0.3, 0.4]  # a standing queue: every call of the window waited
CALM = [0.001]


def shedder_after(windows: list[list[float]], after_s: float = 0.0) -> AdmitShedder:
    """A shedder fed each window's sojourns in turn, the last window judged (by a first sample
    of the window after it); `after_s` 0: it sheds from the first overloaded window."""
    s = AdmitShedder(TARGET, WINDOW, after_s, random.Random(0))
    for k, samples in enumerate(windows):
        for i, x in enumerate(samples):
            s.observe(x, (k + (i + 1) / (len(samples) + 1)) * WINDOW)
    if windows:
        s.observe(0.0, (len(windows) + 0.5) * WINDOW)
    return s


@pytest.mark.parametrize(
    ("windows", "batch", "standard", "interactive"),
    [
        ([], 0.0, 0.0, 0.0),
        ([CALM] * 50, 0.0, 0.0, 0.0),
        ([[TARGET]] * 50, 0.0, 0.0, 0.0),  # at the target is not above it
        ([OVER], 3 * STEP, 0.0, 0.0),  # one overloaded window: a share of batch only
        ([OVER] * 3, 9 * STEP, 0.0, 0.0),
        ([OVER] * 4, 1.0, 12 * STEP - 1, 0.0),  # all batch, then standard in proportion
        ([OVER] * 7, 1.0, 1.0, 21 * STEP - 2),
        ([OVER] * 100, 1.0, 1.0, 1.0),  # saturates at 1
        ([[0.5, 0.5, 0.001, 0.5]] * 20, 0.0, 0.0, 0.0),  # a burst some calls waited behind
        ([OVER] * 4 + [[0.015]] * 50, 1.0, 12 * STEP - 1, 0.0),  # between half and target: held
        ([OVER] * 4 + [CALM] * 8, 0.0, 0.0, 0.0),  # calm: down by half a step each
        ([OVER] * 4 + [CALM] * 4, 6 * STEP, 0.0, 0.0),
    ],
)
def test_the_level_refuses_batch_then_standard_then_interactive(
    windows: list[list[float]], batch: float, standard: float, interactive: float
) -> None:
    s = shedder_after(windows)
    assert s.refusal_share(Priority.BATCH) == pytest.approx(batch)
    assert s.refusal_share(Priority.STANDARD) == pytest.approx(standard)
    assert s.refusal_share(Priority.INTERACTIVE) == pytest.approx(interactive)


@pytest.mark.parametrize(
    ("windows", "level"),
    [
        ([OVER] * 19, 0.0),  # 0.95 s of standing queue: a burst it works through
        ([OVER] * 20, STEP),  # 1 s: the first rise, with the window that reaches it
        ([OVER] * 23, 4 * STEP),  # then one step per overloaded window
        ([OVER] * 19 + [[TARGET]] + [OVER] * 19, 0.0),  # a calm call starts the count afresh
        ([OVER] * 19 + [[]] * 20 + [OVER], 0.0),  # and so do `after_s` without a call,
        ([OVER] * 19 + [[]] + [OVER], STEP),  # but not a shorter gap (a busy loop)
        ([OVER] * 10 + [[0.5, 0.5]] * 5 + [OVER] * 5, STEP),  # nor windows of few late calls
        ([OVER] * 21 + [[0.015]] + [OVER] * 2, 4 * STEP),  # shedding: no wait again
    ],
)
def test_a_queue_must_stand_after_s_before_the_first_refusal(
    windows: list[list[float]], level: float
) -> None:
    assert shedder_after(windows, after_s=20 * WINDOW).level == pytest.approx(level)


def test_the_level_returns_to_exactly_zero() -> None:
    s = shedder_after([OVER] * 3 + [CALM] * 5 + [OVER] * 1 + [CALM] * 10)
    assert s.level == 0.0
    assert s.refusal_share(Priority.BATCH) == 0.0


def test_a_shrinking_queue_holds_the_level() -> None:
    s = shedder_after([[0.9] * 3, [0.8] * 3, [0.7] * 3, [0.6] * 3])
    assert s.level == pytest.approx(STEP)  # raised once; then the queue shrank: enough
    s = shedder_after([[0.9] * 3, [0.8] * 3, [0.85] * 3, [0.9] * 3])
    assert s.level == pytest.approx(3 * STEP)  # growing again: raised again
    s = shedder_after([[0.9] * 3, [0.895] * 3, [0.89] * 3])
    assert s.level == pytest.approx(3 * STEP)  # within half the target: a standing queue


def test_a_window_of_too_few_calls_is_no_standing_queue() -> None:
    s = shedder_after([[0.5] * (MIN_SAMPLES - 1)] * 20)
    assert s.level == 0


def test_upkeep_closes_the_windows_no_call_closed() -> None:
    s = shedder_after([OVER] * 4)  # level 4 steps; the fifth window began with a calm call
    s.tick(4.9 * WINDOW)  # still the fifth window: nothing to close
    assert s.level == pytest.approx(4 * STEP)
    s.tick(6.5 * WINDOW)  # it and a window without a call closed
    assert s.level == pytest.approx(4 * STEP - (1 + 1) * STEP / 2)
    s.tick(100 * WINDOW)
    assert s.level == 0


def test_windows_without_calls_lower_the_level() -> None:
    s = shedder_after([OVER] * 4)  # level 4 steps; the fifth window began with a calm call
    s.observe(0.001, 7.5 * WINDOW)  # 2 windows passed without a call
    assert s.level == pytest.approx(4 * STEP - (1 + 2) * STEP / 2)


def test_a_partial_share_refuses_that_share_of_requests() -> None:
    s = shedder_after([OVER] * 2)  # batch share 0.6
    refused = sum(s.refuses(Priority.BATCH) for _ in range(4000))
    assert 0.55 < refused / 4000 < 0.65
    assert not any(s.refuses(Priority.STANDARD) for _ in range(1000))


def test_a_zero_target_never_sheds() -> None:
    s = AdmitShedder(0.0, WINDOW)
    for k in range(100):
        s.observe(10.0, k * WINDOW)
    assert s.level == 0
    assert not s.refuses(Priority.BATCH)


async def test_a_process_behind_on_its_calls_refuses_admits_with_busy_and_a_retry_after() -> None:
    cfg = settings(n=2, cap=4)
    core, clock = await ready_on_manual_clock(cfg)

    def windows(n: int, sojourn_s: float) -> None:
        for _ in range(n):
            for _ in range(MIN_SAMPLES):
                core.observe_sojourn(sojourn_s)
            clock.t += cfg.shed_window_s

    # A second of standing queue, then four more windows: every batch request refused,
    # interactive ones not.
    windows(round(cfg.shed_after_s / cfg.shed_window_s) + 4, 0.5)
    with pytest.raises(Busy) as info:
        await core.admit(req("b", Priority.BATCH), 1.0)
    assert info.value.reason is Reason.BUSY
    assert info.value.retry_after_s == cfg.shed_retry_after_s
    assert core.queue_depth == 0  # refused before any work: nothing queued or leased
    assert all(st.in_flight == 0 for st in core.replicas())
    lease = await core.admit(req("i", Priority.INTERACTIVE), 1.0)
    core.complete(lease.lease_id, Outcome.SUCCESS)
    windows(10, 0.5)  # further behind: every class refused
    with pytest.raises(Busy):
        await core.admit(req("i2", Priority.INTERACTIVE), 1.0)
    clock.t += 100 * cfg.shed_window_s  # no Admit since: the health round's upkeep lowers it
    await core.probe_once()
    lease = await core.admit(req("b2", Priority.BATCH), 1.0)
    core.complete(lease.lease_id, Outcome.SUCCESS)
