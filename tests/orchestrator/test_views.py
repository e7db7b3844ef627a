"""Scheduling views are reused while nothing they show changed, and never stale: each change to
a replica's leases, engine sample, health or load gives the next decision a new view."""

from __future__ import annotations

import asyncio
import dataclasses
import threading

import aiohttp
import pytest
from aiohttp import web

from llmmesh.accelerators import DEFAULT_PROFILE
from llmmesh.common.engine_metrics import EngineSample
from services.orchestrator import capacity
from services.orchestrator.director import Orchestrator
from services.orchestrator.domain import Outcome
from services.orchestrator.health import EngineSampler, staggered
from services.orchestrator.load import LoadLedger
from services.orchestrator.policy import Policy
from services.orchestrator.prefix import PrefixMatches
from services.orchestrator.probe import HttpMetrics
from services.orchestrator.replicas import ReplicaState
from services.orchestrator.scheduling.config import PluginConfig, ProfileConfig, WeightedScorer
from services.orchestrator.scheduling.contracts import ReplicaView
from services.orchestrator.scheduling.work import WorkModel
from services.orchestrator.settings import ReplicaSpec
from tests.helpers import ManualClock, eventually
from tests.orchestrator.conftest import FixedPrefix
from tests.orchestrator.test_core import FakeProbe, metrics_text, req, settings, state


def view(core: Orchestrator, rid: str) -> ReplicaView:
    st = next(s for s in core.replicas() if s.spec.id == rid)
    return core._view(st, core.now())


async def test_an_unchanged_replica_keeps_its_view_and_each_change_makes_a_new_one() -> None:
    probe = FakeProbe()
    probe.ready_ids = {"r0"}
    core = Orchestrator(settings(n=1, cap=8), probe, clock=ManualClock())  # time stands still
    await core.probe_once()
    first = view(core, "r0")
    assert view(core, "r0") is first  # nothing changed: the same snapshot

    lease = await core.admit(req("a"), 1.0)
    held = view(core, "r0")
    assert held is not first
    assert (held.in_flight, first.in_flight) == (1, 0)
    assert held.load is not None
    assert held.load.prefill_tokens == 3  # the 3-token prompt, its prefill not yet done

    assert core.complete(lease.lease_id, Outcome.REPLICA_ERROR)
    failed = view(core, "r0")
    assert failed.in_flight == 0
    assert failed.recent_failures == 1

    st = state(core, "r0")
    st.sample, st.sample_at = EngineSample(3, 2, 10, 100, 8), core.now()
    sampled = view(core, "r0")
    assert (sampled.engine_active, sampled.engine_waiting) == (3, 2)
    assert sampled.in_flight == 5  # the engine's requests beyond this orchestrator's leases
    assert view(core, "r0") is sampled

    probe.ready_ids.clear()
    await core.probe_once()
    assert view(core, "r0").ready is False


async def test_a_view_stands_until_the_first_change_time_can_bring() -> None:
    """Between events a view is reused, but never past the time something it shows changes
    without one: its leases' progress (one engine step), its sample going stale, its ejection
    ending, its failures leaving the window."""
    clock = ManualClock()
    probe = FakeProbe()
    probe.ready_ids = {"r0"}
    s = settings(n=1, cap=8)
    core = Orchestrator(s, probe, clock=clock)
    await core.probe_once()
    st = state(core, "r0")
    idle = view(core, "r0")
    clock.t += 1000.0
    assert view(core, "r0") is idle  # nothing it shows moves with time

    lease = await core.admit(req("a"), 1.0)
    held = view(core, "r0")
    assert held.load is not None
    assert (held.load.prefill_tokens, held.load.decode_seqs) == (3, 0)
    step = core._load.resolution_s
    clock.t += step / 2
    assert view(core, "r0") is held  # within one engine step
    clock.t += step
    moved = view(core, "r0")
    assert moved.load is not None
    assert (moved.load.prefill_tokens, moved.load.decode_seqs) == (0, 1)  # decoding now

    st.sample, st.sample_at = EngineSample(3, 0, 10, 100, 8), clock.t
    sampled = view(core, "r0")
    assert sampled.engine_active == 3
    core.complete(lease.lease_id, Outcome.REPLICA_ERROR)
    failed = view(core, "r0")
    assert failed.recent_failures == 1
    st.ejected_until = clock.t + 1.0
    ejected = view(core, "r0")
    assert ejected.ejected

    clock.t = st.ejected_until
    assert not view(core, "r0").ejected
    clock.t = st.sample_at + s.metrics_max_age_s + 1e-6
    assert view(core, "r0").engine_active is None
    clock.t = st.outcomes[0][0] + Policy().health.failure_window_s + 1e-6
    assert view(core, "r0").recent_failures == 0


def test_an_idle_replica_load_is_computed_once_and_reset_by_any_change() -> None:
    clock = ManualClock()
    led = LoadLedger(clock, WorkModel.named("llama-3.1-8b-h100-bf16"))
    led.grant("a", "r", 1000, 0, 16)
    busy = led.load("r")
    assert busy.prefill_tokens == 1000
    led.complete("a")
    idle = led.load("r")
    assert idle.prefill_tokens == 0
    assert idle.prefill_s == 0.0
    clock.t += 5
    assert led.load("r") is idle  # no lease, no backlog: the time does not matter
    led.observe("r", 4, 0, 0, clock.t)
    others = led.load("r")
    assert others is not idle
    assert others.decode_seqs == 4
    led.grant("b", "r", 500, 0, 16)
    assert led.load("r").prefill_tokens == 500


async def test_a_standing_view_follows_the_cap_the_mean_service_time_gives() -> None:
    """The leases expected to end soon raise a replica's cap, and the first completion anywhere
    (the mean service time becomes known) changes how many: a replica with no event of its own
    shows the cap a fresh computation gives."""
    clock = ManualClock()
    probe = FakeProbe()
    probe.ready_ids = {"r0", "r1"}
    core = Orchestrator(settings(n=2, cap=8), probe, clock=clock)
    await core.probe_once()
    st = state(core, "r0")
    st.sample, st.sample_at = EngineSample(4, 0, 10, 100, 4), clock.t
    before = view(core, "r0")
    assert before.cap == core._cap(st, clock.t)
    lease = await core.admit(dataclasses.replace(req("a"), exclude_replicas=frozenset({"r0"})), 1.0)
    clock.t += 0.5
    assert core.complete(lease.lease_id, Outcome.SUCCESS)
    after = view(core, "r0")
    assert after.cap == core._cap(st, clock.t)
    assert after.cap != before.cap


def scraped(*ids: str) -> list[ReplicaState]:
    """Replicas with a metrics page at http://m/<id>."""
    return [
        ReplicaState(ReplicaSpec(id=i, grpc_address="h:1", metrics_url=f"http://m/{i}"))
        for i in ids
    ]


async def test_an_inline_sampler_calls_fetch_on_the_loop_thread_and_skips_failures() -> None:
    loop_thread = threading.get_ident()
    calls: list[str] = []

    async def fetch(url: str, host: str, timeout_s: float) -> EngineSample:
        assert threading.get_ident() == loop_thread  # inline: no worker thread
        calls.append(url)
        if url.endswith("down"):
            raise OSError("unreachable")
        return EngineSample(1, 0, 5, 10)

    clock = ManualClock()
    sampler = EngineSampler(fetch, 1.0, 5.0, clock)
    states = scraped("up", "down")
    states[0].in_flight = 2
    await sampler.scrape(states)
    assert calls == ["http://m/up", "http://m/down"]
    up, down = states
    assert up.sample == EngineSample(1, 0, 5, 10)
    assert (up.sample_at, up.sample_in_flight) == (clock.t, 2)
    assert down.sample is None
    assert sampler.fresh(up, clock.t + 5.5) is None  # older than max age: unknown


async def test_a_spread_round_starts_each_fetch_in_turn_and_samples_every_replica() -> None:
    """With `spread_s`, the fetches start one after the other (each in its own task) and run
    concurrently: a replica that never answers holds up no other's sample."""
    started: list[str] = []
    release = asyncio.Event()

    async def fetch(url: str, host: str, timeout_s: float) -> EngineSample:
        started.append(url)
        if url.endswith("slow"):
            await release.wait()
        if url.endswith("down"):
            raise OSError("unreachable")
        return EngineSample(1, 0, 5, 10)

    clock = ManualClock()
    sampler = EngineSampler(fetch, 1.0, 5.0, clock)
    states = scraped("slow", "down", "up")
    sampled: list[int] = []
    round_ = asyncio.create_task(
        sampler.scrape(states, spread_s=0.003, on_sample=lambda: sampled.append(1))
    )

    async def last_sampled() -> bool:
        return states[2].sample is not None

    await eventually(last_sampled, 5, "the last replica sampled")
    assert started == ["http://m/slow", "http://m/down", "http://m/up"]
    assert [st.sample is None for st in states] == [True, True, False]  # slow: still waiting
    release.set()
    await round_
    sample = EngineSample(1, 0, 5, 10)
    assert [st.sample for st in states] == [sample, None, sample]
    assert len(sampled) == 2  # once per sample stored, as each arrives


async def test_a_bad_page_or_a_failing_call_ends_nothing_else() -> None:
    """A page the parser refuses gives no sample; a round's call that raises is logged and the
    other replicas' calls still run; a replica removed before its turn is not called."""

    async def fetch(url: str, host: str, timeout_s: float) -> str:
        if url.endswith("bad"):
            return 'nv_trt_llm_request_metrics{request_type="active"} not-a-number\n'
        return metrics_text(active=1, waiting=0, used=5, total=10, max_batch=4)

    clock = ManualClock()
    sampler = EngineSampler(fetch, 1.0, 5.0, clock)
    bad, good = scraped("bad", "good")
    await sampler.scrape([bad, good])
    assert bad.sample is None
    assert good.sample is not None

    called: list[str] = []

    async def call(st: ReplicaState) -> None:
        called.append(st.spec.id)
        if st.spec.id == "a":
            raise RuntimeError("boom")

    states = [ReplicaState(ReplicaSpec(id=i, grpc_address="h:1")) for i in ("a", "b", "gone")]
    states[2].removed = True
    await staggered(call, states, 0.0)
    assert called == ["a", "b"]


async def test_the_first_health_round_is_not_spread() -> None:
    """Admits wait for the first round: it probes every replica at once, whatever the spread."""
    probe = FakeProbe()
    probe.ready_ids = {"r0", "r1"}
    core = Orchestrator(settings(n=2, cap=4), probe)
    await asyncio.wait_for(core.probe_once(spread_s=3600), timeout=30)
    assert (await core.admit(req("x"), 1.0)).replica.id in {"r0", "r1"}


async def test_http_metrics_reuse_one_connection_and_send_the_host() -> None:
    peers: list[object] = []
    hosts: list[str] = []

    async def page(request: web.Request) -> web.Response:
        peers.append(request.transport.get_extra_info("peername") if request.transport else None)
        hosts.append(request.host)
        if request.path == "/missing":
            raise web.HTTPNotFound()
        return web.Response(text="nv_trt_llm_request_metrics 1\n")

    app = web.Application()
    app.router.add_get("/{name}", page)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    pages = HttpMetrics()
    try:
        for _ in range(3):
            text = await pages(f"http://127.0.0.1:{port}/metrics", "triton.svc:8002", 1.0)
            assert text == "nv_trt_llm_request_metrics 1\n"
        assert len(set(peers)) == 1  # kept alive: one connection for every round
        assert hosts == ["triton.svc:8002"] * 3
        with pytest.raises(aiohttp.ClientResponseError):
            await pages(f"http://127.0.0.1:{port}/missing", "", 1.0)
    finally:
        await pages.close()
        await runner.cleanup()


async def test_the_cap_follows_the_sample_and_the_mean_service_time() -> None:
    clock = ManualClock()
    probe = FakeProbe()
    probe.ready_ids = {"r0", "r1"}
    core = Orchestrator(settings(n=2, cap=64), probe, clock=clock)
    await core.probe_once()
    overcommit = core._policy.capacity.overcommit
    start_soon = core._settings.start_soon_s

    def cap(slots: int, st: ReplicaState) -> int:
        mean = core._service.mean_s
        ending = capacity.ending_soon(st.lease_starts, clock.t, start_soon, mean)
        return min(64, capacity.replica_cap(slots, overcommit, ending))

    r0, r1 = state(core, "r0"), state(core, "r1")
    assert view(core, "r0").cap == 64  # no sample: the configured cap
    r0.sample, r0.sample_at = EngineSample(0, 0, 0, 100, 8), clock.t
    r1.sample, r1.sample_at = EngineSample(0, 0, 0, 100, 8), clock.t
    assert view(core, "r0").cap == view(core, "r1").cap == cap(8, r0)
    r0.sample = EngineSample(0, 0, 0, 100, 2)
    assert view(core, "r0").cap == cap(2, r0)
    assert view(core, "r1").cap == cap(8, r1)
    lease = await core.admit(req("a"), 1.0)
    before = view(core, "r1").cap
    clock.t += 10
    assert core.complete(lease.lease_id, Outcome.SUCCESS)
    assert core._service.mean_s == 10
    assert view(core, "r0").cap == 64  # its sample is now older than the max age: unknown
    r0.sample_at = r1.sample_at = clock.t
    assert view(core, "r0").cap == cap(2, r0)
    assert view(core, "r1").cap == cap(8, r1) < before  # no lease ends soon: none ahead


async def test_a_batch_that_started_together_is_leased_beyond_its_slots_only_near_its_end() -> None:
    clock = ManualClock()
    probe = FakeProbe()
    probe.ready_ids = {"r0"}
    soon = settings(n=1, cap=64).model_copy(update={"start_soon_s": 1.0})
    core = Orchestrator(soon, probe, clock=clock)
    await core.probe_once()
    r0 = state(core, "r0")
    r0.sample, r0.sample_at = EngineSample(0, 0, 0, 100, 4), clock.t
    first = await core.admit(req("warm"), 1.0)
    clock.t += 10.0
    assert core.complete(first.lease_id, Outcome.SUCCESS)  # mean service time: 10 s
    r0.sample_at = clock.t
    assert view(core, "r0").cap == 4  # no lease: nothing ends soon
    for i in range(4):
        await core.admit(req(f"wave-{i}"), 1.0)
    r0.sample_at = clock.t + 8.5
    clock.t += 8.5  # the wave ends in 1.5 s: later than start_soon_s (1 s)
    assert view(core, "r0").cap == 4
    clock.t += 0.5
    r0.sample_at = clock.t  # it ends within 1 s: the engine starts waiting ones then
    assert view(core, "r0").cap == 4 + 2  # at most slots * (overcommit 1.5 - 1)
    clock.t += 1.0
    r0.sample_at = clock.t  # past the mean: with start_soon_s 0 too
    assert capacity.ending_soon(r0.lease_starts, clock.t, 0.0, core._service.mean_s) == 4


async def test_the_load_ledger_models_the_profiles_engine_at_the_engine_time_scale() -> None:
    # The ledger predicts backlog with the scoring profile's cost profile (here an A100 fleet's),
    # stretched by engine_time_scale: a 4x slowed fleet's backlog is 4x as long.
    policy = Policy(
        plugins=[
            PluginConfig(
                name="ew",
                type="estimated-wait-scorer",
                params={"cost_profile": "llama-3.1-8b-a100-bf16"},
            )
        ],
        profiles={"a100": ProfileConfig(scorers=[WeightedScorer(plugin="ew")], picker="max-score")},
    )
    backlogs = {}
    for scale in (1.0, 4.0):
        s = settings(n=1, cap=8).model_copy(update={"profile": "a100", "engine_time_scale": scale})
        probe = FakeProbe()
        probe.ready_ids = {"r0"}
        core = Orchestrator(s, probe, policy, clock=ManualClock())
        await core.probe_once()
        await core.admit(req("a", prompt_len=4000), 1.0)
        load = view(core, "r0").load
        assert load is not None
        backlogs[scale] = load.prefill_s
    a100 = WorkModel.named("llama-3.1-8b-a100-bf16").prefill_work_s(4000, 0)
    assert backlogs[1.0] == pytest.approx(a100)
    assert backlogs[1.0] != pytest.approx(WorkModel.named(DEFAULT_PROFILE).prefill_work_s(4000, 0))
    assert backlogs[4.0] == pytest.approx(4 * a100)


async def kv_free_after_one_grant(
    block_size: int | None, index: FixedPrefix | None = None
) -> int | None:
    """The KV tokens r0 has free after one 1000-token Admit (4 max tokens), its engine sampled
    with 100 KV blocks, on an orchestrator given `block_size` and the prefix index `index`."""
    text = metrics_text(active=0, waiting=0, used=0, total=100, max_batch=64)

    async def fetch(url: str, host: str, timeout_s: float) -> str:
        return text

    s = settings(n=1, cap=8).model_copy(
        update={"replicas": [ReplicaSpec(id="r0", grpc_address="a:1", metrics_url="http://r0")]}
    )
    probe = FakeProbe()
    probe.ready_ids = {"r0"}
    core = Orchestrator(
        s,
        probe,
        Policy(),
        index,
        fetch_metrics=fetch,
        clock=ManualClock(),
        kv_block_size=block_size,
    )
    await core.probe_once()
    await core.scrape_once()
    await core.admit(req("a", prompt_len=1000), 1.0)
    load = view(core, "r0").load
    assert load is not None
    return load.kv_free_tokens


async def test_the_ledger_knows_each_replicas_kv_capacity_from_its_sample() -> None:
    # The engine's KV blocks (its sample's max) times the block size the orchestrator was given,
    # less what the leases reserve (a 1000-token prompt and 4 max tokens: 32 blocks); without a
    # block size KV admission is not modelled.
    frees = {bs: await kv_free_after_one_grant(bs) for bs in (32, None)}
    assert frees == {32: 3200 - 32 * 32, None: None}


async def test_a_grant_pins_the_part_of_its_match_the_cache_held() -> None:
    # The lookup matched the whole 1000-token prompt (31 blocks) on r0, 10 blocks of it from
    # kv_registry (the rest a live lease's prompt): the lease reserves its last token and 4 max
    # tokens (one block) and pins the cache's 10 blocks, prorated: 10 x 1000 // 31 tokens.
    index = FixedPrefix(
        PrefixMatches(31, {"r0": 31}, hashes=tuple(range(1, 32)), registered={"r0": 10})
    )
    assert await kv_free_after_one_grant(32, index) == 3200 - 32 - 10 * 1000 // 31
