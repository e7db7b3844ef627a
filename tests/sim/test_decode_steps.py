"""`Scheduler.decode_steps` is `step()` repeated while nothing can be admitted."""

from __future__ import annotations

import pytest

from llmmesh.accelerators import DEFAULT_PROFILE, get_profile
from llmmesh.emulator.kv_cache import PagedKvCache
from llmmesh.emulator.scheduler import GenerationRequest, Scheduler, SchedulerConfig
from llmmesh.emulator.settings import EmulatorSettings
from llmmesh.kvblocks import BlockConfig


def _scheduler() -> Scheduler:
    return Scheduler(
        SchedulerConfig(max_batch_size=8, max_num_tokens=4096),
        PagedKvCache(64, BlockConfig(16)),
        get_profile(DEFAULT_PROFILE),
        EmulatorSettings(replica_id="t"),
    )


def _loaded() -> Scheduler:
    s = _scheduler()
    for i, (n, m) in enumerate([(40, 30), (70, 45), (17, 33)]):
        s.submit(GenerationRequest(f"r{i}", tuple(range(100 + i, 100 + i + n)), m))
    s.step(0)  # prefill of all three
    return s


def test_decode_steps_match_stepping() -> None:
    a, b = _loaded(), _loaded()
    k = a.decode_horizon()
    assert k == 29  # r0 has 29 tokens left after its first
    run = a.decode_steps(k, 1000)
    t = 1000
    finished = []
    for _ in range(k):
        res = b.step(t)
        t += int(res.duration_s * 1e9)
        finished += [o for o in res.outputs if o.finished]
    assert run.end_ns == t
    assert [o.request_id for o in run.finished] == [o.request_id for o in finished] == ["r0"]
    assert run.finished[0].token_id == finished[0].token_id
    assert run.finished[0].times == finished[0].times
    assert a.cache.num_used == b.cache.num_used
    assert a.cache.num_cached == b.cache.num_cached
    assert a.cache.evictable_hashes() == b.cache.evictable_hashes()
    assert a.metrics() == b.metrics()


def test_decode_steps_bounds() -> None:
    s = _loaded()
    with pytest.raises(ValueError, match="steps must be"):
        s.decode_steps(0)
    with pytest.raises(ValueError, match="steps must be"):
        s.decode_steps(s.decode_horizon() + 1)
    assert _scheduler().decode_horizon() == 0


def test_step_times_match_step_time() -> None:
    from llmmesh.accelerators import StepShape, decode_shape

    cost = get_profile(DEFAULT_PROFILE)
    shape = decode_shape(1000) + decode_shape(5000) + decode_shape(17)
    many = cost.step_times_s(shape, StepShape(0, 3, 3), 50)
    one = [
        cost.step_time_s(StepShape(3, shape.attention_pairs + 3 * j, shape.kv_tokens + 3 * j))
        for j in range(50)
    ]
    assert many.tolist() == one
