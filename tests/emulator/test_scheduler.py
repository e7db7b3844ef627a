from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import pytest

from llmmesh.accelerators import (
    LLAMA_3_1_8B_H100_BF16,
    StepShape,
    decode_shape,
    prefill_shape,
)
from llmmesh.emulator.engine import Engine, VirtualClock
from llmmesh.emulator.events import BlocksStored
from llmmesh.emulator.kv_cache import PagedKvCache
from llmmesh.emulator.scheduler import (
    GenerationRequest,
    RequestRejectedError,
    Scheduler,
    SchedulerConfig,
    StepResult,
    TokenOutput,
)
from llmmesh.emulator.settings import EmulatorSettings
from llmmesh.emulator.tokens import expected_output_ids
from llmmesh.kvblocks import BlockConfig, block_hashes
from llmmesh.triton.inflight import QueueFullError

CFG = BlockConfig(block_size=4)
VOCAB = EmulatorSettings(replica_id="test")


def make(*, batch: int = 8, num_blocks: int = 64, max_num_tokens: int = 64) -> Scheduler:
    return Scheduler(
        SchedulerConfig(max_batch_size=batch, max_num_tokens=max_num_tokens),
        PagedKvCache(num_blocks, CFG),
        LLAMA_3_1_8B_H100_BF16,
        VOCAB,
    )


def req(rid: str, prompt: list[int], n: int, seed: int = 0) -> GenerationRequest:
    return GenerationRequest(rid, tuple(prompt), n, seed)


def run_to_completion(s: Scheduler, limit: int = 1000) -> list[StepResult]:
    steps = []
    while s.has_work:
        steps.append(s.step())
        assert len(steps) < limit
    return steps


def tokens_of(steps: list[StepResult], rid: str) -> list[TokenOutput]:
    return [o for st in steps for o in st.outputs if o.request_id == rid]


def test_outputs_are_the_expected_tokens_and_length() -> None:
    s = make()
    prompt = list(range(10))
    s.submit(req("a", prompt, 7, seed=42))
    outs = tokens_of(run_to_completion(s), "a")
    assert [o.token_id for o in outs] == expected_output_ids(42, prompt, 7, VOCAB)
    assert [o.index for o in outs] == list(range(7))
    assert [o.finished for o in outs] == [False] * 6 + [True]


def test_fcfs_admission_up_to_max_batch_size() -> None:
    s = make(batch=2)
    for rid in "abc":
        s.submit(req(rid, [ord(rid)] * 3, 3))
    first = s.step()
    assert (first.num_context, first.num_generation) == (2, 0)
    assert [o.request_id for o in first.outputs] == ["a", "b"]
    m = s.metrics()
    assert (m.active, m.waiting, m.scheduled, m.context, m.max_active) == (2, 1, 2, 2, 2)
    s.step()
    s.step()  # a and b finish (3 tokens each)
    assert (s.num_running, s.num_waiting) == (0, 1)
    fourth = s.step()
    assert (fourth.num_context, [o.request_id for o in fourth.outputs]) == (1, ["c"])


def test_token_budget_limits_prefill_per_step() -> None:
    s = make(max_num_tokens=10)
    s.submit(req("a", [1] * 6, 2))
    s.submit(req("b", [2] * 6, 2))
    assert [o.request_id for o in s.step().outputs] == ["a"]
    # Step 2: a decodes (1 token) and b's 6 prompt tokens fit in 10.
    second = s.step()
    assert (second.num_context, second.num_generation) == (1, 1)


def test_request_waits_while_the_cache_is_full() -> None:
    s = make(num_blocks=4)
    s.submit(req("big", list(range(8)), 8))  # 16 tokens: all 4 blocks
    s.submit(req("next", [9] * 3, 1))
    steps = []
    while s.num_running or s.num_waiting:
        st = s.step()
        steps.append(st)
        if s.num_running and s.cache.num_free - s.cache.num_reserved == 0:
            assert s.num_waiting == 1
    big = tokens_of(steps, "big")
    nxt = tokens_of(steps, "next")
    assert len(big) == 8
    assert len(nxt) == 1
    first_next = next(
        i for i, st in enumerate(steps) if any(o.request_id == "next" for o in st.outputs)
    )
    last_big = max(
        i for i, st in enumerate(steps) if any(o.request_id == "big" for o in st.outputs)
    )
    assert first_next > last_big


class _CountingCache(PagedKvCache):
    hashed: int = 0

    def prompt_hashes(self, prompt: Sequence[int]) -> list[int]:
        self.hashed += 1
        return super().prompt_hashes(prompt)


def test_a_prompt_waiting_at_the_head_of_the_queue_is_hashed_once() -> None:
    cache = _CountingCache(4, CFG)
    s = Scheduler(
        SchedulerConfig(max_batch_size=8, max_num_tokens=64),
        cache,
        LLAMA_3_1_8B_H100_BF16,
        VOCAB,
    )
    s.submit(req("big", list(range(8)), 8))  # all 4 blocks for 8 steps
    s.submit(req("next", list(range(100, 109)), 1))  # waits behind it, 2 reusable blocks
    steps = run_to_completion(s)
    waited = sum(1 for st in steps if not any(o.request_id == "next" for o in st.outputs))
    assert waited >= 8
    assert cache.hashed == 2  # one per request, however many steps "next" waited
    assert len(tokens_of(steps, "next")) == 1


@pytest.mark.parametrize(
    ("prompt_len", "max_new", "message"),
    [
        (0, 4, "at least one token"),
        (4, 0, "request_output_len must be positive"),
        (65, 1, "exceeds max_num_tokens=64"),
        (40, 40, "need 20 KV blocks"),  # the cache holds 16
    ],
)
def test_requests_that_can_never_run_are_rejected(
    prompt_len: int, max_new: int, message: str
) -> None:
    s = make(num_blocks=16)
    with pytest.raises(RequestRejectedError, match=message):
        s.submit(req("x", [1] * prompt_len, max_new))
    assert not s.has_work


def test_duplicate_request_id_is_rejected() -> None:
    s = make()
    s.submit(req("x", [1], 1))
    with pytest.raises(RequestRejectedError, match="already in flight"):
        s.submit(req("x", [1], 1))


@pytest.mark.parametrize("state", ["running", "waiting"])
def test_cancellation_frees_slot_and_blocks_immediately(state: str) -> None:
    s = make(batch=1, num_blocks=8)
    s.submit(req("a", list(range(6)), 20))
    s.submit(req("b", [7] * 3, 2))
    s.step()
    assert (s.num_running, s.num_waiting, s.cache.num_used) == (1, 1, 2)
    victim = "a" if state == "running" else "b"
    assert s.cancel(victim)
    assert not s.cancel(victim)
    if state == "running":
        assert (s.num_running, s.cache.num_used, s.cache.num_reserved) == (0, 0, 0)
        assert s.metrics().active == 0
        assert [o.request_id for o in s.step().outputs] == ["b"]  # the slot is free right away
    else:
        assert (s.num_running, s.num_waiting) == (1, 0)


def test_repeated_prompt_reports_reused_blocks() -> None:
    s = make()
    prompt = list(range(10))
    s.submit(req("a", prompt, 2))
    run_to_completion(s)
    s.submit(req("b", prompt, 2))
    first = s.step()
    assert first.outputs[0].blocks.reused_blocks == 2
    assert s.metrics().kv_reused_blocks == 2
    # Only the 2 uncached prompt tokens are prefilled.
    assert first.shape == prefill_shape(2, 8)


def test_step_duration_follows_the_cost_model() -> None:
    s = make()
    s.submit(req("a", list(range(10)), 3))
    first = s.step()
    assert first.shape == prefill_shape(10, 0)
    s.submit(req("b", [50] * 5, 3))
    second = s.step()
    # a decodes at context 11 (10 prompt + 1 generated) fused with b's prefill.
    assert second.shape == decode_shape(11) + prefill_shape(5, 0)
    assert second.duration_s == LLAMA_3_1_8B_H100_BF16.step_time_s(second.shape)
    assert second.duration_s > 0


def test_kv_events_cover_prompt_and_generated_blocks() -> None:
    s = make()
    prompt = list(range(6))
    s.submit(req("a", prompt, 6))
    steps = run_to_completion(s)
    events = [e for st in steps for e in st.events]
    assert [e.sequence for e in events] == list(range(len(events)))
    stored = [
        b.block_hash for e in events if isinstance(e.data, BlocksStored) for b in e.data.blocks
    ]
    generated = expected_output_ids(0, prompt, 6, VOCAB)
    assert stored == block_hashes(prompt + generated, CFG)  # 12 tokens: 3 full blocks
    assert s.cache.num_cached == 3
    assert s.cache.num_used == 0


def test_metrics_idle_engine() -> None:
    s = make(num_blocks=32)
    m = s.metrics()
    assert m.request_metrics() == {
        "active": 0,
        "max": 8,
        "scheduled": 0,
        "context": 0,
        "waiting": 0,
    }
    assert m.kv_cache_block_metrics() == {
        "max": 32,
        "free": 32,
        "used": 0,
        "tokens_per": 4,
        "reused": 0,
        "fraction": 0.0,
    }


# --------------------------------------------------------------------------- engine loop


class Sink:
    def __init__(self, cancel_after: int | None = None) -> None:
        self.tokens: list[TokenOutput] = []
        self.errors: list[str] = []
        self.cancelled = 0
        self.cancel_after = cancel_after
        self.done = threading.Event()

    def on_token(self, output: TokenOutput) -> None:
        self.tokens.append(output)
        if output.finished:
            self.done.set()

    def on_error(self, message: str) -> None:
        self.errors.append(message)
        self.done.set()

    def on_cancelled(self) -> None:
        self.cancelled += 1
        self.done.set()

    def is_cancelled(self) -> bool:
        return self.cancel_after is not None and len(self.tokens) >= self.cancel_after


def engine(clock: VirtualClock, **kw: object) -> Engine:
    settings = EmulatorSettings(replica_id="t", num_kv_blocks=64, time_scale=0.5, **kw)  # type: ignore[arg-type]
    return Engine(settings, CFG, clock=clock)


def test_engine_waits_scaled_model_time_on_its_clock() -> None:
    clock = VirtualClock()
    e = engine(clock)
    sink = Sink()
    e.submit(req("a", list(range(10)), 3), sink)
    t0 = clock.monotonic_ns()
    durations = []
    while (r := e.run_step()) is not None:
        durations.append(r.duration_s)
    assert [t.token_id for t in sink.tokens] == expected_output_ids(0, list(range(10)), 3, VOCAB)
    assert clock.monotonic_ns() - t0 == pytest.approx(sum(durations) * 0.5 * 1e9, abs=10)
    times = sink.tokens[-1].times
    assert times.arrival_ns == t0
    assert times.first_scheduled_ns == t0
    assert times.first_token_ns == t0 + int(durations[0] * 0.5 * 1e9)
    assert times.last_token_ns == clock.monotonic_ns()


def test_engine_polls_cancellation_and_tells_the_sink_once() -> None:
    clock = VirtualClock()
    e = engine(clock, cancellation_check_period_ms=0.001)
    sink = Sink(cancel_after=2)
    e.submit(req("a", list(range(10)), 50), sink)
    while e.run_step() is not None:
        pass
    assert len(sink.tokens) == 2
    assert sink.cancelled == 1
    assert sink.errors == []
    m = e.metrics()
    assert (m.active, m.kv_used_blocks) == (0, 0)


def test_engine_cancel_from_another_thread_and_stop() -> None:
    e = Engine(EmulatorSettings(replica_id="t", time_scale=0.001), CFG)
    e.start()
    try:
        done, running = Sink(), Sink()
        e.submit(req("short", [1, 2, 3], 2), done)
        e.submit(req("long", [4, 5, 6], 20_000), running)
        assert done.done.wait(10)
        assert len(done.tokens) == 2
        assert e.cancel("long")
        assert running.done.wait(10)
        assert running.cancelled == 1
        assert e.metrics().active == 0
        waiting = Sink()
        e.submit(req("last", [7], 20_000), waiting)
    finally:
        e.stop()
    assert waiting.errors == ["engine stopped"]
    with pytest.raises(RequestRejectedError, match="stopping"):
        e.submit(req("late", [1], 1), Sink())


def test_a_step_that_raises_ends_its_requests_with_an_error_and_the_engine_goes_on() -> None:
    """What the failed step did to its requests is unknown (one it finished may have lost its
    final output): they end with an error, their KV blocks freed, and the next request is
    served; the failing step is not run again and again."""
    e = Engine(EmulatorSettings(replica_id="t", time_scale=0.001), CFG)
    step = e.scheduler.step
    calls = 0

    def failing(now_ns: int) -> Any:
        nonlocal calls
        calls += 1
        if calls == 2:  # a's first token came; b is in the batch too
            raise OverflowError("int too big to convert")
        return step(now_ns)

    e.scheduler.step = failing  # type: ignore[method-assign, assignment]
    a, b = Sink(), Sink()
    e.submit(req("a", [1, 2, 3], 50), a)
    e.submit(req("b", [4, 5, 6], 50), b)
    e.start()
    try:
        for sink in (a, b):
            assert sink.done.wait(10), "a request was left without an ending"
        why = "internal error: engine step failed: OverflowError('int too big to convert')"
        assert a.errors == b.errors == [why]
        assert (e.metrics().active, e.metrics().kv_used_blocks) == (0, 0)
        c = Sink()
        e.submit(req("c", [7, 8], 3), c)
        assert c.done.wait(10)
        assert (len(c.tokens), c.errors) == (3, [])
    finally:
        e.stop()


def test_a_failing_sink_ends_only_its_request() -> None:
    class Broken(Sink):
        def on_token(self, output: TokenOutput) -> None:
            raise RuntimeError("client went away")

    clock = VirtualClock()
    e = engine(clock)
    bad, good = Broken(), Sink()
    e.submit(req("bad", [1, 2], 5), bad)
    e.submit(req("good", [3, 4], 5), good)
    while e.run_step() is not None:
        pass
    assert (bad.cancelled, len(bad.errors)) == (0, 1)
    assert len(good.tokens) == 5


def test_engine_events_reach_the_callback_in_order() -> None:
    got: list[int] = []
    e = Engine(
        EmulatorSettings(replica_id="t", time_scale=0),
        CFG,
        clock=VirtualClock(),
        on_events=lambda evs: got.extend(ev.sequence for ev in evs),
    )
    e.submit(req("a", list(range(9)), 8), Sink())
    while e.run_step() is not None:
        pass
    assert got == list(range(len(got)))
    assert len(got) > 0
    snap = e.snapshot()
    assert snap[0].sequence == len(got)


def test_step_shape_addition() -> None:
    assert StepShape(1, 2, 3) + StepShape(4, 5, 6) == StepShape(5, 7, 9)


def test_engine_refuses_beyond_its_waiting_queue_bound() -> None:
    """TensorRT-LLM's `max_queue_size`: requests beyond the batch wait up to the bound, the next
    one is refused at once with a RESOURCE_EXHAUSTED message, and room comes back as they run."""
    clock = VirtualClock()
    e = engine(clock, max_batch_size=2, max_queue_size=3)
    sinks = {f"r{i}": Sink() for i in range(5)}
    for rid in list(sinks)[:3]:
        e.submit(req(rid, [1, 2, 3], 2), sinks[rid])
    assert e.run_step() is not None  # r0, r1 run; r2 waits
    for rid in list(sinks)[3:]:
        e.submit(req(rid, [1, 2, 3], 2), sinks[rid])
    assert (e.metrics().active, e.metrics().waiting) == (2, 3)
    with pytest.raises(QueueFullError, match=r"^RESOURCE_EXHAUSTED: 3 requests .*max_queue_size=3"):
        e.submit(req("over", [1, 2, 3], 2), Sink())
    while e.run_step() is not None:
        pass
    assert all(len(s.tokens) == 2 and not s.errors for s in sinks.values())
    e.submit(req("later", [1, 2, 3], 2), Sink())  # drained: room again


class FailingSink(Sink):
    """Its send of the n-th token raises (Triton's sender, a tensor conversion)."""

    def __init__(self, fail_at: int) -> None:
        super().__init__()
        self.fail_at = fail_at

    def on_token(self, output: TokenOutput) -> None:
        super().on_token(output)
        if len(self.tokens) == self.fail_at:
            raise RuntimeError("response sender failed")


@pytest.mark.parametrize(("max_tokens", "fail_at"), [(5, 2), (3, 3)])  # mid-stream; the final
def test_a_failed_send_ends_the_request_with_an_error(max_tokens: int, fail_at: int) -> None:
    e = engine(VirtualClock())
    sink, other = FailingSink(fail_at), Sink()
    e.submit(req("a", list(range(10)), max_tokens), sink)
    e.submit(req("b", [1, 2, 3], 4), other)
    while e.run_step() is not None:
        pass
    # Ended by an error response: not left without a final one (the client and Triton would
    # wait for ever), nor cut with an empty final that reads as a normal end.
    assert len(sink.tokens) == fail_at
    assert [m.startswith("internal error") for m in sink.errors] == [True]
    assert sink.cancelled == 0
    assert len(other.tokens) == 4
    assert other.errors == []
    m = e.metrics()
    assert (m.active, m.kv_used_blocks) == (0, 0)
