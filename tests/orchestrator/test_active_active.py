"""Several orchestrators on the same replicas: each counts, besides its own leases, the load the
engine reports beyond them (the others' leases, or a dead orchestrator's), so a replica's cap
holds across orchestrators within one sample; and a just-started orchestrator waits for its
first health round rather than refusing."""

from __future__ import annotations

import asyncio

import pytest

from services.orchestrator.director import Orchestrator
from services.orchestrator.domain import Outcome
from services.orchestrator.policy import Policy
from services.orchestrator.replicas import ReplicaState
from services.orchestrator.settings import OrchestratorSettings, ReplicaSpec
from tests.helpers import ManualClock
from tests.orchestrator.test_core import FakeProbe, assert_queued, metrics_text, req


def engine(active: int, waiting: int = 0) -> str:
    # max_batch 64: the configured cap (4) binds, not the engine's batch.
    return metrics_text(active=active, waiting=waiting, used=0, total=100, max_batch=64)


async def core_on_one_replica(
    texts: dict[str, str], clock: ManualClock, max_age_s: float = 5.0, gauge_period_s: float = 2.0
) -> Orchestrator:
    settings = OrchestratorSettings(
        replicas=[ReplicaSpec(id="r0", grpc_address="a:1", metrics_url="http://r0")],
        max_in_flight_per_replica=4,
        max_queue=8,
        metrics_max_age_s=max_age_s,
        engine_gauge_period_s=gauge_period_s,
    )
    probe = FakeProbe()
    probe.ready_ids = {"r0"}

    async def fetch(url: str, host: str, timeout_s: float) -> str:
        return texts[url]

    core = Orchestrator(settings, probe, Policy(), fetch_metrics=fetch, clock=clock)
    await core.probe_once()
    return core


async def test_other_orchestrators_load_counts_against_the_cap() -> None:
    texts = {"http://r0": engine(active=3)}  # 3 requests another orchestrator admitted
    core = await core_on_one_replica(texts, ManualClock(1000.0))
    await core.scrape_once()
    await core.admit(req("a"), 1.0)  # the 4th slot
    waiter = asyncio.create_task(core.admit(req("b"), 5.0))
    await assert_queued(core, 1)
    texts["http://r0"] = engine(active=2)  # one of the others' ended; ours (1) is running
    await core.scrape_once()
    assert (await waiter).replica.id == "r0"


async def test_own_leases_are_not_counted_twice() -> None:
    texts = {"http://r0": engine(active=0)}
    core = await core_on_one_replica(texts, ManualClock(1000.0))
    for i in range(2):
        await core.admit(req(str(i)), 1.0)
    texts["http://r0"] = engine(active=1, waiting=1)  # exactly our 2 leases
    await core.scrape_once()
    for i in range(2, 4):  # the cap's last 2 slots are still ours to grant
        await core.admit(req(str(i)), 1.0)
    assert core.replicas()[0].in_flight == 4


async def test_without_a_fresh_sample_only_own_leases_count() -> None:
    texts = {"http://r0": engine(active=4)}
    clock = ManualClock(1000.0)
    core = await core_on_one_replica(texts, clock, max_age_s=5.0)
    await core.scrape_once()
    waiter = asyncio.create_task(core.admit(req("w"), 5.0))
    await assert_queued(core, 1)  # full: 4 others
    waiter.cancel()
    await asyncio.gather(waiter, return_exceptions=True)
    clock.t += 6.0  # the sample is stale: others' load unknown (the N x cap bound)
    assert (await core.admit(req("x"), 1.0)).replica.id == "r0"


async def test_a_fresh_orchestrator_waits_for_its_first_probe_round() -> None:
    settings = OrchestratorSettings(
        replicas=[ReplicaSpec(id="r0", grpc_address="a:1")], max_in_flight_per_replica=4
    )
    probe = FakeProbe()
    probe.ready_ids = {"r0"}
    core = Orchestrator(settings, probe, Policy())
    admit = asyncio.create_task(core.admit(req("early"), 5.0))
    await asyncio.sleep(0)  # the request is in, no health round has run yet
    assert not admit.done()
    await core.probe_once()
    assert (await admit).replica.id == "r0"


@pytest.mark.parametrize("gauge_period_s", [0.0, 2.0])
async def test_leases_that_ended_after_the_gauges_were_taken_are_not_others(
    gauge_period_s: float,
) -> None:
    """The engine refreshes its gauges every `engine_gauge_period_s`: a scrape may read counts
    taken before this orchestrator's latest completions. Leases that ended within that span
    are not taken for other orchestrators' requests (which would hold the replica's slots for
    nobody). With gauges refreshed at every scrape (0), the same counts are others' load."""
    texts = {"http://r0": engine(active=0)}
    clock = ManualClock(1000.0)
    core = await core_on_one_replica(texts, clock, gauge_period_s=gauge_period_s)
    leases = [await core.admit(req(str(i)), 1.0) for i in range(4)]
    texts["http://r0"] = engine(active=4)  # the gauges, taken while our 4 ran
    clock.t += 0.5
    for lease in leases[:3]:
        core.complete(lease.lease_id, Outcome.SUCCESS)
    await core.scrape_once()
    if gauge_period_s:
        for i in range(3):  # nobody else's load: the 3 slots are free
            assert (await core.admit(req(f"n{i}"), 1.0)).replica.id == "r0"
    else:
        waiter = asyncio.create_task(core.admit(req("w"), 5.0))
        await assert_queued(core, 1)  # 3 others' and our 1: full
        waiter.cancel()
        await asyncio.gather(waiter, return_exceptions=True)


def test_the_in_flight_peak_is_the_most_held_since_a_time() -> None:
    st = ReplicaState(ReplicaSpec(id="r0", grpc_address="a:1"))
    for value, at in [(1, 1.0), (3, 2.0), (2, 3.0), (0, 4.0), (1, 5.0)]:
        st.set_in_flight(value, at)
    # Held: 0 until 1, 1 until 2, 3 until 3, 2 until 4, 0 until 5, 1 since.
    assert [st.in_flight_peak(t) for t in (1.5, 2.5, 3.0, 3.5, 4.5, 5.0, 6.0)] == [
        3,
        3,
        2,
        2,
        1,
        1,
        1,
    ]
    assert len(st.ended_peaks) <= 4  # one per distinct value at most
