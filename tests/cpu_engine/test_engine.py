"""The threaded CPU engine on the weightless model: queue bound, cancellation, delivery, stop."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Sequence

import pytest
import torch

from llmmesh.cpu_engine.engine import CpuEngine, EngineStoppedError, QueueFullError
from llmmesh.cpu_engine.scheduler import (
    CpuRequest,
    RequestRejectedError,
    StepResult,
    TokenOutput,
)
from llmmesh.cpu_engine.settings import CpuEngineSettings
from tests.cpu_engine.fakes import FakeBatchModel, expected, req


class RecordingSink:
    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.outputs: list[TokenOutput] = []
        self.errors: list[str] = []
        self.cancelled = False
        self.cancel_requested = False
        self.raise_on_token = False
        self.done = threading.Event()

    def on_token(self, output: TokenOutput) -> None:
        self.outputs.append(output)
        if output.token_id is not None:
            self.tokens.append(output.token_id)
        if output.finished:
            self.done.set()
        if self.raise_on_token:
            raise RuntimeError("client gone")

    def on_error(self, message: str) -> None:
        self.errors.append(message)
        self.done.set()

    def on_cancelled(self) -> None:
        self.cancelled = True
        self.done.set()

    def is_cancelled(self) -> bool:
        return self.cancel_requested


def engine(
    *, max_batch_size: int = 8, max_queue_size: int = 64
) -> tuple[CpuEngine, FakeBatchModel]:
    model = FakeBatchModel()
    settings = CpuEngineSettings(
        max_seq_len=256,
        kv_token_budget=4096,
        max_batch_size=max_batch_size,
        max_queue_size=max_queue_size,
    )
    # Virtual time: 1 s passes per clock read, so every iteration checks cancellations.
    clock = itertools.count(start=1, step=10**9)
    return CpuEngine(settings, model, kv_block_tokens=16, clock_ns=lambda: next(clock)), model


def drain(e: CpuEngine, limit: int = 10_000) -> None:
    for _ in range(limit):
        if e.run_once() is None:
            return
    raise AssertionError("engine did not go idle")


def test_requests_complete_through_the_sinks() -> None:
    e, _ = engine()
    sinks = {rid: RecordingSink() for rid in ("a", "b")}
    e.submit(req("a", [1, 2, 3], 5), sinks["a"])
    e.submit(req("b", [4, 5], 7), sinks["b"])
    drain(e)
    assert sinks["a"].tokens == expected([1, 2, 3], 5)
    assert sinks["b"].tokens == expected([4, 5], 7)
    assert all(s.done.is_set() and not s.errors for s in sinks.values())


def test_a_full_queue_rejects_with_a_clear_error_and_frees_up() -> None:
    e, _ = engine(max_batch_size=1, max_queue_size=2)
    for rid in ("a", "b"):
        e.submit(req(rid, [1], 3), RecordingSink())
    with pytest.raises(QueueFullError, match=r"RESOURCE_EXHAUSTED.*max_queue_size=2"):
        e.submit(req("c", [1], 3), RecordingSink())
    assert e.metrics().waiting == 2
    e.run_once()  # a is admitted: one place in the queue again
    e.submit(req("c", [1], 3), RecordingSink())
    with pytest.raises(QueueFullError):
        e.submit(req("d", [1], 3), RecordingSink())
    drain(e)
    assert e.metrics().waiting == 0


def test_requests_taken_from_the_inbox_still_count_against_the_queue_bound() -> None:
    e, _ = engine(max_batch_size=1, max_queue_size=1)
    e.submit(req("a", [1], 3), RecordingSink())
    submit = e.scheduler.submit
    refused: list[Exception] = []
    other = req("b", [1], 3)

    def submit_racing(req: CpuRequest, now_ns: int | None = None) -> None:
        # Another thread's submit while `a` is between the inbox and the scheduler's queue.
        try:
            e.submit(other, RecordingSink())
        except QueueFullError as exc:
            refused.append(exc)
        submit(req, now_ns)

    e.scheduler.submit = submit_racing  # type: ignore[method-assign]
    e.run_once()
    assert len(refused) == 1


def test_invalid_requests_are_rejected_at_submit() -> None:
    e, _ = engine()
    with pytest.raises(RequestRejectedError, match="max_seq_len"):
        e.submit(req("a", [1] * 200, 100), RecordingSink())


def test_cancellation_frees_the_slot_and_ends_the_stream() -> None:
    e, model = engine(max_batch_size=1)
    a, b = RecordingSink(), RecordingSink()
    e.submit(req("a", [1, 2], 100), a)
    e.submit(req("b", [3], 2), b)
    e.run_once()
    e.run_once()
    a.cancel_requested = True
    drain(e)
    assert a.cancelled
    assert not a.errors
    assert not any(o.finished for o in a.outputs)
    assert "a" in model.removed
    assert b.tokens == expected([3], 2)


@pytest.mark.parametrize("max_tokens", [50, 1])  # the failing send: mid-stream, or the final
def test_a_sink_that_raises_gets_its_request_ended_with_an_error(max_tokens: int) -> None:
    e, model = engine()
    a, b = RecordingSink(), RecordingSink()
    a.raise_on_token = True
    e.submit(req("a", [1, 2], max_tokens), a)
    e.submit(req("b", [3], 4), b)
    drain(e)
    assert len(a.outputs) == 1
    # Ended by an error, not left waiting (a failed final) nor cut as if cancelled.
    assert [m.startswith("internal error") for m in a.errors] == [True]
    assert not a.cancelled
    assert "a" in model.removed
    assert b.tokens == expected([3], 4)


def test_the_engine_thread_serves_and_stop_ends_what_is_left() -> None:
    e, _ = engine(max_batch_size=2)
    e.start()
    done = RecordingSink()
    e.submit(req("a", [1, 2, 3], 4), done)
    assert done.done.wait(30), "the engine thread did not finish the request"
    assert done.tokens == expected([1, 2, 3], 4)
    e.stop()
    with pytest.raises(EngineStoppedError):
        e.submit(req("b", [1], 2), RecordingSink())


def test_an_iteration_that_raises_ends_its_requests_and_the_engine_goes_on() -> None:
    """What the failed iteration did to its requests is unknown: they end with an error, their
    slots freed, and the next request is served (not the same failure again and again)."""
    e, _ = engine()
    step = e.scheduler.step
    calls = 0

    def failing_step() -> StepResult:
        nonlocal calls
        calls += 1
        if calls == 2:  # a decodes, b is prefilled
            raise RuntimeError("CUDA error: an illegal memory access")
        return step()

    e.scheduler.step = failing_step  # type: ignore[method-assign]
    a, b = RecordingSink(), RecordingSink()
    e.submit(req("a", [1, 2], 50), a)
    e.run_once()
    e.submit(req("b", [3], 50), b)
    e.start()
    try:
        for sink in (a, b):
            assert sink.done.wait(30), "a request was left without an ending"
            assert len(sink.errors) == 1
            assert "engine iteration failed" in sink.errors[0]
        c = RecordingSink()
        e.submit(req("c", [4, 5], 3), c)
        assert c.done.wait(30)
        assert (c.tokens, c.errors) == (expected([4, 5], 3), [])
    finally:
        e.stop()


def test_a_request_the_scheduler_fails_to_take_ends_alone() -> None:
    """Taken from the inbox with others: its failure ends it with an error, the others run."""
    e, _ = engine()
    submit = e.scheduler.submit

    def failing(request: CpuRequest, arrival_ns: int | None = None) -> None:
        if request.request_id == "b":
            raise RuntimeError("a bug")
        submit(request, arrival_ns)

    e.scheduler.submit = failing  # type: ignore[method-assign, assignment]
    sinks = {rid: RecordingSink() for rid in "abc"}
    for i, (rid, sink) in enumerate(sinks.items()):
        e.submit(req(rid, [i + 1], 3), sink)
    drain(e)
    assert sinks["b"].errors == ["internal error: RuntimeError('a bug')"]
    assert (sinks["a"].tokens, sinks["c"].tokens) == (expected([1], 3), expected([3], 3))


def test_stop_errors_requests_in_flight() -> None:
    e, _ = engine()
    a = RecordingSink()
    e.submit(req("a", [1], 50), a)
    e.run_once()
    e.stop()
    assert a.errors == ["engine stopped"]


def test_a_stop_that_times_out_still_ends_what_is_left_when_the_iteration_does() -> None:
    e, model = engine()
    in_step, release = threading.Event(), threading.Event()
    prefill = model.prefill

    def slow_prefill(seq_id: str, prompt_ids: Sequence[int]) -> torch.Tensor:
        in_step.set()
        assert release.wait(30)
        return prefill(seq_id, prompt_ids)

    model.prefill = slow_prefill  # type: ignore[method-assign]
    e.start()
    a = RecordingSink()
    e.submit(req("a", [1], 50), a)
    assert in_step.wait(30)
    e.stop(timeout_s=0.01)  # the iteration outlasts the stop's wait
    assert not a.done.is_set()
    release.set()
    assert a.done.wait(30), "the request was left without an ending"
    assert a.errors == ["engine stopped"]
