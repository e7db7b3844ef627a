"""The autoscaler loop with a fake source, a fake actuator and a fake clock; the gRPC API over a
real channel."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
import pytest_asyncio
from prometheus_client import REGISTRY
from pydantic import ValidationError

from llmmesh.common import discovery
from llmmesh.common import metric_names as names
from llmmesh.common.discovery import DnsTarget
from llmmesh.common.errors import Unavailable
from llmmesh.common.server import ManagedServer, ServiceRegistration
from llmmesh.common.topology import PoolKey
from llmmesh.generated.autoscaler.v1 import autoscaler_pb2 as pb
from llmmesh.generated.autoscaler.v1 import autoscaler_pb2_grpc as pb_grpc
from services.autoscaler import core as core_module
from services.autoscaler import policy
from services.autoscaler.__main__ import build_source
from services.autoscaler.actuators.contracts import ReplicaCounts
from services.autoscaler.core import Autoscaler
from services.autoscaler.policy import Cause
from services.autoscaler.promql import PromQLSource
from services.autoscaler.scrape import ScrapeSource, target_discovery
from services.autoscaler.servicer import AutoscalerServicer
from services.autoscaler.settings import AutoscalerSettings
from services.autoscaler.signals import PoolSignals
from tests.autoscaler.fakes import FakeActuator, FakeClock, FakeSource, engine_page
from tests.autoscaler.test_policy import BASE, sig

KEY = PoolKey("short", "v1")
POLICY: dict[str, Any] = {**BASE, "min_replicas": 1, "max_replicas": 8}


def settings(**kw: Any) -> AutoscalerSettings:
    return AutoscalerSettings(default_policy=POLICY, signal_max_age_s=30, interval_s=0.01, **kw)


def metric(name: str, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


async def test_without_actuator_current_is_the_known_replicas() -> None:
    clock, source = FakeClock(), FakeSource()
    core = Autoscaler(settings(), source, clock=clock, timer=clock)
    source.signals[KEY] = sig(clock.t, 2, load=40)
    (rec,) = await core.evaluate()
    assert (rec.key, rec.decision.current, rec.decision.desired) == (KEY, 2, 4)
    assert core.desired(KEY) == 4
    labels = {"pool": "short", "model_version": "v1"}
    assert metric(names.AS_DESIRED_REPLICAS, **labels) == 4
    assert metric(names.AS_CURRENT_REPLICAS, **labels) == 2
    assert (metric(names.AS_DECISIONS, **labels, direction="up", cause="scale_up") or 0) >= 1


async def test_a_decided_pool_exports_every_cause_from_its_first_decision() -> None:
    """Its decision counters exist at 0 for every cause (alert rules over a cause find their
    series, and rate() sees a first increase), not only for the causes it was decided by."""
    clock, source = FakeClock(), FakeSource()
    key = PoolKey("fresh", "v9")
    core = Autoscaler(settings(), source, clock=clock, timer=clock)
    source.signals[key] = sig(clock.t, 2, load=20)
    (rec,) = await core.evaluate()
    assert rec.decision.cause is not Cause.UNKNOWN_HOLD
    labels = {"pool": "fresh", "model_version": "v9"}
    for cause in (Cause.UNKNOWN_HOLD, Cause.STALE_HOLD):
        assert metric(names.AS_DECISIONS, **labels, direction="hold", cause=cause.value) == 0


async def test_actuator_drives_and_starting_replicas_block_scale_down() -> None:
    clock, source = FakeClock(), FakeSource()
    actuator = FakeActuator({KEY: ReplicaCounts(ready=1)})
    core = Autoscaler(settings(), source, actuator, clock=clock, timer=clock)
    source.signals[KEY] = sig(clock.t, 1, load=30)
    (rec,) = await core.evaluate()
    assert rec.decision.desired == 3
    assert actuator.applied[-1][:2] == (KEY, 3)
    assert rec.decision.reason in actuator.applied[-1][2]
    # Two replicas are starting (not reporting): the load vanished, but nothing scales down yet.
    clock.t += 10
    source.signals[KEY] = sig(clock.t, 1, load=0, replicas_known=1)
    (rec,) = await core.evaluate()
    assert (rec.decision.current, rec.decision.desired, rec.decision.cause) == (
        3,
        3,
        Cause.UNKNOWN_HOLD,
    )
    assert rec.counts == ReplicaCounts(ready=1, starting=2)
    actuator.finish_starts()
    clock.t += 10
    source.signals[KEY] = sig(clock.t, 3, load=0)
    (rec,) = await core.evaluate()
    assert (rec.decision.current, rec.decision.desired) == (3, 1)
    assert actuator.applied[-1][:2] == (KEY, 1)


async def test_a_failing_source_holds_every_pool_then_turns_stale() -> None:
    clock, source = FakeClock(), FakeSource()
    core = Autoscaler(settings(), source, clock=clock, timer=clock)
    source.signals[KEY] = sig(clock.t, 3, load=30)
    await core.evaluate()
    source.fail = True
    clock.t += 5
    (rec,) = await core.evaluate()
    assert (rec.decision.desired, rec.decision.cause) == (3, Cause.UNKNOWN_HOLD)
    clock.t += 60
    (rec,) = await core.evaluate()
    assert (rec.decision.desired, rec.decision.cause) == (3, Cause.STALE_HOLD)


async def test_a_pool_nothing_is_known_of_is_not_decided_from_its_minimum() -> None:
    """Started during a metrics outage: a configured pool's minimum served as its decision had
    KEDA's HPA scale a busy pool down to it. Undecided, it is answered Unavailable (the HPA
    keeps its count) until the source reads it, and then decided from what it reads."""
    clock, source = FakeClock(), FakeSource()
    long = PoolKey("long", "v2")
    s = settings(
        pools=[{"pool": "long", "model_version": "v2", "policy": {**POLICY, "min_replicas": 2}}]
    )
    core = Autoscaler(s, source, clock=clock, timer=clock)
    with pytest.raises(Unavailable):
        core.desired(long)  # before the first evaluation
    assert await core.evaluate() == []
    with pytest.raises(Unavailable):
        core.desired(long)
    clock.t += 1
    source.signals[long] = sig(clock.t, 6, load=60)  # back: 6 replicas, busy
    (rec,) = await core.evaluate()
    assert rec.decision.current == 6
    assert core.desired(long) == rec.decision.desired >= 6
    clock.t += 1
    source.signals.clear()  # down again: the decision stands, held from the last one
    (held,) = await core.evaluate()
    assert (held.decision.desired, held.decision.cause) == (
        rec.decision.desired,
        Cause.UNKNOWN_HOLD,
    )


async def test_a_pool_whose_engines_were_counted_as_none_is_decided_from_zero() -> None:
    """A pool at zero: the source counted its engines and found none, and read its queue (the
    orchestrator's): a queue there wakes it (scale from zero)."""
    clock, source = FakeClock(), FakeSource()
    zero = PoolKey("long", "v2")
    s = settings(
        pools=[{"pool": "long", "model_version": "v2", "policy": {**POLICY, "min_replicas": 0}}]
    )
    core = Autoscaler(s, source, clock=clock, timer=clock)
    source.signals[zero] = PoolSignals(sampled_at=clock.t, replicas_known=0, queue_depth=3.0)
    (rec,) = await core.evaluate()
    assert (rec.decision.current, rec.decision.cause) == (0, Cause.FROM_ZERO)
    assert core.desired(zero) >= 1


async def test_a_pool_whose_engines_were_not_counted_is_not_decided_from_its_minimum() -> None:
    """Restarted while the engine count could not be read (the query timed out), the
    orchestrator's queue read: under KEDA the minimum served as `desired` had the HPA scale a
    busy pool down to it. Undecided until its engines are counted."""
    clock, source = FakeClock(), FakeSource()
    core = Autoscaler(settings(), source, clock=clock, timer=clock)
    source.signals[KEY] = PoolSignals(sampled_at=clock.t, queue_depth=0.0)
    assert await core.evaluate() == []
    with pytest.raises(Unavailable):
        core.desired(KEY)
    clock.t += 1
    source.signals[KEY] = sig(clock.t, 8, load=80)
    (rec,) = await core.evaluate()
    assert (rec.decision.current, rec.decision.desired) == (8, 8)


async def test_history_is_bounded_and_filterable() -> None:
    clock, source = FakeClock(), FakeSource()
    core = Autoscaler(settings(decision_history=3), source, clock=clock, timer=clock)
    other = PoolKey("long", "v1")
    for i in range(3):
        clock.t += 1
        source.signals = {KEY: sig(clock.t, 2, load=20 * (i + 1)), other: sig(clock.t, 1, load=10)}
        await core.evaluate()
    kept = core.decisions()
    assert [r.sequence for r in kept] == [4, 5, 6]
    assert [r.sequence for r in core.decisions(pool="short")] == [4, 6]  # pools in key order
    assert [r.sequence for r in core.decisions(after_sequence=5)] == [6]
    assert len(core.decisions(limit=1)) == 1


async def test_dns_targets_are_scraped_with_the_service_host() -> None:
    seen: list[tuple[str, str]] = []

    def fetch(url: str, host: str, timeout: float) -> str:
        seen.append((url, host))
        return engine_page(30, 0, 1, 100)

    dns = [DnsTarget(host="localhost", pool="short", model_version="v2", metrics_port=8002)]
    source = ScrapeSource(
        targets=target_discovery([], dns),
        orchestrator_urls=[],
        gateway_url=None,
        pool_models={},
        timeout_s=1,
        rate_window_s=60,
        max_age_s=30,
        fetch=fetch,
    )
    got = await source.collect(0.0)
    assert ("http://127.0.0.1:8002/metrics", "localhost:8002") in seen
    assert got[PoolKey("short", "v2")].engine_active == 30.0


def test_source_choice() -> None:
    assert isinstance(build_source(settings()), ScrapeSource)
    promql = settings(source="promql", prometheus_url="http://127.0.0.1:1")
    assert isinstance(build_source(promql), PromQLSource)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"source": "promql"}, "prometheus_url"),
        ({"pools": [{"pool": "a", "model_version": "v1"}] * 2}, "listed once"),
        ({"default_policy": {"min_replicas": 3, "max_replicas": 1}}, "min_replicas"),
    ],
)
def test_invalid_settings_are_clear_errors(env: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        AutoscalerSettings(**env)


@pytest_asyncio.fixture
async def api() -> AsyncIterator[tuple[pb_grpc.AutoscalerServiceAsyncStub, FakeSource, Autoscaler]]:
    clock, source = FakeClock(), FakeSource()
    core = Autoscaler(
        settings(), source, FakeActuator({KEY: ReplicaCounts(2)}), clock=clock, timer=clock
    )
    servicer = AutoscalerServicer(core)
    server = ManagedServer(
        host="127.0.0.1",
        port=0,
        services=[
            ServiceRegistration(
                "llmmesh.autoscaler.v1.AutoscalerService",
                lambda s: pb_grpc.add_AutoscalerServiceServicer_to_server(servicer, s),
            )
        ],
        drain_seconds=0,
    )
    port = await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield pb_grpc.AutoscalerServiceStub(channel), source, core
    await server.stop()


async def test_grpc_recommendations_and_decisions(
    api: tuple[pb_grpc.AutoscalerServiceAsyncStub, FakeSource, Autoscaler],
) -> None:
    stub, source, core = api
    source.signals[KEY] = sig(1000.0, 2, load=40, arrival_rate=None)
    await core.evaluate()
    await core.evaluate()
    resp = await stub.GetRecommendations(pb.GetRecommendationsRequest())
    (rec,) = resp.pools
    assert (rec.pool, rec.model_version, rec.desired_replicas) == ("short", "v1", 4)
    assert (rec.ready_replicas, rec.starting_replicas) == (2, 2)
    assert rec.cause == "steady"
    assert rec.reason
    assert rec.signals.active_requests == 40.0
    assert not rec.signals.HasField("arrival_rate")  # unknown stays unset
    assert not rec.HasField("capacity_replicas")
    assert rec.HasField("target_replicas")
    every = await stub.ListDecisions(pb.ListDecisionsRequest())
    assert [d.sequence for d in every.decisions] == [1, 2]
    changes = await stub.ListDecisions(pb.ListDecisionsRequest(changes_only=True, pool="short"))
    assert [d.sequence for d in changes.decisions] == [
        1,
        2,
    ]  # scale_up, then steady at 4
    none = await stub.ListDecisions(pb.ListDecisionsRequest(pool="long"))
    assert list(none.decisions) == []


async def test_a_policy_failing_on_one_pool_holds_it_and_decides_the_others(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock, source = FakeClock(), FakeSource()
    bad = PoolKey("long", "v1")
    core = Autoscaler(settings(), source, clock=clock, timer=clock)
    source.signals[KEY] = sig(clock.t, 2, load=20)
    source.signals[bad] = sig(clock.t, 2, load=20)
    await core.evaluate()
    real = policy.decide

    def failing(cfg: Any, state: Any, s: Any, current: int, now: float, age: float) -> Any:
        if s == source.signals[bad]:  # as sampled (the core restamps it on its timer)
            raise ValueError("cannot convert float NaN to integer")
        return real(cfg, state, s, current, now, age)

    monkeypatch.setattr(core_module, "decide", failing)
    errors = metric(names.AS_ERRORS, stage="decide") or 0
    clock.t += 10
    source.signals[KEY] = sig(clock.t, 2, load=40)
    source.signals[bad] = sig(clock.t, 1, load=40)  # a replica died meanwhile
    decided = {rec.key: rec.decision for rec in await core.evaluate()}
    assert (decided[KEY].desired, decided[KEY].cause) == (4, Cause.SCALE_UP)
    assert (decided[bad].desired, decided[bad].cause) == (2, Cause.ERROR_HOLD)
    assert metric(names.AS_ERRORS, stage="decide") == errors + 1


async def test_the_run_loop_outlives_a_failed_round(monkeypatch: pytest.MonkeyPatch) -> None:
    clock, source = FakeClock(), FakeSource()
    core = Autoscaler(settings(), source, clock=clock, timer=clock)
    source.signals[KEY] = sig(clock.t, 2, load=20)
    rounds = 0
    evaluate = core.evaluate

    async def flaky() -> list[Any]:
        nonlocal rounds
        rounds += 1
        if rounds == 1:
            raise RuntimeError("round failed")
        return await evaluate()

    monkeypatch.setattr(core, "evaluate", flaky)
    task = asyncio.create_task(core.run())
    try:
        await asyncio.wait_for(core.wait_for_update(), 10)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert rounds >= 2
    assert core.desired(KEY) == 2


async def test_a_pool_gone_from_every_source_is_forgotten_with_its_gauges() -> None:
    clock, source = FakeClock(), FakeSource()
    old = PoolKey("short", "v0")  # a rolled-out version: neither configured nor managed
    core = Autoscaler(settings(), source, clock=clock, timer=clock)
    source.signals[KEY] = sig(clock.t, 2, load=20)
    source.signals[old] = sig(clock.t, 1, load=10)
    await core.evaluate()
    labels = {"pool": "short", "model_version": "v0"}
    assert metric(names.AS_DESIRED_REPLICAS, **labels) == 1
    del source.signals[old]
    horizon = core_module.FORGET_AFTER * settings().signal_max_age_s
    clock.t += horizon  # unread, but not yet for longer than the horizon: still decided
    source.signals[KEY] = sig(clock.t, 2, load=20)
    assert {rec.key for rec in await core.evaluate()} == {KEY, old}
    clock.t += 1
    source.signals[KEY] = sig(clock.t, 2, load=20)
    assert {rec.key for rec in await core.evaluate()} == {KEY}
    assert [rec.key for rec in core.latest()] == [KEY]
    assert metric(names.AS_DESIRED_REPLICAS, **labels) is None
    # Its decision counters too: a rate over them would read 0 forever.
    exported = [
        s.labels
        for family in REGISTRY.collect()
        if family.name == names.AS_DECISIONS.removesuffix("_total")
        for s in family.samples
    ]
    assert exported
    assert not [s for s in exported if s.get("model_version") == "v0"]


async def test_a_pool_is_not_forgotten_in_a_source_outage_or_while_keda_asks_for_it() -> None:
    clock, source = FakeClock(), FakeSource()
    scaled = PoolKey("long", "v2")  # scaled by KEDA, not in the configuration
    core = Autoscaler(settings(), source, clock=clock, timer=clock)
    source.signals[KEY] = sig(clock.t, 2, load=20)
    source.signals[scaled] = sig(clock.t, 6, load=60)
    await core.evaluate()
    horizon = core_module.FORGET_AFTER * settings().signal_max_age_s
    # The source reads nothing for longer than the horizon: every pool is held, none forgotten.
    source.signals.clear()
    clock.t += horizon + 10
    assert {rec.key for rec in await core.evaluate()} == {KEY, scaled}
    assert core.desired(scaled) == 6  # KEDA asks for it meanwhile
    # The source is back without that pool; KEDA asked within the horizon: kept, held.
    clock.t += 1
    source.signals[KEY] = sig(clock.t, 2, load=20)
    decided = {rec.key: rec.decision for rec in await core.evaluate()}
    assert (decided[scaled].desired, decided[scaled].cause) == (6, Cause.STALE_HOLD)
    # No one asks any more: forgotten once the horizon passes.
    clock.t += horizon + 1
    source.signals[KEY] = sig(clock.t, 2, load=20)
    assert {rec.key for rec in await core.evaluate()} == {KEY}


async def test_a_wall_clock_step_neither_freezes_nor_ends_a_window() -> None:
    """Samples carry wall-clock times; the scale-down window runs on the monotonic timer. The
    wall clock stepping back an hour (NTP) froze the window for that hour; stepping forward it
    ended it at once."""
    s = AutoscalerSettings(
        default_policy={**POLICY, "scale_down_window_s": 60}, signal_max_age_s=30, interval_s=0.01
    )
    for step in (-3600.0, 3600.0):
        wall, timer, source = FakeClock(), FakeClock(), FakeSource()
        core = Autoscaler(s, source, clock=wall, timer=timer)
        source.signals[KEY] = sig(wall.t, 2, load=40)
        (rec,) = await core.evaluate()
        assert rec.decision.desired == 4
        wall.t += step
        timer.t += 30  # within the window: its high point holds
        source.signals[KEY] = sig(wall.t, 4, load=0)
        (rec,) = await core.evaluate()
        assert rec.decision.desired == 4, step
        assert rec.decision.signals.sampled_at == wall.t  # recorded as sampled
        wall.t += 31
        timer.t += 31  # past it
        source.signals[KEY] = sig(wall.t, 4, load=0)
        (rec,) = await core.evaluate()
        assert rec.decision.desired == 1, step


async def test_a_round_the_actuator_could_not_report_applies_nothing() -> None:
    """Its `observe` failed: the pools it manages are unknown this round. A pool never decided
    stays undecided (its minimum, decided from, would scale a pool running more down to it);
    one decided before is decided from its last count; `apply` is asked for none (the local
    actuator refuses pools it does not manage, every round)."""
    clock, source = FakeClock(), FakeSource()

    class Failing(FakeActuator):
        failing = True

        async def observe(self) -> Any:
            if self.failing:
                raise RuntimeError("kubelet unreachable")
            return await super().observe()

    actuator = Failing({KEY: ReplicaCounts(ready=8)})
    core = Autoscaler(settings(), source, actuator, clock=clock, timer=clock)
    source.signals[KEY] = sig(clock.t, 8, load=80)
    assert await core.evaluate() == []
    actuator.failing = False
    clock.t += 1
    (rec,) = await core.evaluate()
    assert (rec.decision.current, rec.decision.desired) == (8, 8)
    actuator.failing = True
    clock.t += 1
    source.signals[KEY] = sig(clock.t, 8, load=40)
    (rec,) = await core.evaluate()
    assert (rec.decision.current, rec.decision.desired) == (8, 4)  # from the last count
    assert [a[:2] for a in actuator.applied] == [(KEY, 8)]


async def test_engines_are_counted_once_every_service_answered(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Started while the DNS fails: a pool's Service lists no pods for want of an answer, not
    because it has none; its engine count is unknown, not 0, until it answers."""
    answers: list[Exception | list[str]] = [
        socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution"),
        ["127.0.0.1"],
    ]

    async def resolve(host: str, port: int) -> list[str]:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    monkeypatch.setattr(discovery, "resolve_ipv4", resolve)
    key = PoolKey("short", "v2")
    dns = [DnsTarget(host="triton-short", pool="short", model_version="v2", metrics_port=8002)]
    targets = target_discovery([], dns)
    source = ScrapeSource(
        targets=targets,
        counted=lambda: targets.complete,
        orchestrator_urls=[],
        gateway_url=None,
        pool_models={key: "m"},
        timeout_s=1,
        rate_window_s=60,
        max_age_s=30,
        fetch=lambda url, host, timeout: engine_page(3, 0, 1, 100),
    )
    assert (await source.collect(0.0))[key].replicas_known is None
    assert (await source.collect(1.0))[key].replicas_known == 1
