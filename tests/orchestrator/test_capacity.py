"""Capacity-aware admission decisions (services/orchestrator/capacity.py), table-driven, and the
director applying them on an injected clock: refusals carry a retry-after from the drain rate,
lower classes are shed first, work that would miss its deadline is refused at once."""

from __future__ import annotations

import asyncio

import pytest

from llmmesh.common.engine_metrics import EngineSample
from services.orchestrator import capacity
from services.orchestrator.capacity import (
    Decision,
    Occupancy,
    Outlook,
    QueueLimits,
    Verdict,
    decide,
)
from services.orchestrator.director import Orchestrator
from services.orchestrator.domain import Outcome, Priority
from services.orchestrator.errors import QueueFull
from tests.helpers import ManualClock
from tests.orchestrator.test_core import FakeProbe, assert_queued, req, settings

IN, S, B = Priority.INTERACTIVE, Priority.STANDARD, Priority.BATCH
LIMITS = QueueLimits(interactive=8, standard=4, batch=2)


def q(i: int = 0, s: int = 0, b: int = 0) -> dict[Priority, int]:
    return {IN: i, S: s, B: b}


@pytest.mark.parametrize(
    ("priority", "queued", "rate", "deadline_s", "expected"),
    [
        # room in the class's limit, rate unknown: enqueue (no wait estimate)
        (S, q(), None, 1.0, Decision(Verdict.ENQUEUE)),
        (B, q(b=1), None, 1.0, Decision(Verdict.ENQUEUE)),
        # batch limit (2) reached: refused, unknown rate -> the default retry-after
        (B, q(b=2), None, 30.0, Decision(Verdict.QUEUE_FULL, 1.0)),
        # standard limit (4) reached by standard waiters: nothing lower to shed -> refused;
        # retry-after = (4 ahead + itself) / 10 per s
        (S, q(s=4), 10.0, 30.0, Decision(Verdict.QUEUE_FULL, 0.5, None, 0.5)),
        # standard at its limit with a batch waiter: the newest batch waiter is shed
        (S, q(s=3, b=1), 10.0, 30.0, Decision(Verdict.EVICT_AND_ENQUEUE, None, B, 0.4)),
        # interactive with a full queue sheds the lowest class present: batch before standard
        (IN, q(i=2, s=4, b=2), 10.0, 30.0, Decision(Verdict.EVICT_AND_ENQUEUE, None, B, 0.3)),
        (IN, q(i=4, s=4), 10.0, 30.0, Decision(Verdict.EVICT_AND_ENQUEUE, None, S, 0.5)),
        # interactive with a full queue of interactive waiters: refused
        (IN, q(i=8), 10.0, 30.0, Decision(Verdict.QUEUE_FULL, 0.9, None, 0.9)),
        # above the standard limit (interactive filled it): a standard arrival still takes a
        # batch waiter's place (the queue does not grow), and is refused with none left
        (S, q(i=5, b=1), 10.0, 30.0, Decision(Verdict.EVICT_AND_ENQUEUE, None, B, 0.6)),
        (S, q(i=5, s=1), 10.0, 30.0, Decision(Verdict.QUEUE_FULL, 0.7, None, 0.7)),
        # expected first token (3 ahead + itself at 2/s = 2 s) beyond 85% of a 2 s deadline:
        # refused at once; retry-after = time for that line to drain = 2 s
        (S, q(s=3), 2.0, 2.0, Decision(Verdict.DEADLINE, 2.0, None, 2.0)),
        # the same wait within 85% of a 5 s deadline: enqueued
        (S, q(s=3), 2.0, 5.0, Decision(Verdict.ENQUEUE, None, None, 2.0)),
        # a wait within the deadline but in its headroom (2 s of 2.2 s): refused
        (S, q(s=3), 2.0, 2.2, Decision(Verdict.DEADLINE, 2.0, None, 2.0)),
        # batch waiters are behind an interactive arrival: they do not count in its wait
        (IN, q(s=3, b=2), 2.0, 1.0, Decision(Verdict.ENQUEUE, None, None, 0.5)),
    ],
)
def test_admission_decisions(
    priority: Priority,
    queued: dict[Priority, int],
    rate: float | None,
    deadline_s: float,
    expected: Decision,
) -> None:
    assert decide(priority, queued, LIMITS, Outlook(rate), deadline_s) == expected


@pytest.mark.parametrize(
    ("outlook", "deadline_s", "expected"),
    [
        # 1 waiter ahead, itself and 4 leases waiting in the engines, at 4/s: first token
        # in 1.5 s, within 85% of 2 s
        (Outlook(4.0, backlog=4), 2.0, Decision(Verdict.ENQUEUE, None, None, 1.5)),
        # the same line plus 0.25 s of predicted prefill: 1.75 s > 1.7 s -> refused; retry
        # after the line of 6 drained at 4/s
        (
            Outlook(4.0, backlog=4, prefill_s=0.25),
            2.0,
            Decision(Verdict.DEADLINE, 1.5, None, 1.75),
        ),
        # an engine backlog alone can exceed the deadline: 12 / 4 per s = 3 s
        (Outlook(4.0, backlog=10), 2.0, Decision(Verdict.DEADLINE, 3.0, None, 3.0)),
    ],
)
def test_the_time_to_first_token_counts_engine_backlog_and_prefill(
    outlook: Outlook, deadline_s: float, expected: Decision
) -> None:
    assert decide(S, q(s=1), LIMITS, outlook, deadline_s) == expected


def test_a_full_queue_retry_after_counts_the_engine_backlog() -> None:
    # 4 standard waiters ahead + itself + 10 waiting in the engines, at 5/s
    decision = decide(S, q(s=4), LIMITS, Outlook(5.0, backlog=10), 30.0)
    assert decision == Decision(Verdict.QUEUE_FULL, 3.0, None, 3.0)


@pytest.mark.parametrize(
    ("replicas", "service_s", "expected"),
    [
        # not saturated: slots over the lease duration
        ([Occupancy(8, 3), Occupancy(8, 0)], 3.2, Outlook(5.0, 0, 0.0)),
        # saturated at 11 leases on 8 slots: each lease's duration includes its wait in the
        # engine, so the drain rate is the leases over it (22 / 5.5 s), not 16 / 5.5 s; the
        # prefill backlog is the soonest replica's
        (
            [Occupancy(8, 11, 0.25), Occupancy(8, 11, 0.125)],
            5.5,
            Outlook(4.0, 6, 0.125),
        ),
        ([Occupancy(8, 11)], None, Outlook(None, 3, 0.0)),  # no lease completed yet
        ([], 1.0, Outlook(None, 0, 0.0)),  # no routable replica
    ],
)
def test_outlook_of_the_routable_replicas(
    replicas: list[Occupancy], service_s: float | None, expected: Outlook
) -> None:
    assert Outlook.of(replicas, service_s) == expected


@pytest.mark.parametrize(
    ("sample", "expected"),
    [
        (None, 64),  # nothing reported: the configured slots
        (EngineSample(0, 0, 0, 1000, max_batch=8), 8),  # the engine's batch capacity
        # 4 active sequences hold 400 of 1000 blocks: 10 such sequences fit, batch allows 32
        (EngineSample(4, 0, 400, 1000, max_batch=32), 10),
        (EngineSample(1, 0, 5000, 1000, max_batch=32), 1),  # never below one slot
    ],
)
def test_engine_slots(sample: EngineSample | None, expected: int) -> None:
    assert capacity.engine_slots(64, sample) == expected


@pytest.mark.parametrize(
    ("unique_share", "expected"),
    [
        (1.0, 10),  # nothing shared: 4 + 600 free / 100 per sequence
        # a quarter of each sequence is its own (the rest a cached prefix every one shares):
        # a further sequence needs 25 blocks, 24 more fit
        (0.25, 28),
        (0.01, 32),  # the batch bounds it
    ],
)
def test_engine_slots_count_only_the_blocks_a_further_sequence_needs(
    unique_share: float, expected: int
) -> None:
    sample = EngineSample(4, 0, 400, 1000, max_batch=32)
    assert capacity.engine_slots(64, sample, unique_share) == expected


@pytest.mark.parametrize(
    ("ending", "expected"),
    [
        (None, 96),  # unknown service time: the overcommit maximum, 64 * 1.5
        (16, 80),  # 16 leases end within start_soon_s: 16 ahead
        (64, 96),  # more: capped at the overcommit maximum
        (0, 64),  # none: the slots
    ],
)
def test_replica_cap(ending: int | None, expected: int) -> None:
    assert capacity.replica_cap(64, 1.5, ending) == expected


def test_replica_cap_is_at_least_one() -> None:
    assert capacity.replica_cap(0, 1.5, 0) == 1


@pytest.mark.parametrize(
    ("now", "service_s", "expected"),
    [
        (10.0, None, None),  # no lease completed yet: unknown
        (10.0, 0.0, None),
        # grants at 0, 2, 4, 6, 8; a 5 s service ends them at 5..13: by 11, those of 0..6
        (10.0, 5.0, 4),
        (0.0, 5.0, 0),  # none is within 1 s of its end
        (100.0, 5.0, 5),  # overdue ones count
    ],
)
def test_ending_soon(now: float, service_s: float | None, expected: int | None) -> None:
    assert capacity.ending_soon([0.0, 2.0, 4.0, 6.0, 8.0], now, 1.0, service_s) == expected


def test_retry_after_is_bounded() -> None:
    assert capacity.retry_after_s(10, None) == capacity.RETRY_AFTER_UNKNOWN_S
    assert capacity.retry_after_s(0, 100.0) == capacity.RETRY_AFTER_MIN_S
    assert capacity.retry_after_s(10**6, 1.0) == capacity.RETRY_AFTER_MAX_S
    assert capacity.retry_after_s(10, 4.0) == 2.5


def test_queue_limits_fall_with_priority() -> None:
    limits = QueueLimits.of(1024, 0.5, 0.25)
    assert (limits.interactive, limits.standard, limits.batch) == (1024, 512, 256)
    assert QueueLimits.of(10, 0.1, 0.9).batch == 1  # batch never above standard


async def _full_core(clock: ManualClock, max_queue: int) -> Orchestrator:
    """One replica with one slot, taken; the service time learned as 1 s (drain 1/s)."""
    cfg = settings(n=1, cap=1, queue=max_queue)
    cfg.queue_share_standard = 0.5
    cfg.queue_share_batch = 0.25
    probe = FakeProbe()
    core = Orchestrator(cfg, probe, clock=clock)
    probe.ready_ids = {"r0"}
    await core.probe_once()
    first = await core.admit(req("warm"), 1.0)
    clock.t += 1.0
    core.complete(first.lease_id, Outcome.SUCCESS)
    await core.admit(req("busy"), 1.0)
    return core


async def test_shedding_order_batch_then_standard_interactive_kept() -> None:
    clock = ManualClock(500.0)
    core = await _full_core(clock, max_queue=8)
    tasks = {
        rid: asyncio.create_task(core.admit(req(rid, prio), 60.0))
        for rid, prio in (("b1", B), ("b2", B), ("s1", S), ("s2", S))
    }
    await assert_queued(core, 4)
    # batch limit 2 reached: a third batch request is refused with a retry-after
    with pytest.raises(QueueFull) as refused:
        await core.admit(req("b3", B), 60.0)
    assert refused.value.retry_after_s is not None
    assert refused.value.retry_after_s > 0
    # interactive arrivals fill the queue's room, then shed the newest batch waiter, the other
    # batch waiter, then the newest standard one
    for i in range(4):
        tasks[f"i{i}"] = asyncio.create_task(core.admit(req(f"i{i}", IN), 60.0))
    await assert_queued(core, 8)
    shed: list[str] = []
    for i in range(4, 7):
        tasks[f"i{i}"] = asyncio.create_task(core.admit(req(f"i{i}", IN), 60.0))
        for _ in range(4):  # the arrival decides; the shed waiter's task sees its exception
            await asyncio.sleep(0)
        shed += [rid for rid, t in tasks.items() if t.done() and rid not in shed]
    assert shed == ["b2", "b1", "s2"]
    for rid in shed:
        err = tasks[rid].exception()
        assert isinstance(err, QueueFull)
        assert err.retry_after_s is not None
    assert core.queue_depth == 8
    for t in tasks.values():
        t.cancel()
    await asyncio.gather(*tasks.values(), return_exceptions=True)


async def test_work_that_would_miss_its_deadline_is_refused_at_once() -> None:
    clock = ManualClock(500.0)
    core = await _full_core(clock, max_queue=64)
    assert core.drain_rate() == 1.0  # one slot, 1 s per request
    waiting = [asyncio.create_task(core.admit(req(f"w{i}"), 60.0)) for i in range(3)]
    await assert_queued(core, 3)
    # 3 ahead + itself at 1/s: first token in 4 s expected, 85% of the deadline is 1.7 s
    with pytest.raises(QueueFull, match="of the admission deadline") as refused:
        await core.admit(req("late"), 2.0)
    assert refused.value.retry_after_s == 4.0  # the line of 4 at 1/s
    assert core.queue_depth == 3
    for t in waiting:
        t.cancel()
    await asyncio.gather(*waiting, return_exceptions=True)


async def test_a_waiter_the_queue_cannot_reach_in_time_is_refused_before_its_deadline() -> None:
    clock = ManualClock(500.0)
    core = await _full_core(clock, max_queue=64)  # drain 1/s
    patient = [asyncio.create_task(core.admit(req(f"p{i}"), 60.0)) for i in range(2)]
    await assert_queued(core, 2)
    hurried = asyncio.create_task(core.admit(req("h"), 10.0))  # 3 s expected: admitted
    await assert_queued(core, 3)
    # nothing completed for 6 s: the third place's first token is now expected at 9 s of its
    # 10 s deadline, beyond the 8.5 s an arrival may take
    clock.t += 6.0
    await core.scrape_once()  # any dispatch re-checks the queue
    with pytest.raises(QueueFull, match="of the admission deadline") as refused:
        await hurried
    assert refused.value.retry_after_s == 3.0
    assert core.queue_depth == 2  # the patient ones wait on
    for t in patient:
        t.cancel()
    await asyncio.gather(*patient, return_exceptions=True)


@pytest.mark.parametrize(
    ("first_token_at", "expected"),
    [(108.5, True), (108.6, False), (100.0, True)],  # budget 100 -> 110: 85% ends at 108.5
)
def test_within_share_of_the_budget_from_arrival(first_token_at: float, expected: bool) -> None:
    assert capacity.within_share(first_token_at, 100.0, 110.0) is expected
