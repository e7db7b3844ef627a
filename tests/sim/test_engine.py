"""The simulator's engine admits as the emulator's: its decode stretches (one loop event up to the
next finishing sequence) give every request the first-token and finish times that stepping the
emulator's scheduler one iteration at a time gives."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmmesh.accelerators import DEFAULT_PROFILE, get_profile
from llmmesh.emulator.kv_cache import PagedKvCache
from llmmesh.emulator.scheduler import GenerationRequest, Scheduler, SchedulerConfig
from llmmesh.kvblocks import BlockConfig
from llmmesh.sim.engine import EngineConfig, SimEngine, Tracked
from llmmesh.sim.loop import run

CONFIG = EngineConfig(
    cost=get_profile(DEFAULT_PROFILE),
    max_batch_size=4,
    max_num_tokens=4096,
    num_kv_blocks=4096,
    block_size=16,
    max_queue_size=None,
)
# A cache that holds about one long prompt: admission waits for KV room.
SMALL_KV = dataclasses.replace(CONFIG, num_kv_blocks=300)


def requests(shapes: list[tuple[int, int]]) -> list[GenerationRequest]:
    """Distinct prompts (no reuse between them) of the given (prompt, max new tokens)."""
    return [
        GenerationRequest(f"r{i}", tuple(range(1000 * i + 100, 1000 * i + 100 + n)), m)
        for i, (n, m) in enumerate(shapes)
    ]


def stepped(
    reqs: list[GenerationRequest], config: EngineConfig = CONFIG
) -> dict[str, tuple[float, float]]:
    """(first token, finish) per request: the emulator's scheduler, one `step()` at a time. All
    arrive at time 0: an idle engine starts an iteration with the first, the others wait for
    the next."""
    s = Scheduler(
        SchedulerConfig(config.max_batch_size, config.max_num_tokens),
        PagedKvCache(config.num_kv_blocks, BlockConfig(config.block_size)),
        config.cost,
        config,
    )
    s.submit(reqs[0])
    t = 0.0
    first: dict[str, float] = {}
    out: dict[str, tuple[float, float]] = {}
    later = reqs[1:]
    while s.has_work:
        res = s.step(int(t * 1e9))
        for r in later:
            s.submit(r)
        later = []
        t += res.duration_s
        for o in res.outputs:
            first.setdefault(o.request_id, t)
            if o.finished:
                out[o.request_id] = (first[o.request_id], t)
    return out


def simulated(
    reqs: list[GenerationRequest], config: EngineConfig = CONFIG
) -> dict[str, tuple[float, float]]:
    async def main() -> dict[str, tuple[float, float]]:
        done: dict[str, tuple[float, float]] = {}
        all_done = asyncio.Event()

        def finished(rid: str, t: Tracked) -> None:
            assert t.first_token_s is not None
            assert t.finished_s is not None
            done[rid] = (t.first_token_s, t.finished_s)
            if len(done) == len(reqs):
                all_done.set()

        engine = SimEngine("e", config, asyncio.get_running_loop(), on_finished=finished)
        for r in reqs:
            engine.submit(r)
        await all_done.wait()
        return done

    return run(main())


def test_a_head_left_out_by_the_budget_of_one_iteration_starts_in_the_next() -> None:
    """While the first request's prefill runs, a short and a long prompt arrive: the short one
    uses the budget of the next iteration the long one needed; the long one fits the iteration
    after, and is not held until a running sequence finishes."""
    reqs = requests([(100, 60), (300, 60), (3900, 4)])
    sim, ref = simulated(reqs), stepped(reqs)
    assert sim["r2"][0] == pytest.approx(ref["r2"][0], abs=1e-9)
    assert sim["r2"][0] < sim["r0"][1] / 2  # long before the others' 60 tokens end


@pytest.mark.parametrize("config", [CONFIG, SMALL_KV], ids=["kv-ample", "kv-bound"])
@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 4000), st.integers(1, 40)), min_size=1, max_size=8))
def test_first_tokens_and_finishes_are_the_emulator_schedulers(
    config: EngineConfig, shapes: list[tuple[int, int]]
) -> None:
    """Distinct prompts (identical ones decode identical blocks, and a decoded block found
    already stored frees its copy: room the stretch does not foresee)."""
    reqs = requests(shapes)
    sim, ref = simulated(reqs, config), stepped(reqs, config)
    assert sim.keys() == ref.keys()
    for rid, (first, end) in ref.items():
        assert sim[rid][0] == pytest.approx(first, rel=1e-9, abs=1e-9), rid
        assert sim[rid][1] == pytest.approx(end, rel=1e-9, abs=1e-9), rid
