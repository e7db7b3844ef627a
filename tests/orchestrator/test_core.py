from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence

import pytest

from llmmesh.common.engine_metrics import EngineSample
from services.orchestrator.director import Orchestrator
from services.orchestrator.domain import AdmissionRequest, Clock, Lease, Outcome, Priority
from services.orchestrator.errors import BadAdmission, NoReplicaReady, QueueFull, QueueTimeout
from services.orchestrator.policy import (
    AdmissionPolicy,
    CapacityPolicy,
    HealthPolicy,
    Policy,
    PoolPolicy,
)
from services.orchestrator.prefix import PrefixIndex, PrefixMatches
from services.orchestrator.replicas import ReplicaState
from services.orchestrator.scheduling.config import PluginConfig
from services.orchestrator.scheduling.contracts import ReplicaView, RequestView
from services.orchestrator.scheduling.framework import Decision
from services.orchestrator.settings import OrchestratorSettings, ReplicaSpec
from tests.helpers import ManualClock
from tests.orchestrator.conftest import FixedPrefix


class FakeProbe:
    def __init__(self) -> None:
        self.ready_ids: set[str] = set()

    async def ready(self, replica: ReplicaSpec, models: Sequence[str], timeout_s: float) -> bool:
        return replica.id in self.ready_ids


def settings(n: int = 2, cap: int = 2, queue: int = 4) -> OrchestratorSettings:
    return OrchestratorSettings(
        replicas=[ReplicaSpec(id=f"r{i}", grpc_address=f"127.0.0.1:{9000 + i}") for i in range(n)],
        max_in_flight_per_replica=cap,
        max_queue=queue,
    )


def req(
    rid: str = "x",
    priority: Priority = Priority.STANDARD,
    model: str = "tensorrt_llm",
    prompt_len: int = 3,
    version: str = "",
) -> AdmissionRequest:
    return AdmissionRequest(
        request_id=rid,
        model=model,
        prompt_token_ids=list(range(prompt_len)),
        max_tokens=4,
        priority=priority,
        model_version=version,
    )


async def assert_queued(core: Orchestrator, depth: int) -> None:
    """One loop tick lets freshly created admit tasks reach the queue."""
    await asyncio.sleep(0)
    assert core.queue_depth == depth


async def queue_each(
    core: Orchestrator,
    index: FixedPrefix,
    requests: Sequence[tuple[AdmissionRequest, dict[str, int]]],
) -> dict[str, asyncio.Task[Lease]]:
    """Admit each request in turn, its prompt's blocks held where given (of 250), each one
    reaching the queue (or its lease) before the next is sent; by request id."""
    tasks: dict[str, asyncio.Task[Lease]] = {}
    for r, cached in requests:
        index.matches = PrefixMatches(250, cached)
        tasks[r.request_id] = asyncio.create_task(core.admit(r, 10.0))
        await asyncio.sleep(0)
    return tasks


async def cancel_all(tasks: Iterable[asyncio.Task[Lease]]) -> None:
    pending = list(tasks)
    for t in pending:
        t.cancel()
    await asyncio.gather(*pending, return_exceptions=True)


def state(core: Orchestrator, rid: str) -> ReplicaState:
    return next(s for s in core.replicas() if s.spec.id == rid)


def count_decisions(core: Orchestrator) -> list[str]:
    """From now on, each of `core`'s scheduling decisions appends its request's model here
    (`Scheduler.choose`, which every decision ends in)."""
    made: list[str] = []
    choose = core._scheduler.choose

    def counted(request: RequestView, eligible: Sequence[ReplicaView]) -> Decision:
        made.append(request.model)
        return choose(request, eligible)

    core._scheduler.choose = counted  # type: ignore[method-assign]
    return made


async def assert_one_decision(core: Orchestrator, event: Callable[[], Awaitable[object]]) -> None:
    """`event`'s pass over the queue makes one scheduling decision and grants no waiter."""
    depth = core.queue_depth
    decisions = count_decisions(core)
    await event()
    assert len(decisions) == 1
    assert core.queue_depth == depth


async def ready_core(
    n: int = 2,
    cap: int = 2,
    queue: int = 4,
    policy: Policy | None = None,
    prefix: PrefixIndex | None = None,
    specs: list[ReplicaSpec] | None = None,
    clock: Clock = time.monotonic,
) -> tuple[Orchestrator, FakeProbe]:
    probe = FakeProbe()
    s = settings(n, cap, queue)
    if specs is not None:
        s.replicas = specs
    core = Orchestrator(s, probe, policy, prefix, clock=clock)
    probe.ready_ids = {r.id for r in s.replicas}
    await core.probe_once()
    return core, probe


async def test_no_ready_replica_is_unavailable() -> None:
    """With a retry-after of one health round (an HTTP client's 503 gets Retry-After)."""
    s = settings()
    core = Orchestrator(s, FakeProbe())
    await core.probe_once()
    with pytest.raises(NoReplicaReady) as info:
        await core.admit(req(), 1.0)
    assert info.value.retry_after_s == s.health_interval_s


async def test_waiting_for_the_first_health_round_keeps_the_calls_deadline() -> None:
    """A just-started orchestrator waits for its first health round (up to `health_timeout_s`)
    before refusing a request no replica serves yet, but not past the request's own deadline:
    a lease granted after it would reach no one."""
    started = asyncio.Event()

    class SlowProbe(FakeProbe):
        async def ready(
            self, replica: ReplicaSpec, models: Sequence[str], timeout_s: float
        ) -> bool:
            started.set()
            await asyncio.Event().wait()  # a round that has not ended
            return True

    s = settings().model_copy(update={"health_timeout_s": 30.0})
    core = Orchestrator(s, SlowProbe())
    round_ = asyncio.create_task(core.probe_once())
    await started.wait()
    begun = time.monotonic()
    with pytest.raises(QueueTimeout):
        await core.admit(req(), 0.05)
    assert time.monotonic() - begun < s.health_timeout_s / 2  # not the whole round's wait
    round_.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await round_


@pytest.mark.parametrize(
    ("field", "request_"),
    [
        ("model", AdmissionRequest("x", "", [1], 4)),
        ("max_tokens", AdmissionRequest("x", "tensorrt_llm", [1], 0)),
    ],
)
async def test_bad_admission(field: str, request_: AdmissionRequest) -> None:
    core, _ = await ready_core()
    with pytest.raises(BadAdmission, match=field):
        await core.admit(request_, 1.0)


async def test_least_outstanding_spreads_load() -> None:
    core, _ = await ready_core(n=2, cap=4)
    leases = [await core.admit(req(str(i)), 1.0) for i in range(4)]
    assert sorted(lease.replica.id for lease in leases) == ["r0", "r0", "r1", "r1"]
    assert {st.spec.id: st.in_flight for st in core.replicas()} == {"r0": 2, "r1": 2}


async def test_complete_releases_and_is_idempotent() -> None:
    core, _ = await ready_core(n=1)
    lease = await core.admit(req(), 1.0)
    assert core.complete(lease.lease_id, Outcome.SUCCESS)
    assert not core.complete(lease.lease_id, Outcome.SUCCESS)
    assert core.replicas()[0].in_flight == 0


async def test_queue_waits_for_a_slot_then_grants() -> None:
    core, _ = await ready_core(n=1, cap=1)
    first = await core.admit(req("a"), 1.0)
    waiting = asyncio.create_task(core.admit(req("b"), 5.0))
    await assert_queued(core, 1)
    assert not waiting.done()
    core.complete(first.lease_id, Outcome.SUCCESS)
    second = await waiting
    assert second.replica.id == "r0"
    assert core.replicas()[0].in_flight == 1


async def test_priority_order_in_queue() -> None:
    core, _ = await ready_core(n=1, cap=1)
    first = await core.admit(req("a"), 1.0)
    batch = asyncio.create_task(core.admit(req("batch", Priority.BATCH), 5.0))
    await assert_queued(core, 1)
    interactive = asyncio.create_task(core.admit(req("int", Priority.INTERACTIVE), 5.0))
    await assert_queued(core, 2)
    core.complete(first.lease_id, Outcome.SUCCESS)
    granted = await interactive
    assert not batch.done()
    core.complete(granted.lease_id, Outcome.SUCCESS)
    await batch


async def test_queue_full_gives_retry_after() -> None:
    core, _ = await ready_core(n=1, cap=1, queue=1)
    await core.admit(req("a"), 1.0)
    queued = asyncio.create_task(core.admit(req("b"), 5.0))
    await assert_queued(core, 1)
    with pytest.raises(QueueFull) as info:
        await core.admit(req("c"), 1.0)
    assert info.value.retry_after_s is not None
    assert info.value.retry_after_s > 0
    queued.cancel()


async def test_queue_timeout_and_cancellation_leave_queue() -> None:
    core, _ = await ready_core(n=1, cap=1)
    await core.admit(req("a"), 1.0)
    with pytest.raises(QueueTimeout):
        await core.admit(req("b"), 0.01)
    assert core.queue_depth == 0
    task = asyncio.create_task(core.admit(req("c"), 5.0))
    await assert_queued(core, 1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert core.queue_depth == 0


def probes_counted(probe: FakeProbe) -> list[str]:
    """The ids of the replicas `probe` is asked about from now on, in order."""
    probed: list[str] = []
    ready = probe.ready

    async def counting(replica: ReplicaSpec, models: Sequence[str], timeout_s: float) -> bool:
        probed.append(replica.id)
        return await ready(replica, models, timeout_s)

    probe.ready = counting  # type: ignore[method-assign]
    return probed


async def test_a_replica_serving_requests_is_probed_at_least_every_few_rounds() -> None:
    core, probe = await ready_core(n=1, cap=4)
    rounds = core._settings.health_passive_rounds
    probed = probes_counted(probe)

    async def round_with(success: bool) -> bool:
        """One health round after a request ended so; whether it probed the replica."""
        lease = await core.admit(req(), 1.0)
        core.complete(lease.lease_id, Outcome.SUCCESS if success else Outcome.CANCELLED)
        before = len(probed)
        await core.probe_once()
        return len(probed) > before

    # Serving: unprobed `rounds` rounds in a row, then probed; then unprobed again.
    assert [await round_with(True) for _ in range(rounds + 2)] == [False] * rounds + [True, False]
    assert await round_with(False)  # nothing succeeded since the last round: probed
    probe.ready_ids = set()
    core.complete((await core.admit(req(), 1.0)).lease_id, Outcome.REPLICA_ERROR)
    await core.probe_once()
    assert not core.replicas()[0].ready  # a failed request has it probed (now, and each round)


async def test_a_replica_listed_again_by_every_discovery_round_keeps_its_passive_rounds() -> None:
    core, probe = await ready_core(n=1, cap=4)
    spec = core.replicas()[0].spec
    rounds = core._settings.health_passive_rounds
    probed = probes_counted(probe)

    async def served_then_listed() -> bool:
        """A request succeeded, discovery lists the replica again unchanged, a health round:
        whether the round probed it."""
        core.complete((await core.admit(req(), 1.0)).lease_id, Outcome.SUCCESS)
        core.sync_replicas([spec])
        before = len(probed)
        await core.probe_once()
        return len(probed) > before

    assert [await served_then_listed() for _ in range(rounds + 1)] == [False] * rounds + [True]


async def test_a_replica_back_in_the_set_is_probed_at_the_next_round() -> None:
    core, probe = await ready_core(n=1, cap=2)
    spec = core.replicas()[0].spec
    lease = await core.admit(req(), 1.0)
    core.sync_replicas([])  # it leaves the set, its lease still running...
    core.sync_replicas([spec])  # ...and comes back (unready, say)...
    core.complete(lease.lease_id, Outcome.SUCCESS)  # ...while that old lease succeeds
    probe.ready_ids = set()
    await core.probe_once()
    assert not core.replicas()[0].ready


async def test_an_expired_deadline_is_refused_not_granted() -> None:
    core, _ = await ready_core(n=1)
    with pytest.raises(QueueTimeout, match="deadline passed"):
        await core.admit(req("late"), 0.0)
    assert core.replicas()[0].in_flight == 0


async def test_a_request_queued_for_one_version_does_not_hold_up_another() -> None:
    specs = [
        ReplicaSpec(id="v1", grpc_address="a:1", model_version="v1"),
        ReplicaSpec(id="v2", grpc_address="a:2", model_version="v2"),
    ]
    core, _ = await ready_core(specs=specs, cap=1)
    await core.admit(req("a", version="v1"), 1.0)
    queued = asyncio.create_task(core.admit(req("b", version="v1"), 5.0))
    await assert_queued(core, 1)
    # v2's replica is idle: granted now, not at the next completion or health round.
    lease = await asyncio.wait_for(core.admit(req("c", version="v2"), 5.0), 1.0)
    assert lease.replica.id == "v2"
    assert not queued.done()
    queued.cancel()


async def test_a_full_queue_of_another_version_does_not_refuse_a_request_with_room() -> None:
    specs = [
        ReplicaSpec(id="v1", grpc_address="a:1", model_version="v1"),
        ReplicaSpec(id="v2", grpc_address="a:2", model_version="v2"),
    ]
    core, _ = await ready_core(specs=specs, cap=1, queue=1)
    await core.admit(req("a", version="v1"), 1.0)
    queued = asyncio.create_task(core.admit(req("b", version="v1"), 5.0))
    await assert_queued(core, 1)  # the queue is full
    lease = await core.admit(req("c", version="v2"), 5.0)
    assert lease.replica.id == "v2"
    queued.cancel()


async def test_a_free_replica_no_waiter_can_use_goes_to_a_new_request() -> None:
    core, _ = await ready_core(n=2, cap=1)
    first = await core.admit(req("a"), 1.0)
    second = await core.admit(req("b"), 1.0)
    free = second.replica.id
    waiter = dataclasses.replace(req("w"), exclude_replicas=frozenset({free}))
    queued = asyncio.create_task(core.admit(waiter, 5.0))  # waits for the other replica
    await assert_queued(core, 1)
    core.complete(second.lease_id, Outcome.SUCCESS)  # frees the one replica it excludes
    await assert_queued(core, 1)
    lease = await asyncio.wait_for(core.admit(req("c"), 5.0), 1.0)
    assert lease.replica.id == free
    core.complete(first.lease_id, Outcome.SUCCESS)
    assert (await queued).replica.id == first.replica.id


def free_without_an_event(core: Orchestrator, lease: Lease) -> None:
    """The lease's slot frees without an event that dispatches (as time-driven caps do)."""
    core._leases.pop(lease.lease_id)
    core._replicas.release(lease.replica.id, lease.granted_at, core._clock())


async def test_a_new_request_does_not_take_a_replica_a_waiter_can_use() -> None:
    core, _ = await ready_core(n=1, cap=1)
    first = await core.admit(req("a"), 1.0)
    queued = asyncio.create_task(core.admit(req("w"), 5.0))
    await assert_queued(core, 1)
    st = core.replicas()[0]
    free_without_an_event(core, first)
    later = asyncio.create_task(core.admit(req("c"), 5.0))
    await assert_queued(core, 2)  # c waits in line behind it, the replica untaken
    assert st.in_flight == 0
    core._dispatch()  # the next event: w, first in line, takes it
    assert (await queued).replica.id == st.spec.id
    assert not later.done()
    later.cancel()


async def test_a_request_that_sorts_first_still_waits_for_room_a_waiter_can_use() -> None:
    # A batch request waits; room frees with no event; an interactive request arrives. The
    # waiter could use the room, so the arrival queues too; at the next event's pass it
    # leaves first in service order: the interactive request takes the room.
    core, _ = await ready_core(n=1, cap=1)
    first = await core.admit(req("a"), 1.0)
    low = asyncio.create_task(core.admit(req("low", Priority.BATCH), 5.0))
    await assert_queued(core, 1)
    free_without_an_event(core, first)
    high = asyncio.create_task(core.admit(req("high", Priority.INTERACTIVE), 5.0))
    await assert_queued(core, 2)
    core._dispatch()
    assert (await high).replica.id == "r0"
    assert not low.done()
    await cancel_all([low])


async def test_a_decision_that_raises_in_a_pass_leaves_the_waiters_queued() -> None:
    core, _ = await ready_core(n=1, cap=2, queue=16)
    held = [await core.admit(req(f"h{i}"), 1.0) for i in range(2)]
    waiters = [asyncio.create_task(core.admit(req(f"w{i}"), 5.0)) for i in range(3)]
    await assert_queued(core, 3)
    for lease in held:
        free_without_an_event(core, lease)
    decide = core._scheduler.decide
    made: list[str] = []

    def failing(request: RequestView, replicas: Sequence[ReplicaView]) -> Decision:
        made.append(request.model)
        if len(made) == 2:  # w1's, after w0's
            raise RuntimeError("a plugin's bug")
        return decide(request, replicas)

    core._scheduler.decide = failing  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="plugin"):
        core._dispatch()
    core._scheduler.decide = decide  # type: ignore[method-assign]
    assert (await waiters[0]).replica.id == "r0"
    assert core.queue_depth == 2  # w1 and w2 are still queued, and served at the next event
    core._dispatch()
    assert (await waiters[1]).replica.id == "r0"
    await cancel_all(waiters[2:])


class _SlowLookup(FixedPrefix):
    """A lookup that takes `took_s` of the core's clock."""

    def __init__(self, clock: list[float], took_s: float) -> None:
        super().__init__(PrefixMatches(0, {}))
        self._clock, self._took_s = clock, took_s

    async def lookup(self, *args: object, **kwargs: object) -> PrefixMatches:
        self._clock[0] += self._took_s
        return self.matches


async def test_a_deadline_spent_before_queueing_is_a_queue_timeout() -> None:
    now = [1000.0]
    core, _ = await ready_core(n=1, cap=1, prefix=_SlowLookup(now, 2.0), clock=lambda: now[0])
    await core.admit(req("a"), 5.0)  # the one slot
    with pytest.raises(QueueTimeout, match="during its admission"):
        await core.admit(req("b"), 1.0)  # its lookup took 2 s of its 1 s
    assert core.queue_depth == 0


async def test_a_cancel_in_the_tick_of_the_grant_releases_the_lease() -> None:
    core, _ = await ready_core(n=1, cap=1)
    first = await core.admit(req("a"), 1.0)
    waiting = asyncio.create_task(core.admit(req("b"), 5.0))
    await assert_queued(core, 1)
    core.complete(first.lease_id, Outcome.SUCCESS)  # grants "b" (its future resolves)...
    waiting.cancel()  # ...and its caller goes away in the same tick
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert core.replicas()[0].in_flight == 0


async def test_complete_many_releases_every_lease_and_grants_the_waiters() -> None:
    core, _ = await ready_core(n=1, cap=2)
    leases = [await core.admit(req(str(i)), 1.0) for i in range(2)]
    waiting = [asyncio.create_task(core.admit(req(f"w{i}"), 5.0)) for i in range(2)]
    await assert_queued(core, 2)
    core.complete_many(
        [(lease.lease_id, Outcome.SUCCESS, None) for lease in leases]
        + [("unknown", Outcome.SUCCESS, None)]
    )
    granted = await asyncio.gather(*waiting)
    assert [g.replica.id for g in granted] == ["r0", "r0"]
    assert core.replicas()[0].in_flight == 2


@pytest.mark.parametrize(
    ("errors", "threshold", "ejected"),
    [
        (1, 3, False),
        (2, 3, False),
        (3, 3, True),
        (1, 1, True),
    ],
)
async def test_consecutive_replica_errors_eject(errors: int, threshold: int, ejected: bool) -> None:
    policy = Policy(health=HealthPolicy(consecutive_errors=threshold, base_ejection_seconds=60))
    core, _ = await ready_core(n=2, cap=8, policy=policy)
    bad = "r0"
    for _ in range(errors):
        lease = await core.admit(req(), 1.0)
        while lease.replica.id != bad:  # steer a lease onto r0
            core.complete(lease.lease_id, Outcome.SUCCESS)
            lease = await core.admit(req(), 1.0)
        core.complete(lease.lease_id, Outcome.REPLICA_ERROR)
    assert {st.spec.id: st.healthy(time.monotonic()) for st in core.replicas()}[bad] is (
        not ejected
    )
    if ejected:
        for i in range(3):
            assert (await core.admit(req(str(i)), 1.0)).replica.id != bad


async def test_success_resets_consecutive_errors() -> None:
    core, _ = await ready_core(n=1, cap=8, policy=Policy(health=HealthPolicy(consecutive_errors=2)))
    for outcome in (Outcome.REPLICA_ERROR, Outcome.SUCCESS, Outcome.REPLICA_ERROR):
        core.complete((await core.admit(req(), 1.0)).lease_id, outcome)
    assert core.replicas()[0].healthy(time.monotonic())


async def test_ejection_budget_keeps_half_the_pool() -> None:
    policy = Policy(health=HealthPolicy(consecutive_errors=1, max_ejection_percent=50))
    core, probe = await ready_core(n=2, cap=8, policy=policy)
    probe.ready_ids.clear()
    await core.probe_once()  # both fail their probe: only one may be ejected
    now = time.monotonic()
    assert sum(st.ejected(now) for st in core.replicas()) == 1


async def test_waiters_fail_when_last_replica_goes_down() -> None:
    core, probe = await ready_core(n=1, cap=1)
    await core.admit(req("a"), 1.0)
    waiting = asyncio.create_task(core.admit(req("b"), 5.0))
    await assert_queued(core, 1)
    probe.ready_ids.clear()
    await core.probe_once()
    with pytest.raises(NoReplicaReady):
        await waiting
    assert core.queue_depth == 0


async def test_unknown_model_is_unavailable() -> None:
    core, _ = await ready_core()
    with pytest.raises(NoReplicaReady):
        await core.admit(req(model="other"), 1.0)


async def test_sync_replicas_adds_and_drains_removed() -> None:
    core, probe = await ready_core(n=2, cap=4)
    lease = await core.admit(req(), 1.0)
    gone = lease.replica.id
    keep = next(st.spec for st in core.replicas() if st.spec.id != gone)
    new = ReplicaSpec(id="r9", grpc_address="127.0.0.1:9009")
    core.sync_replicas([keep, new])
    assert {st.spec.id for st in core.replicas()} == {keep.id, "r9"}
    probe.ready_ids.add("r9")
    await core.probe_once()
    for i in range(4):
        assert (await core.admit(req(str(i)), 1.0)).replica.id != gone
    # the removed replica's lease still completes cleanly
    assert core.complete(lease.lease_id, Outcome.SUCCESS)


@pytest.mark.parametrize(
    ("profile", "matched", "expected"),
    [
        ("prefix-only", {"r1": 4}, {"r1"}),
        ("default", {"r1": 4}, {"r1"}),
        ("default", {}, {"r0", "r1"}),
        ("round-robin", {"r1": 4}, {"r0"}),  # ignores the prefix: first in id order
    ],
)
async def test_profiles_route_by_prefix(
    profile: str, matched: dict[str, int], expected: set[str]
) -> None:
    probe = FakeProbe()
    s = settings(n=2, cap=8)
    s.profile = profile
    core = Orchestrator(s, probe, Policy(), FixedPrefix(PrefixMatches(4, matched)))
    probe.ready_ids = {"r0", "r1"}
    await core.probe_once()
    assert (await core.admit(req("probe"), 1.0)).replica.id in expected


async def test_hot_spot_guard_spreads_a_shared_prefix() -> None:
    """Every request shares a 2048-token prefix cached on r1: the default profile prefers r1
    while the prefill it saves outweighs r1's extra load, then stops piling onto it."""
    probe = FakeProbe()
    core = Orchestrator(
        settings(n=2, cap=64), probe, Policy(), FixedPrefix(PrefixMatches(64, {"r1": 64}))
    )
    probe.ready_ids = {"r0", "r1"}
    await core.probe_once()
    picks = [(await core.admit(req(str(i), prompt_len=2048), 1.0)).replica.id for i in range(40)]
    assert 0 < picks.count("r0") < picks.count("r1")


POOLS = Policy(
    pools={
        "short": PoolPolicy(max_prompt_tokens=100, max_in_flight_per_replica=2),
        "long": PoolPolicy(max_prompt_tokens=1000),
    }
)


def pool_replicas(short: Iterable[str], long: Iterable[str]) -> list[ReplicaSpec]:
    """Replicas of the short pool, then of the long one (ids as given, an address each)."""
    ids = [(rid, "short") for rid in short] + [(rid, "long") for rid in long]
    return [
        ReplicaSpec(id=rid, grpc_address=f"a:{i}", pool=pool)
        for i, (rid, pool) in enumerate(ids, 1)
    ]


POOL_SPECS = pool_replicas(["s0"], ["l0"])


@pytest.mark.parametrize(
    ("prompt_len", "expected"), [(10, "s0"), (100, "s0"), (101, "l0"), (1000, "l0")]
)
async def test_pools_by_prompt_length(prompt_len: int, expected: str) -> None:
    core, _ = await ready_core(policy=POOLS, specs=POOL_SPECS)
    assert (await core.admit(req(prompt_len=prompt_len), 1.0)).replica.id == expected


async def test_prompt_longer_than_every_pool_is_rejected() -> None:
    core, _ = await ready_core(policy=POOLS, specs=POOL_SPECS)
    with pytest.raises(BadAdmission, match="prompt_token_ids"):
        await core.admit(req(prompt_len=1001), 1.0)


NO_LENDING = Policy(
    pools=POOLS.pools,
    plugins=[PluginConfig(name="pool", type="pool-filter", params={"lend_below_utilization": 0})],
)


def backlogged_pools(
    short_tokens: int,
    *,
    short_cap: int | None = None,
    long_cap: int | None = None,
    lend_below: float | None = None,
    admission: AdmissionPolicy | None = None,
) -> Policy:
    """A short pool (prompts up to `short_tokens`) and a long one (100k), each replica at most
    `*_cap` leases, under a 0.01 s prefill backlog bound; `lend_below`: the pool filter's
    lending threshold (its default without)."""
    plugins = (
        []
        if lend_below is None
        else [
            PluginConfig(
                name="pool", type="pool-filter", params={"lend_below_utilization": lend_below}
            )
        ]
    )
    return Policy(
        pools={
            "short": PoolPolicy(
                max_prompt_tokens=short_tokens, max_in_flight_per_replica=short_cap
            ),
            "long": PoolPolicy(max_prompt_tokens=100000, max_in_flight_per_replica=long_cap),
        },
        plugins=plugins,
        capacity=CapacityPolicy(max_prefill_backlog_s=0.01),
        admission=admission or AdmissionPolicy(),
    )


async def pools_core(
    short: Iterable[str], long: Iterable[str], policy: Policy, queue: int
) -> tuple[Orchestrator, FixedPrefix, ManualClock]:
    """Ready replicas of the short and long pools (`pool_replicas`, 8 leases each) under
    `policy`, with a prefix index the test sets and a clock only the test moves."""
    clock = ManualClock()
    index = FixedPrefix(PrefixMatches(250, {}))
    specs = pool_replicas(short, long)
    core, _ = await ready_core(
        cap=8, queue=queue, specs=specs, prefix=index, policy=policy, clock=clock
    )
    return core, index, clock


@pytest.mark.parametrize(("policy", "third"), [(POOLS, "l0"), (NO_LENDING, None)])
async def test_full_short_pool_borrows_idle_long_pool_or_waits(
    policy: Policy, third: str | None
) -> None:
    core, _ = await ready_core(policy=policy, specs=POOL_SPECS, cap=8)
    assert [(await core.admit(req(str(i)), 1.0)).replica.id for i in range(2)] == ["s0", "s0"]
    if third is not None:  # the short pool is at its cap of 2 and the long pool idle: it lends
        assert (await core.admit(req("w"), 1.0)).replica.id == third
        return
    task = asyncio.create_task(core.admit(req("w"), 5.0))
    await assert_queued(core, 1)
    task.cancel()


async def test_short_prompt_goes_to_long_pool_when_short_pool_is_down() -> None:
    core, probe = await ready_core(policy=POOLS, specs=POOL_SPECS, cap=8)
    probe.ready_ids.discard("s0")
    await core.probe_once()
    assert (await core.admit(req("x"), 1.0)).replica.id == "l0"


async def test_waiters_for_a_full_pool_cost_one_decision_per_event_not_one_each() -> None:
    """Long requests queue for the full long pool while the short pool has room: each event
    (here a short lease's completion) decides once for their kind, not once per waiter, and
    they are still served in order once the long pool has room."""
    core, _ = await ready_core(policy=POOLS, specs=POOL_SPECS, cap=1, queue=64)
    held = await core.admit(req("held", prompt_len=500), 1.0)
    assert held.replica.id == "l0"
    # Each its own prompt length (the pools judge a kind by the pools it fits, not the length).
    waiters = [
        asyncio.create_task(core.admit(req(f"w{i}", prompt_len=500 + i), 30.0)) for i in range(30)
    ]
    await assert_queued(core, 30)
    short = await core.admit(req("short", prompt_len=10), 1.0)
    assert short.replica.id == "s0"  # granted now: no waiter could use the short pool

    async def complete_short() -> None:
        assert core.complete(short.lease_id, Outcome.SUCCESS)

    await assert_one_decision(core, complete_short)

    assert core.complete(held.lease_id, Outcome.SUCCESS)
    first = await waiters[0]
    assert first.replica.id == "l0"
    assert core.queue_depth == 29
    assert not any(t.done() for t in waiters[1:])
    for t in waiters[1:]:
        t.cancel()
    await asyncio.gather(*waiters[1:], return_exceptions=True)
    assert core.queue_depth == 0


async def test_model_version_filter() -> None:
    specs = [
        ReplicaSpec(id="v1", grpc_address="a:1", model_version="v1"),
        ReplicaSpec(id="v2", grpc_address="a:2", model_version="v2"),
    ]
    core, _ = await ready_core(specs=specs, cap=8)
    assert {(await core.admit(req(str(i), version="v2"), 1.0)).replica.id for i in range(3)} == {
        "v2"
    }
    with pytest.raises(NoReplicaReady, match="v3"):
        await core.admit(req(version="v3"), 1.0)


async def test_excluded_replicas_are_never_leased() -> None:
    core, _ = await ready_core(n=3, cap=8)
    avoid = dataclasses.replace(req(), exclude_replicas=frozenset({"r0", "r2"}))
    assert {(await core.admit(avoid, 1.0)).replica.id for _ in range(4)} == {"r1"}
    # Queued requests are granted only on a replica they do not exclude.
    core, _ = await ready_core(n=2, cap=1)
    held = await core.admit(req("held"), 1.0)
    other = "r1" if held.replica.id == "r0" else "r0"
    busy = await core.admit(req("busy"), 1.0)
    assert busy.replica.id == other
    waiting = asyncio.create_task(
        core.admit(
            dataclasses.replace(req("w"), exclude_replicas=frozenset({held.replica.id})), 5.0
        )
    )
    await assert_queued(core, 1)
    core.complete(held.lease_id, Outcome.SUCCESS)  # frees the excluded replica: still waits
    await assert_queued(core, 1)
    core.complete(busy.lease_id, Outcome.SUCCESS)
    assert (await waiting).replica.id == other


async def test_excluding_every_replica_is_unavailable_naming_them() -> None:
    core, _ = await ready_core(n=2)
    every = dataclasses.replace(req(), exclude_replicas=frozenset({"r0", "r1"}))
    with pytest.raises(NoReplicaReady, match="excluding r0, r1"):
        await core.admit(every, 1.0)


def tenant_req(rid: str, tenant: str, priority: Priority = Priority.STANDARD) -> AdmissionRequest:
    return AdmissionRequest(
        request_id=rid,
        model="tensorrt_llm",
        prompt_token_ids=[1] * 10,
        max_tokens=10,
        priority=priority,
        tenant=tenant,
    )


@pytest.mark.parametrize(
    ("weights", "expected"),
    [
        # equal weights: the late tenant b is served second, not after all of a's backlog
        ({}, ["a1", "b1", "a2", "b2", "a3", "a4"]),
        # b weighs 2 (finish tags b1=10, a1=b2=20, a2=40): b's requests cost half as much virtual time
        ({"b": 2.0}, ["b1", "a1", "b2", "a2", "a3", "a4"]),
    ],
)
async def test_weighted_fair_queuing_across_tenants(
    weights: dict[str, float], expected: list[str]
) -> None:
    policy = Policy(admission=AdmissionPolicy(tenant_weights=weights))
    core, _ = await ready_core(n=1, cap=1, policy=policy, queue=16)
    lease = await core.admit(tenant_req("hold", "z"), 1.0)
    waiting = {
        rid: asyncio.create_task(core.admit(tenant_req(rid, rid[0]), 5.0))
        for rid in expected_order_input()
    }
    await assert_queued(core, 6)
    order: list[str] = []
    for _ in range(6):
        core.complete(lease.lease_id, Outcome.SUCCESS)
        await asyncio.wait(waiting.values(), return_when=asyncio.FIRST_COMPLETED)
        rid = next(r for r, t in waiting.items() if t.done())
        lease = waiting.pop(rid).result()
        order.append(rid)
    assert order == expected


def expected_order_input() -> list[str]:
    """Arrival order: all of tenant a's backlog first, then tenant b."""
    return ["a1", "a2", "a3", "a4", "b1", "b2"]


class ByFirstToken(FixedPrefix):
    """Matches per prompt: the replicas' leading blocks by the prompt's first token."""

    def __init__(self, by_first: dict[int, dict[str, int]]):
        super().__init__(PrefixMatches(4, {}))
        self.by_first = by_first

    def matches_for(self, token_ids: Sequence[int]) -> PrefixMatches:
        return PrefixMatches(4, dict(self.by_first.get(token_ids[0], {})))


def first_token_req(rid: str, first: int) -> AdmissionRequest:
    return AdmissionRequest(rid, "tensorrt_llm", [first, 1, 2, 3], 4)


async def grant_order(
    core: Orchestrator, held: list[str], queued: dict[str, asyncio.Task[Lease]]
) -> list[tuple[str, str]]:
    """Completes the leases `held` (ids) one at a time, then each newly granted one, and
    returns (request, replica) in the order the queued requests were granted."""
    order: list[tuple[str, str]] = []
    pending = dict(queued)
    for lease_id in held:
        core.complete(lease_id, Outcome.SUCCESS)
        await asyncio.wait(pending.values(), return_when=asyncio.FIRST_COMPLETED)
    while True:
        for rid in [r for r, t in pending.items() if t.done()]:
            lease = pending.pop(rid).result()
            order.append((rid, lease.replica.id))
            core.complete(lease.lease_id, Outcome.SUCCESS)
        if not pending:
            return order
        await asyncio.wait(pending.values(), return_when=asyncio.FIRST_COMPLETED)


@pytest.mark.parametrize(
    ("window", "profile", "expected"),
    [
        # A freed replica takes the queued request with its cached prefix there first.
        (16, "default", [("hit-r1", "r1"), ("hit-r0", "r0"), ("cold", "r1")]),
        # Off (window 0, or a cache-blind profile): strict service order.
        (0, "default", [("cold", "r1"), ("hit-r1", "r0"), ("hit-r0", "r1")]),
        (16, "round-robin", [("cold", "r1"), ("hit-r1", "r0"), ("hit-r0", "r1")]),
    ],
)
async def test_a_freed_replica_takes_the_queued_request_cached_there(
    window: int, profile: str, expected: list[tuple[str, str]]
) -> None:
    index = ByFirstToken({101: {"r1": 4}, 102: {"r0": 4}})
    policy = Policy(admission=AdmissionPolicy(affinity_window=window))
    probe = FakeProbe()
    s = settings(n=2, cap=1, queue=16)
    s.profile = profile
    core = Orchestrator(s, probe, policy, index)
    probe.ready_ids = {"r0", "r1"}
    await core.probe_once()
    held = {}
    for first in (200, 201):
        lease = await core.admit(first_token_req(f"hold{first}", first), 1.0)
        held[lease.replica.id] = lease.lease_id
    queued = {}
    for rid, first in (("cold", 100), ("hit-r1", 101), ("hit-r0", 102)):
        queued[rid] = asyncio.create_task(core.admit(first_token_req(rid, first), 5.0))
        await assert_queued(core, len(queued))
    # r1 frees first, then r0.
    order = await grant_order(core, [held["r1"], held["r0"]], queued)
    assert order[: len(expected)] == expected


@pytest.mark.parametrize("why", ["not ready", "excluded"])
async def test_a_cached_waiter_does_not_jump_to_a_replica_it_cannot_use(why: str) -> None:
    index = ByFirstToken({101: {"r1": 4}})
    core, probe = await ready_core(n=2, cap=1, queue=16, prefix=index)
    held = {}
    for first in (200, 201):
        lease = await core.admit(first_token_req(f"hold{first}", first), 1.0)
        held[lease.replica.id] = lease.lease_id
    hit = first_token_req("hit-r1", 101)
    if why == "excluded":
        hit = dataclasses.replace(hit, exclude_replicas=frozenset({"r1"}))
    queued = {
        "cold": asyncio.create_task(core.admit(first_token_req("cold", 100), 5.0)),
        "hit-r1": asyncio.create_task(core.admit(hit, 5.0)),
    }
    await assert_queued(core, 2)
    if why == "not ready":
        probe.ready_ids = {"r0"}
        await core.probe_once()
        assert [st.ready for st in core.replicas()] == [True, False]
        core.complete(held.pop("r1"), Outcome.SUCCESS)  # room on r1, which is not ready
        await assert_queued(core, 2)
        order = await grant_order(core, [held["r0"]], queued)
        assert order == [("cold", "r0"), ("hit-r1", "r0")]
    else:
        order = await grant_order(core, [held["r1"], held["r0"]], queued)
        assert order == [("cold", "r1"), ("hit-r1", "r0")]


async def short_waiters_for_a_full_short_pool(
    core: Orchestrator,
) -> tuple[list[Lease], dict[str, asyncio.Task[Lease]]]:
    """s0's two leases held (the short pool full), then two short requests queued: "cold",
    and "hit-l0" whose prefix l0 holds (`ByFirstToken` by first tokens 100 and 101)."""
    held = [await core.admit(first_token_req(f"hold{i}", 200 + i), 1.0) for i in range(2)]
    assert [lease.replica.id for lease in held] == ["s0", "s0"]
    queued = {
        rid: asyncio.create_task(core.admit(first_token_req(rid, first), 5.0))
        for rid, first in (("cold", 100), ("hit-l0", 101))
    }
    await assert_queued(core, 2)
    return held, queued


NO_LENDING_AFFINE = NO_LENDING.model_copy(update={"admission": AdmissionPolicy(affinity_window=16)})


async def test_a_request_no_waiter_can_serve_is_granted_past_the_queue() -> None:
    """Short requests wait for the full short pool; the long pool, which does not lend to them,
    has room: a long request arriving is granted at once, not queued behind them until an
    unrelated event (the pool filter judges l0 for the waiters among every replica, as their
    decision would, not alone)."""
    core, _ = await ready_core(policy=NO_LENDING_AFFINE, specs=POOL_SPECS, cap=8, queue=16)
    held, queued = await short_waiters_for_a_full_short_pool(core)
    long = await core.admit(req("long", prompt_len=500), 1.0)
    assert long.replica.id == "l0"
    assert core.queue_depth == 2
    order = await grant_order(core, [lease.lease_id for lease in held], queued)
    assert order == [("cold", "s0"), ("hit-l0", "s0")]


async def test_a_request_a_lending_pool_would_serve_is_granted_past_an_unrelated_waiter() -> None:
    """The short pool is full and the long pool idle, so it lends; W1, queued, excludes l0. A
    short request arriving is granted l0 at once, as its decision picks, not queued until an
    unrelated event: whether a replica with room is free for it is judged with the pools'
    load (the lending), not on views without load."""
    core, _ = await ready_core(policy=POOLS, specs=POOL_SPECS, cap=8, queue=16)
    held = [await core.admit(req(f"h{i}"), 1.0) for i in range(2)]
    assert [lease.replica.id for lease in held] == ["s0", "s0"]
    w1 = asyncio.create_task(
        core.admit(dataclasses.replace(req("W1"), exclude_replicas=frozenset({"l0"})), 5.0)
    )
    await assert_queued(core, 1)
    assert (await core.admit(req("S"), 1.0)).replica.id == "l0"
    assert core.queue_depth == 1
    await cancel_all([w1])


async def test_a_cached_waiter_does_not_jump_to_a_pool_that_does_not_lend() -> None:
    """The affinity pass judges a replica for a waiter as a decision over every replica would:
    a long-pool replica holding a queued short request's prefix takes it only where the pool
    filter, judging the pools' utilization, lets the long pool lend (here: never)."""
    index = ByFirstToken({101: {"l0": 4}})
    core, _ = await ready_core(
        policy=NO_LENDING_AFFINE, specs=POOL_SPECS, cap=8, queue=16, prefix=index
    )
    long = await core.admit(req("long", prompt_len=500), 1.0)
    assert long.replica.id == "l0"
    held, queued = await short_waiters_for_a_full_short_pool(core)
    core.complete(long.lease_id, Outcome.SUCCESS)  # an event with room on l0: a pass
    await assert_queued(core, 2)
    order = await grant_order(core, [lease.lease_id for lease in held], queued)
    assert order == [("cold", "s0"), ("hit-l0", "s0")]


async def test_a_queued_request_is_passed_over_at_most_window_times() -> None:
    index = ByFirstToken({101: {"r0": 4}})
    policy = Policy(admission=AdmissionPolicy(affinity_window=2))
    core, _ = await ready_core(n=1, cap=1, queue=16, policy=policy, prefix=index)
    hold = await core.admit(first_token_req("hold", 200), 1.0)
    queued = {}
    for rid, first in (("cold", 100), ("w2", 101), ("w3", 101), ("w4", 101), ("w5", 101)):
        queued[rid] = asyncio.create_task(core.admit(first_token_req(rid, first), 5.0))
        await assert_queued(core, len(queued))
    order = await grant_order(core, [hold.lease_id], queued)
    assert [rid for rid, _ in order] == ["w2", "w3", "cold", "w4", "w5"]


async def test_engine_metrics_cap_and_kv_watermark() -> None:
    texts = {
        "http://r0": metrics_text(active=2, waiting=0, used=95, total=100, max_batch=4),
        "http://r1": metrics_text(active=0, waiting=0, used=10, total=100, max_batch=2),
    }

    async def fetch(url: str, host: str, timeout_s: float) -> str:
        return texts[url]

    probe = FakeProbe()
    s = settings(n=2, cap=64)
    s.replicas = [
        ReplicaSpec(id="r0", grpc_address="a:1", metrics_url="http://r0"),
        ReplicaSpec(id="r1", grpc_address="a:2", metrics_url="http://r1"),
    ]
    core = Orchestrator(
        s, probe, Policy(capacity=CapacityPolicy(overcommit=1.5)), fetch_metrics=fetch
    )
    probe.ready_ids = {"r0", "r1"}
    await core.probe_once()
    await core.scrape_once()
    # r0 is above the 0.9 KV watermark; r1's cap is ceil(2 * 1.5) = 3 from its reported batch
    picks = [(await core.admit(req(str(i)), 1.0)).replica.id for i in range(3)]
    assert picks == ["r1", "r1", "r1"]
    task = asyncio.create_task(core.admit(req("w"), 5.0))
    await assert_queued(core, 1)
    texts["http://r0"] = metrics_text(active=2, waiting=0, used=50, total=100, max_batch=4)
    await core.scrape_once()  # r0 dropped below the watermark: the waiter gets it
    assert (await task).replica.id == "r0"


def metrics_text(active: int, waiting: int, used: int, total: int, max_batch: int) -> str:
    rows = [
        ("nv_trt_llm_request_metrics", "request_type", "active", active),
        ("nv_trt_llm_request_metrics", "request_type", "waiting", waiting),
        ("nv_trt_llm_request_metrics", "request_type", "max", max_batch),
        ("nv_trt_llm_kv_cache_block_metrics", "kv_cache_block_type", "used", used),
        ("nv_trt_llm_kv_cache_block_metrics", "kv_cache_block_type", "max", total),
    ]
    out = []
    for family in ("nv_trt_llm_request_metrics", "nv_trt_llm_kv_cache_block_metrics"):
        out.append(f"# TYPE {family} gauge")
        out.extend(f'{f}{{{label}="{value}"}} {n}' for f, label, value, n in rows if f == family)
    return "\n".join(out) + "\n"


async def test_approximate_mode_records_reports_and_drops() -> None:
    index = FixedPrefix(PrefixMatches(4, {}, hashes=(11, 12, 13, 14)))
    probe = FakeProbe()
    core = Orchestrator(settings(n=1, cap=8), probe, Policy(), index)
    probe.ready_ids = {"r0"}
    await core.probe_once()
    ran = await core.admit(req("ran"), 1.0)
    failed = await core.admit(req("failed"), 1.0)
    await index.settle(2)
    assert index.calls == [("record", "r0"), ("record", "r0")]
    core.complete(ran.lease_id, Outcome.SUCCESS, reused_blocks=2)
    core.complete(failed.lease_id, Outcome.REQUEST_ERROR, reused_blocks=None)  # never prefilled
    await index.settle(3)
    assert index.reports == [("r0", 2, 3, 3)]  # reported 2 of the 3 predicted, 3-token prompt
    assert index.report_hashes == [(11, 12, 13, 14)]  # to refresh the predicted entries
    probe.ready_ids.clear()
    await core.probe_once()  # "ran" succeeded since the last round: serving, not probed
    await core.probe_once()
    await index.settle(4)
    assert index.calls[-1] == ("drop", "r0")


async def test_a_routing_to_an_exact_replica_sends_no_update_and_reports_the_lookups_match() -> (
    None
):
    """The registry records nothing for a replica publishing KV events and would answer a
    RecordRouting with the match the lookup already gave: only the reuse report is sent, with
    that match as the prediction. A replica the lookup did not find exact still gets one."""
    index = FixedPrefix(
        PrefixMatches(4, {"r0": 3}, hashes=(11, 12, 13, 14), exact=frozenset({"r0"}))
    )
    core, _ = await ready_core(n=1, cap=8, policy=Policy(), prefix=index)
    lease = await core.admit(req("exact"), 1.0)
    core.complete(lease.lease_id, Outcome.SUCCESS, reused_blocks=2)
    await index.settle(1)
    assert index.calls == []
    assert index.reports == [("r0", 2, 3, 3)]  # the lookup's 3 blocks as the prediction
    assert index.report_hashes == [()]  # counted from the prompt's length: no hashes to send
    index.matches = PrefixMatches(4, {"r0": 3}, hashes=(11, 12, 13, 14))  # not known exact
    await core.admit(req("predicted"), 1.0)
    await index.settle(2)
    assert index.calls == [("record", "r0")]


class SlowRouting(FixedPrefix):
    """Routing updates answered only once released (an update lingering or in flight)."""

    def __init__(self, matches: PrefixMatches):
        super().__init__(matches)
        self.release = asyncio.Event()

    async def record_routing(self, replica_id: str, hashes: Sequence[int]) -> int:
        await self.release.wait()
        return await super().record_routing(replica_id, hashes)


async def test_a_lease_ended_before_its_routing_was_answered_reports_the_prediction() -> None:
    index = SlowRouting(PrefixMatches(4, {}, hashes=(11, 12, 13, 14)))
    core, _ = await ready_core(n=1, cap=8, policy=Policy(), prefix=index)
    lease = await core.admit(req("quick"), 1.0)
    core.complete(lease.lease_id, Outcome.SUCCESS, reused_blocks=1)
    await asyncio.sleep(0)
    assert index.reports == []  # the report waits for the routing answer
    index.release.set()
    await index.settle(2)
    assert index.calls == [("record", "r0")]
    assert index.reports == [("r0", 1, 3, 3)]  # the registry's answer, not 0


async def test_busy_kv_queues_instead_of_unavailable() -> None:
    """Every replica above the KV watermark is a load condition: wait, don't fail."""
    texts = {"http://r0": metrics_text(active=8, waiting=4, used=99, total=100, max_batch=8)}

    async def fetch(url: str, host: str, timeout_s: float) -> str:
        return texts[url]

    probe = FakeProbe()
    s = settings(n=1, cap=64)
    s.replicas = [ReplicaSpec(id="r0", grpc_address="a:1", metrics_url="http://r0")]
    core = Orchestrator(s, probe, Policy(), fetch_metrics=fetch)
    probe.ready_ids = {"r0"}
    await core.probe_once()
    await core.scrape_once()
    task = asyncio.create_task(core.admit(req("w"), 5.0))
    await assert_queued(core, 1)
    texts["http://r0"] = metrics_text(active=8, waiting=0, used=40, total=100, max_batch=8)
    await core.scrape_once()
    assert (await task).replica.id == "r0"


async def test_a_replica_with_a_long_prefill_backlog_takes_no_lease_until_it_drains() -> None:
    # No lease ends and no sample arrives: only the backlog bound's wake-up grants the waiter,
    # once the first prompt's modelled prefill (~0.1 s of an H100 at 8k tokens) has run down.
    core, _ = await ready_core(
        n=1, cap=8, policy=Policy(capacity=CapacityPolicy(max_prefill_backlog_s=0.01))
    )
    first = await core.admit(req("long", prompt_len=8000), 5.0)
    waiting = asyncio.ensure_future(core.admit(req("next", prompt_len=100), 5.0))
    await assert_queued(core, 1)  # r0 has room for 7 more leases, but a backlog
    lease = await asyncio.wait_for(waiting, 5.0)
    assert lease.replica.id == first.replica.id == "r0"
    assert lease.queue_s > 0.01


@pytest.mark.parametrize(("matched", "granted"), [(250, True), (25, False), (0, False)])
async def test_a_backlog_capped_replica_takes_a_request_whose_cached_prefix_saves_the_excess(
    matched: int, granted: bool
) -> None:
    # r0's backlog is one uncached 8k-token prefill (~0.1 s), far over the 0.01 s bound. A
    # second 8k prompt it holds whole saves about that prefill there: granted at once. One
    # holding a tenth (~0.01 s saved), or none, waits for the backlog to drain.
    index = FixedPrefix(PrefixMatches(250, {}))
    core, _ = await ready_core(
        n=1,
        cap=8,
        policy=Policy(capacity=CapacityPolicy(max_prefill_backlog_s=0.01)),
        prefix=index,
    )
    await core.admit(req("long", prompt_len=8000), 5.0)
    index.matches = PrefixMatches(250, {"r0": matched} if matched else {})
    second = asyncio.ensure_future(core.admit(req("next", prompt_len=8000), 5.0))
    await assert_queued(core, 0 if granted else 1)
    assert second.done() == granted
    assert (await asyncio.wait_for(second, 5.0)).replica.id == "r0"


BACKLOG_BOUND = Policy(capacity=CapacityPolicy(max_prefill_backlog_s=0.01))


async def test_a_queued_request_whose_cached_prefix_lifts_the_backlog_cap_is_granted_in_a_pass() -> (
    None
):
    # Both wait for version "a" behind r0's backlog (a 30k-token prefill, ~1.5 s); r1 (version
    # "b") has room. c's whole 8k-token prompt is cached on r0 (~0.3 s of prefill saved, less
    # than the backlog's excess): it waits too. Once the backlog has run down to ~0.2 s, the
    # next pass: the first (nothing cached) finds no room; the second, of the same kind, is
    # still decided for: its prefix on r0 now saves the backlog's excess there.
    clock = ManualClock()
    index = FixedPrefix(PrefixMatches(250, {}))
    specs = [
        ReplicaSpec(id="r0", grpc_address="a:1", model_version="a"),
        ReplicaSpec(id="r1", grpc_address="a:2", model_version="b"),
    ]
    core, _ = await ready_core(cap=8, policy=BACKLOG_BOUND, prefix=index, specs=specs, clock=clock)
    await core.admit(req("long", prompt_len=30000, version="a"), 5.0)
    waiters = await queue_each(
        core,
        index,
        [
            (req("u", prompt_len=8000, version="a"), {}),
            (req("c", prompt_len=8000, version="a"), {"r0": 250}),
        ],
    )
    assert core.queue_depth == 2
    clock.t += 1.3
    await core.scrape_once()  # an event: a pass over the queue
    assert core.queue_depth == 1  # one left the queue in that pass
    assert (await waiters["c"]).replica.id == "r0"
    assert not waiters["u"].done()
    await cancel_all(waiters.values())


async def test_a_request_whose_cached_prefix_lifts_a_cap_is_granted_past_waiters_without() -> None:
    # r0 is capped by an 8k-token prefill's backlog (~0.3 s); u waits for it. c's whole 8k
    # prompt is cached there, which saves the backlog's excess: its decision finds room that
    # u's does not, so c is granted on arrival, not queued behind u until an unrelated event.
    index = FixedPrefix(PrefixMatches(250, {}))
    core, _ = await ready_core(n=1, cap=8, policy=BACKLOG_BOUND, prefix=index)
    await core.admit(req("long", prompt_len=8000), 5.0)
    waiters = await queue_each(
        core, index, [(req("u", prompt_len=8000), {}), (req("c", prompt_len=8000), {"r0": 250})]
    )
    assert (await waiters["c"]).replica.id == "r0"
    assert core.queue_depth == 1
    assert not waiters["u"].done()
    await cancel_all(waiters.values())


async def test_waiters_whose_cached_prefix_cannot_lift_a_cap_cost_no_decision_each() -> None:
    # R is capped by an 8k-token prefill's backlog; S (another version) has room. 20 waiters
    # for R's version each hold a tenth of their prompt on R: too little to cover the
    # backlog's excess (`_exempt`), so one decision for their kind stands for them all.
    index = FixedPrefix(PrefixMatches(250, {}))
    specs = [
        ReplicaSpec(id="R", grpc_address="a:1", model_version="a"),
        ReplicaSpec(id="S", grpc_address="a:2", model_version="b"),
    ]
    core, _ = await ready_core(cap=8, queue=64, specs=specs, prefix=index, policy=BACKLOG_BOUND)
    await core.admit(req("r", prompt_len=8000, version="a"), 5.0)
    waiters = await queue_each(
        core, index, [(req(f"w{i}", prompt_len=8000, version="a"), {"R": 25}) for i in range(20)]
    )
    assert core.queue_depth == 20
    await assert_one_decision(core, core.scrape_once)  # an event: a pass
    await cancel_all(waiters.values())


async def test_waiters_whose_prefix_lifts_a_cap_their_pool_cannot_use_cost_one_decision() -> None:
    # The short pool (s0) is full and the long pool lends nothing; l0 is capped by a 40k-token
    # prefill's backlog, run down to ~0.3 s. 50 short waiters each hold their whole prompt on
    # l0 (~0.7 s saved: it lifts l0's cap), a replica their pool may not use: one decision
    # for their kind with that cap lifted stands for them all.
    policy = backlogged_pools(20000, short_cap=1, lend_below=0)
    core, index, clock = await pools_core(["s0"], ["l0", "l1"], policy, queue=100)
    await core.admit(req("s", prompt_len=10), 5.0)
    big = dataclasses.replace(req("big", prompt_len=40000), exclude_replicas=frozenset({"l1"}))
    assert (await core.admit(big, 5.0)).replica.id == "l0"
    waiters = await queue_each(
        core, index, [(req(f"w{i}", prompt_len=16000), {"l0": 250}) for i in range(50)]
    )
    assert core.queue_depth == 50
    clock.t += 1.9
    await assert_one_decision(core, core.scrape_once)  # an event: a pass
    await cancel_all(waiters.values())


async def test_a_pass_that_took_the_last_slot_still_lets_a_cached_prefix_in() -> None:
    # R is backlogged (a 30k-token prefill, ~1.5 s), S has one slot left. W's whole 16k
    # prompt is cached on R (~0.7 s saved): less than the excess at first. Once the backlog has
    # run down to ~0.5 s, a pass (S frees one): L1 finds no room, B1 takes S's slot, L2 is of
    # L1's kind, and no replica has room, lifting no cap; W's prefix lifts R's: W is still
    # decided for, as it would be were every waiter decided for in turn, and granted R.
    clock = ManualClock()
    index = FixedPrefix(PrefixMatches(250, {}))
    specs = [
        ReplicaSpec(id="R", grpc_address="a:1", model_version="a"),
        ReplicaSpec(id="S", grpc_address="a:2", model_version="b"),
    ]
    core, _ = await ready_core(
        cap=2, queue=100, specs=specs, prefix=index, policy=BACKLOG_BOUND, clock=clock
    )
    await core.admit(req("r", prompt_len=30000, version="a"), 5.0)
    s1 = await core.admit(req("s1", version="b"), 5.0)
    await core.admit(req("s2", version="b"), 5.0)
    waiters = await queue_each(
        core,
        index,
        [
            (req("L1", prompt_len=100, version="a"), {}),
            (req("B1", version="b"), {}),
            (req("L2", prompt_len=100, version="a"), {}),
            (req("W", prompt_len=16000, version="a"), {"R": 250}),
        ],
    )
    assert core.queue_depth == 4
    clock.t += 1.0
    assert core.complete(s1.lease_id, Outcome.SUCCESS)  # a pass
    assert core.queue_depth == 2
    assert (await waiters["B1"]).replica.id == "S"
    assert (await waiters["W"]).replica.id == "R"
    assert not any(waiters[n].done() for n in ("L1", "L2"))
    await cancel_all(waiters.values())


async def test_a_grant_in_a_pass_that_backlogs_a_replica_still_lets_a_cached_prefix_in() -> None:
    # R's backlog (a 20k-token prefill, ~0.9 s: more than W's whole cached 16k prompt saves,
    # so W waits too) has drained; P stays backlogged; Q (idle) keeps room. In one pass: X1
    # finds no room, X2 (a prefix elsewhere) neither; Y takes R and backlogs it again (~0.3 s);
    # Z finds no room; W (its prefix saving ~0.7 s on R) is still decided for and granted there.
    clock = ManualClock()
    index = FixedPrefix(PrefixMatches(250, {}))
    specs = [
        ReplicaSpec(id="R", grpc_address="a:1", model_version="a"),
        ReplicaSpec(id="P", grpc_address="a:2", model_version="c"),
        ReplicaSpec(id="Q", grpc_address="a:3", model_version="b"),
    ]
    core, _ = await ready_core(
        cap=8, queue=100, specs=specs, prefix=index, policy=BACKLOG_BOUND, clock=clock
    )
    await core.admit(req("r", prompt_len=20000, version="a"), 5.0)
    await core.admit(req("p", prompt_len=60000, version="c"), 5.0)
    waiters = await queue_each(
        core,
        index,
        [
            (req("X1", prompt_len=100, version="c"), {}),
            (req("X2", prompt_len=100, version="c"), {"Q": 1}),
            (req("Y", prompt_len=8000, version="a"), {}),
            (req("Z", prompt_len=100, version="a"), {}),
            (req("W", Priority.BATCH, prompt_len=16000, version="a"), {"R": 250}),
        ],
    )
    assert core.queue_depth == 5
    clock.t += 0.9  # R's backlog has run down; P's (a 60k-token prefill) has not
    await core.scrape_once()  # a pass
    assert core.queue_depth == 3
    assert (await waiters["Y"]).replica.id == "R"
    assert (await waiters["W"]).replica.id == "R"
    await cancel_all(waiters.values())


async def test_the_affinity_pass_judges_a_pool_as_busy_only_as_a_decision_would() -> None:
    # s1 (short pool) is capped by a 40k-token prefill's backlog; l1 (long pool) holds two
    # short requests it was lent. L (long) then W (short, its whole prompt cached on s1 and a
    # little on l1) queue. Once the backlog has run down enough for W's cached prefix to lift
    # s1's cap, a pass with room on l1: a decision for W sees the short pool with room (the
    # cap lifted) and lends it nothing, so the affinity pass leaves l1 to L at the head, and
    # W's own decision then lets it onto s1.
    policy = backlogged_pools(
        40000, long_cap=2, lend_below=0.9, admission=AdmissionPolicy(affinity_window=16)
    )
    core, index, clock = await pools_core(["s1"], ["l1"], policy, queue=16)
    assert (await core.admit(req("r", prompt_len=40000), 5.0)).replica.id == "s1"
    held = [await core.admit(req(f"h{i}", prompt_len=100), 5.0) for i in range(2)]
    assert [h.replica.id for h in held] == ["l1", "l1"]  # lent: s1 is capped
    waiters = await queue_each(
        core,
        index,
        [(req("L", prompt_len=30000), {}), (req("W", prompt_len=16000), {"s1": 250, "l1": 10})],
    )
    assert core.queue_depth == 2  # W's prefix saves less than s1's backlog exceeds the bound
    clock.t += 1.8  # s1's backlog (~2.2 s of prefill) has run down to ~0.4 s
    core.complete(held[0].lease_id, Outcome.SUCCESS)  # a pass, room on l1
    assert (await waiters["L"]).replica.id == "l1"
    assert (await waiters["W"]).replica.id == "s1"  # as decisions in service order grant


async def test_a_request_waits_for_a_waiter_whose_own_prefix_makes_a_pool_lend_to_it() -> None:
    # s0 (short) is full; l0 (long) is capped by a 40k-token prefill's backlog, run down to
    # ~0.3 s; l1 holds 3 of 8. W (short) holds its whole prompt on l0, which lifts l0's cap
    # for it, and the long pool then lends to it (4 of 8 without: no lending). A (long, also
    # cached on l0) arrives: W could take l0, so A waits; the next pass serves W first.
    policy = backlogged_pools(20000, short_cap=2, lend_below=0.5)
    core, index, clock = await pools_core(["s0"], ["l0", "l1"], policy, queue=16)
    for i in range(2):
        assert (await core.admit(req(f"s{i}", prompt_len=10), 5.0)).replica.id == "s0"
    not_l0, not_l1 = frozenset({"l0"}), frozenset({"l1"})
    for i in range(3):
        lease = await core.admit(
            dataclasses.replace(req(f"L{i}", prompt_len=30000), exclude_replicas=not_l0), 5.0
        )
        assert lease.replica.id == "l1"
        clock.t += 3.0
    clock.t += 3.0  # every prefill so far done
    big = dataclasses.replace(req("big", prompt_len=40000), exclude_replicas=not_l1)
    assert (await core.admit(big, 5.0)).replica.id == "l0"
    waiters = await queue_each(core, index, [(req("W", prompt_len=16000), {"l0": 250})])
    assert core.queue_depth == 1  # l0's backlog exceeds what W's prefix saves
    clock.t += 1.9
    index.matches = PrefixMatches(250, {"l0": 250})
    a = asyncio.create_task(core.admit(req("A", prompt_len=30000), 5.0))
    await assert_queued(core, 2)  # W could take l0: A waits in line
    core._dispatch()  # the next event
    assert (await waiters["W"]).replica.id == "l0"
    await cancel_all([a])


async def test_a_kind_that_failed_only_with_a_cached_prefix_is_still_lent_a_larger_pool() -> None:
    # s1 (short pool) is backlogged and nearly out of KV; l1 (long) is capped by a long
    # request's backlog, so it lends nothing and both short requests queue. It ends: a pass.
    # w0 (cached on s1) fails: lifting s1's backlog cap for it makes the short pool look free
    # (no lending), and the KV watermark then drops s1. w, of its kind and uncached, sees s1
    # capped: the long pool lends, and w is granted there in the same pass.
    core, index, _ = await pools_core(["s1"], ["l1"], backlogged_pools(20000), queue=100)
    assert (await core.admit(req("r", prompt_len=8000), 5.0)).replica.id == "s1"
    sample = EngineSample(active=1, waiting=0, kv_used=95, kv_max=100)
    core._sampler._store(state(core, "s1"), sample, core._clock())
    long = await core.admit(req("long", prompt_len=30000), 5.0)
    assert long.replica.id == "l1"
    waiters = await queue_each(
        core, index, [(req("w0", prompt_len=16000), {"s1": 250}), (req("w", prompt_len=100), {})]
    )
    assert core.queue_depth == 2
    assert core.complete(long.lease_id, Outcome.SUCCESS)  # a pass
    assert (await waiters["w"]).replica.id == "l1"
    assert not waiters["w0"].done()
    await cancel_all(waiters.values())


async def test_an_engine_sample_applied_by_a_decision_in_a_pass_is_seen_by_later_ones() -> None:
    # R's new sample (two requests waiting) backlogs it again, but only once a view applies it
    # to the load ledger: B's decision does, mid-pass. C (its whole prompt cached on R) is of
    # the kind that failed before that, and is still decided for: granted on R.
    clock = ManualClock()
    index = FixedPrefix(PrefixMatches(250, {}))
    specs = [
        ReplicaSpec(id="R", grpc_address="a:1", model_version="a"),
        ReplicaSpec(id="Q", grpc_address="a:2", model_version="b"),
        ReplicaSpec(id="S", grpc_address="a:3", models=["other"]),  # room, another model
    ]
    policy = Policy(
        capacity=CapacityPolicy(max_prefill_backlog_s=0.01),
        admission=AdmissionPolicy(affinity_window=0),
    )
    core, _ = await ready_core(
        cap=3, queue=100, specs=specs, prefix=index, policy=policy, clock=clock
    )
    assert (await core.admit(req("r1", prompt_len=8000, version="a"), 5.0)).replica.id == "R"
    clock.t += 0.3
    assert (await core.admit(req("r2", prompt_len=8000, version="a"), 5.0)).replica.id == "R"
    for i in range(3):
        assert (await core.admit(req(f"q{i}", version="b"), 5.0)).replica.id == "Q"
    not_r = frozenset({"R"})
    # R is out of the ready set while they arrive, so all four queue (C's prefix lifts R's
    # backlog cap: ready, R would take it at once).
    state(core, "R").ready = False
    waiters = await queue_each(
        core,
        index,
        [
            (dataclasses.replace(req("A1"), exclude_replicas=not_r), {}),
            (dataclasses.replace(req("A2"), exclude_replicas=not_r), {"Q": 1}),
            (req("B"), {}),
            (req("C", prompt_len=16000), {"R": 250}),
        ],
    )
    assert core.queue_depth == 4
    state(core, "R").ready = True
    clock.t += 0.3  # R's modelled backlog has run down in the ledger
    sample = EngineSample(active=0, waiting=2, kv_used=10, kv_max=1000)
    core._sampler._store(state(core, "R"), sample, core._clock())
    core._dispatch()  # a pass, as a scrape that stored the sample starts
    assert core.queue_depth == 3
    assert (await waiters["C"]).replica.id == "R"
    await cancel_all(waiters.values())


async def test_without_a_backlog_bound_the_replica_takes_every_lease_it_has_room_for() -> None:
    core, _ = await ready_core(
        n=1, cap=8, policy=Policy(capacity=CapacityPolicy(max_prefill_backlog_s=0.0))
    )
    await core.admit(req("long", prompt_len=8000), 5.0)
    granted = asyncio.ensure_future(core.admit(req("next", prompt_len=100), 5.0))
    await assert_queued(core, 0)
    assert granted.done()  # at once, not after a wait in the queue
    assert (await granted).replica.id == "r0"


async def test_the_prefix_lookup_is_for_the_replicas_a_decision_may_choose() -> None:
    """The index answers from its copy of the registry's exact index only when it holds the
    whole truth for every replica named: a replica not ready (dropped from the registry) or
    draining, named with the others, sent every lookup to the registry while it stayed."""
    probe = FakeProbe()
    index = FixedPrefix(PrefixMatches(4, {}))
    core = Orchestrator(settings(n=3, cap=8), probe, Policy(), index)
    probe.ready_ids = {"r0", "r1"}
    await core.probe_once()
    await core.admit(req("a"), 1.0)
    assert index.looked_up_for[-1] == {"r0", "r1"}
    await core.drain_replica("r1", 0.0)
    await core.admit(req("b"), 1.0)
    assert index.looked_up_for[-1] == {"r0"}
