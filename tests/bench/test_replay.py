"""The replay scheduler on a virtual clock: no real sleeps, no mesh."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator

import pytest

from bench.replay import Chunk, Final, Progress, RequestError, replay
from bench.workloads import Request


class FakeClock:
    """Virtual time: `sleep_until` lets ready tasks run, then jumps to the deadline."""

    def __init__(self, start: float = 1000.0) -> None:
        self.t = start
        self.start = start

    def now(self) -> float:
        return self.t

    async def sleep_until(self, deadline: float) -> None:
        await asyncio.sleep(0)  # a yield, not a wait: tasks started earlier run at their time
        self.t = max(self.t, deadline)

    def advance(self, dt: float) -> None:
        self.t += dt


def final(tokens: int = 1, cached: int = 0, replica: str = "replica-0") -> Final:
    return Final(
        prompt_tokens=3, completion_tokens=tokens, cached_prompt_tokens=cached, replica_id=replica
    )


class RecordingClient:
    """Completes at once; records when each request was sent."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.sent: dict[str, float] = {}

    async def generate(self, request: Request, request_id: str) -> AsyncIterator[Chunk | Final]:
        self.sent[request_id] = self.clock.now() - self.clock.start
        yield Chunk(1)
        yield final()


def _reqs(times: list[float]) -> list[Request]:
    return [Request(t, [1, 2, 3], 1, {"i": i}) for i, t in enumerate(times)]


@pytest.mark.parametrize(
    ("times", "scale", "sends"),
    [
        ([0.0, 1.0, 3.0], 1.0, [0.0, 1.0, 3.0]),
        ([0.0, 1.0, 3.0], 0.5, [0.0, 0.5, 1.5]),
        ([0.0, 1.0, 3.0], 10.0, [0.0, 10.0, 30.0]),
        ([3.0, 0.0, 1.0], 1.0, [3.0, 0.0, 1.0]),  # unsorted input: sent by time, results in order
        ([2.0, 2.0, 2.0], 1.0, [2.0, 2.0, 2.0]),  # simultaneous arrivals
    ],
)
async def test_requests_are_sent_at_their_scaled_arrival_times(
    times: list[float], scale: float, sends: list[float]
) -> None:
    clock = FakeClock()
    client = RecordingClient(clock)
    results = await replay(
        _reqs(times), client, time_scale=scale, clock=clock, request_id_prefix="x"
    )
    assert [r.index for r in results] == [0, 1, 2]
    assert [r.meta["i"] for r in results] == [0, 1, 2]
    assert [r.scheduled_s for r in results] == pytest.approx(sends)
    assert [client.sent[f"x-{i}"] for i in range(3)] == pytest.approx(sends)
    assert all(r.send_lag_s == pytest.approx(0.0) for r in results)
    assert all(r.ok for r in results)


async def test_ttft_and_inter_token_gaps_follow_the_stream() -> None:
    clock = FakeClock()

    class Streaming:
        async def generate(self, request: Request, request_id: str) -> AsyncIterator[Chunk | Final]:
            clock.advance(0.1)
            yield Chunk(1)
            clock.advance(0.02)
            yield Chunk(2)
            clock.advance(0.0)
            yield Chunk(0)  # an empty delta (e.g. a partial character) is not a token
            clock.advance(0.03)
            yield Chunk(1)
            clock.advance(0.01)
            yield final(tokens=4, cached=32, replica="replica-3")

    [r] = await replay([Request(0.5, [1] * 40, 4)], Streaming(), clock=clock)
    assert r.ttft_s == pytest.approx(0.1)
    assert r.gaps_s == pytest.approx([0.02, 0.03])
    assert r.output_tokens == 4
    assert r.itl_mean_s == pytest.approx(0.05 / 3)
    assert r.e2e_s == pytest.approx(0.16)
    assert (r.cached_prompt_tokens, r.replica_id, r.prompt_tokens) == (32, "replica-3", 3)


async def test_concurrency_cap_delays_sends_and_counts_the_delay_as_latency() -> None:
    clock = FakeClock()
    gates: dict[str, asyncio.Event] = {}
    two_open = asyncio.Event()
    sent: dict[str, float] = {}

    class Gated:
        async def generate(self, request: Request, request_id: str) -> AsyncIterator[Chunk | Final]:
            sent[request_id] = clock.now() - clock.start
            gate = gates.setdefault(request_id, asyncio.Event())
            if len(sent) == 2:
                two_open.set()
            if len(sent) > 2:
                gate.set()
            await gate.wait()
            yield Chunk(1)
            yield final()

    task = asyncio.create_task(
        replay(_reqs([0.0, 0.0, 0.0]), Gated(), max_in_flight=2, clock=clock, request_id_prefix="g")
    )
    await two_open.wait()
    assert set(sent) == {"g-0", "g-1"}  # the third waits for a slot
    clock.advance(5.0)
    gates["g-0"].set()
    gates["g-1"].set()
    results = await task
    assert sent["g-2"] == pytest.approx(5.0)
    assert [r.send_lag_s for r in results] == pytest.approx([0.0, 0.0, 5.0])
    # TTFT counts from the scheduled arrival: the wait for a slot is not hidden.
    assert [r.ttft_s for r in results] == pytest.approx([5.0, 5.0, 5.0])


class Failing:
    def __init__(self, mode: str) -> None:
        self.mode = mode

    async def generate(self, request: Request, request_id: str) -> AsyncIterator[Chunk | Final]:
        yield Chunk(1)
        if self.mode == "grpc":
            raise RequestError("RESOURCE_EXHAUSTED", "queue full")
        if self.mode == "bug":
            raise ValueError("boom")
        # "truncated": the stream ends without a completion


@pytest.mark.parametrize(
    ("mode", "outcome", "error"),
    [
        ("grpc", "RESOURCE_EXHAUSTED", "queue full"),
        ("bug", "client_error", "ValueError: boom"),
        ("truncated", "incomplete", "stream ended without a completion"),
    ],
)
async def test_failures_are_recorded_not_raised(mode: str, outcome: str, error: str) -> None:
    results = await replay(_reqs([0.0, 1.0]), Failing(mode), clock=FakeClock())
    assert [r.outcome for r in results] == [outcome, outcome]
    assert results[0].error == error
    assert not results[0].ok
    assert results[0].e2e_s is None


async def test_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="time_scale"):
        await replay([], RecordingClient(FakeClock()), time_scale=0)
    with pytest.raises(ValueError, match="max_in_flight"):
        await replay([], RecordingClient(FakeClock()), max_in_flight=0)


async def test_progress_lines() -> None:
    out = io.StringIO()
    clock = FakeClock()
    progress = Progress("t", 3, stream=out, interval_s=0.0)
    await replay(_reqs([0, 1, 2]), RecordingClient(clock), clock=clock, progress=progress)
    lines = out.getvalue().splitlines()
    assert lines[-1].startswith("[t] [########################] 3/3 done, 3 sent, 0 open, 0 failed")
