"""The engine: a scheduler driven by a background thread in (scaled) real time.

Each iteration: check cancellations (every `cancellation_check_period_ms`), run one scheduler step,
wait until `start + modelled_duration * time_scale`, then hand the step's tokens to the request sinks
and its KV events to `on_events`. Every sink call happens on the engine thread, so one request's
callbacks never reorder; sinks must not block for long, and a sink that raises has its request
cancelled. (A separate delivery thread was tried: under the GIL it made the Python backend slower.)
Time comes from a `Clock`, so tests can run the same loop on virtual time, or call `run_step()`
themselves without starting the thread.

Invariant: at most `max_queue_size` requests wait for a batch slot; `submit` refuses one more at
once with `QueueFullError`, as TensorRT-LLM's executor does, so a burst costs the engine a bounded
queue, never an unbounded pile-up.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Protocol

from llmmesh.accelerators import get_profile
from llmmesh.emulator.events import KvEvent
from llmmesh.emulator.kv_cache import PagedKvCache
from llmmesh.emulator.scheduler import (
    EngineMetrics,
    GenerationRequest,
    RequestRejectedError,
    Scheduler,
    SchedulerConfig,
    StepResult,
    TokenOutput,
)
from llmmesh.emulator.settings import EmulatorSettings
from llmmesh.kvblocks import BlockConfig, new_epoch
from llmmesh.triton.inflight import (
    CancellationPoll,
    call_sink,
    cancelled_requests,
    check_queue_room,
    fail_all,
    fail_sink,
    withdraw_all,
)
from llmmesh.triton.inflight import RequestSink as _RequestSink

log = logging.getLogger(__name__)


class Clock(Protocol):
    def monotonic_ns(self) -> int: ...

    def sleep(self, seconds: float) -> None: ...


class RealClock:
    def monotonic_ns(self) -> int:
        return time.monotonic_ns()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


class VirtualClock:
    """Time advances only when someone sleeps: the engine runs as fast as the CPU allows while its
    timestamps follow the cost model exactly."""

    def __init__(self, start_ns: int = 1) -> None:
        self._now = start_ns
        self._lock = threading.Lock()

    def monotonic_ns(self) -> int:
        with self._lock:
            return self._now

    def sleep(self, seconds: float) -> None:
        with self._lock:
            self._now += max(0, int(seconds * 1e9))


#: Where one request's results go (`llmmesh.triton.inflight.RequestSink`).
RequestSink = _RequestSink[TokenOutput]


EventCallback = Callable[[Sequence[KvEvent]], None]


class Engine:
    def __init__(
        self,
        settings: EmulatorSettings,
        block_config: BlockConfig,
        *,
        clock: Clock | None = None,
        on_events: EventCallback | None = None,
    ) -> None:
        self.settings = settings
        self.block_config = block_config
        self.epoch = new_epoch(time.time_ns())  # a label across processes: the wall clock's
        self.clock: Clock = clock if clock is not None else RealClock()
        self.on_events = on_events
        self.scheduler = Scheduler(
            SchedulerConfig(settings.max_batch_size, settings.max_num_tokens),
            PagedKvCache(settings.num_kv_blocks, block_config),
            get_profile(settings.cost_profile),
            settings,
            time_scale=settings.time_scale,
        )
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._sinks: dict[str, RequestSink] = {}
        # Sinks of cancelled requests, told on the engine thread after any token already
        # produced for them, so a request's callbacks never reorder.
        self._cancelled: list[RequestSink] = []
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._cancel_poll = CancellationPoll(settings.cancellation_check_period_ms)
        self._anchor_ns: int | None = None
        self._last_step_ns = 0

    # ----------------------------------------------------------------- lifecycle
    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("engine already started")
        self._thread = threading.Thread(target=self._run, name="emulator-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> bool:
        """Stop the loop, waiting at most `timeout_s` for the step in progress; requests still in
        flight end with an error. True if the engine thread has ended."""
        with self._wake:
            self._stopping = True
            self._wake.notify_all()
        ended = True
        if self._thread is not None:
            self._thread.join(timeout_s)
            ended = not self._thread.is_alive()
            if not ended:
                log.warning("engine thread did not stop within %.1fs", timeout_s)
        with self._lock:
            left = withdraw_all(self._sinks, self.scheduler.cancel)
        self._notify_cancelled()
        fail_all(left, "engine stopped")
        return ended

    # ----------------------------------------------------------------- requests
    def submit(self, request: GenerationRequest, sink: RequestSink) -> None:
        """Queue a request; raises `RequestRejectedError` if it is invalid or can never fit,
        `QueueFullError` (a subclass) when `max_queue_size` requests already wait."""
        with self._wake:
            if self._stopping:
                raise RequestRejectedError("engine is stopping")
            self.scheduler.validate(request)
            check_queue_room(self.scheduler.num_waiting, self.settings.max_queue_size)
            self.scheduler.submit(request, self.clock.monotonic_ns())
            self._sinks[request.request_id] = sink
            self._wake.notify_all()

    def cancel(self, request_id: str) -> bool:
        """Cancel now: the batch slot and KV blocks are freed at once; the sink's on_cancelled()
        runs on the engine thread. False if the request is not in flight."""
        with self._wake:
            sink = self._withdraw(request_id)
            if sink is None:
                return False
            self._cancelled.append(sink)
            self._wake.notify_all()
        return True

    def _withdraw(self, request_id: str) -> RequestSink | None:
        """Take the request out: its sink (None when not in flight), its slot and KV blocks
        freed. The caller holds the lock."""
        sink = self._sinks.pop(request_id, None)
        if sink is not None:
            self.scheduler.cancel(request_id)
        return sink

    def metrics(self) -> EngineMetrics:
        with self._lock:
            return self.scheduler.metrics()

    def snapshot(self) -> list[KvEvent]:
        """Cleared + stored events for every cached block, numbered in this epoch's sequence."""
        with self._lock:
            return self.scheduler.cache.snapshot()

    # ----------------------------------------------------------------- loop
    def run_step(self) -> StepResult | None:
        """One iteration: cancellation check, step, wait, delivery. None when idle."""
        self._check_cancellations()
        self._notify_cancelled()
        now = self.clock.monotonic_ns()
        # Pace against the previous step's deadline, so the time spent delivering its tokens
        # counts towards this step (up to one step's worth; beyond that the engine runs late).
        anchor = self._anchor_ns
        start = anchor if anchor is not None and 0 <= now - anchor <= self._last_step_ns else now
        with self._lock:
            if not self.scheduler.has_work:
                self._anchor_ns = None
                return None
            result = self.scheduler.step(start)
        self._last_step_ns = int(result.duration_s * self.settings.time_scale * 1e9)
        deadline = start + self._last_step_ns
        remaining = deadline - self.clock.monotonic_ns()
        if remaining > 0:
            self.clock.sleep(remaining / 1e9)
        self._anchor_ns = deadline
        self._deliver(result)
        self._notify_cancelled()
        return result

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._stopping and not self.scheduler.has_work and not self._cancelled:
                    self._wake.wait()
                if self._stopping:
                    return
            try:
                self.run_step()
            except Exception as exc:
                log.exception("engine step failed")
                self._fail_in_flight(exc)

    def _fail_in_flight(self, exc: Exception) -> None:
        """A step raised: the requests in flight end with an error, their slots and KV blocks
        freed (what the step did to them is unknown: one it finished may have lost its final
        output). The engine goes on with the requests that come next, rather than failing
        the same step again and again, or leaving a stream with no final response."""
        with self._lock:
            left = withdraw_all(self._sinks, self.scheduler.cancel)
        fail_all(left, f"internal error: engine step failed: {exc!r}")

    def _deliver(self, result: StepResult) -> None:
        with self._lock:
            targets: list[tuple[TokenOutput, RequestSink]] = []
            for out in result.outputs:
                sink = (
                    self._sinks.pop(out.request_id, None)
                    if out.finished
                    else self._sinks.get(out.request_id)
                )
                if sink is not None:  # None: cancelled while the step ran
                    targets.append((out, sink))
        for out, sink in targets:
            try:
                sink.on_token(out)
            except Exception as exc:
                if not out.finished:
                    with self._wake:
                        self._withdraw(out.request_id)
                fail_sink(sink, out.request_id, exc)
        if result.events and self.on_events is not None:
            try:
                self.on_events(result.events)
            except Exception:
                log.exception("KV event callback failed")

    def _notify_cancelled(self) -> None:
        with self._lock:
            sinks, self._cancelled = self._cancelled, []
        for sink in sinks:
            call_sink(sink.on_cancelled)

    def _check_cancellations(self) -> None:
        if not self._cancel_poll.due(self.clock.monotonic_ns()):
            return
        with self._lock:
            sinks = list(self._sinks.items())
        for rid in cancelled_requests(sinks):
            self.cancel(rid)
