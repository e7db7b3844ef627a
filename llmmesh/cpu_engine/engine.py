"""The CPU engine: a `BatchScheduler` driven by one background thread.

Threads: callers (`submit`, `metrics`, `stop`) only touch an inbox and a metrics snapshot under a
lock, so they never wait for a forward pass; the engine thread owns the scheduler and the model.
Each iteration: move the inbox into the scheduler, check cancellations (every
`cancellation_check_period_ms`), run one step, then hand every output to its request's sink (on
the engine thread, so a request's callbacks never reorder). A sink that raises gets its request
cancelled. Invariant: requests waiting (inbox + scheduler queue) never exceed `max_queue_size`.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import deque
from collections.abc import Callable

from llmmesh.cpu_engine.scheduler import (
    BatchModel,
    BatchScheduler,
    CpuRequest,
    RequestRejectedError,
    SchedulerConfig,
    StepResult,
    TokenOutput,
)
from llmmesh.cpu_engine.settings import CpuEngineSettings
from llmmesh.triton.inflight import (
    CancellationPoll,
    call_sink,
    cancelled_requests,
    check_queue_room,
    fail_all,
    fail_sink,
    withdraw_all,
)
from llmmesh.triton.inflight import QueueFullError as QueueFullError
from llmmesh.triton.inflight import RequestSink as _RequestSink
from llmmesh.triton.trtllm_io import EngineMetrics

log = logging.getLogger(__name__)


class EngineStoppedError(RequestRejectedError):
    """The engine is stopping and takes no new requests."""


#: Where one request's results go (`llmmesh.triton.inflight.RequestSink`).
RequestSink = _RequestSink[TokenOutput]


class CpuEngine:
    def __init__(
        self,
        settings: CpuEngineSettings,
        model: BatchModel,
        *,
        kv_block_tokens: int,
        clock_ns: Callable[[], int] = time.monotonic_ns,
    ) -> None:
        self.settings = settings
        self.scheduler = BatchScheduler(
            SchedulerConfig(
                max_batch_size=settings.max_batch_size,
                max_seq_len=settings.max_seq_len,
                max_prefill_tokens=settings.max_prefill_tokens,
                kv_token_budget=settings.kv_token_budget,
                kv_block_tokens=kv_block_tokens,
            ),
            model,
            clock_ns=clock_ns,
        )
        self._clock_ns = clock_ns
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._inbox: deque[tuple[CpuRequest, RequestSink, int]] = deque()
        self._queued = 0  # scheduler.num_waiting as of the engine thread's last update
        self._sinks: dict[str, RequestSink] = {}  # engine thread only
        self._metrics = self.scheduler.metrics()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._cancel_poll = CancellationPoll(settings.cancellation_check_period_ms)

    # ----------------------------------------------------------------- lifecycle
    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("engine already started")
        self._thread = threading.Thread(target=self._run, name="cpu-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop after the current iteration; requests still in flight end with an error."""
        with self._wake:
            self._stopping = True
            self._wake.notify_all()
        if self._thread is None:
            self._end_left()
            return
        # The engine thread ends what is left as it exits (it owns the sinks): after this
        # timeout too, when its last iteration outlasts it.
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            log.error("engine thread did not stop within %.1fs", timeout_s)

    def _end_left(self) -> None:
        """Every request queued or in flight ends with an error (the engine is stopping)."""
        with self._lock:
            left = [sink for _, sink, _ in self._inbox]
            self._inbox.clear()
        left.extend(self._sinks.values())
        self._sinks.clear()
        fail_all(left, "engine stopped")

    # ----------------------------------------------------------------- requests
    def submit(self, request: CpuRequest, sink: RequestSink) -> None:
        """Queue a request. Raises `RequestRejectedError` (invalid, can never fit),
        `QueueFullError` or `EngineStoppedError`."""
        # Limits are checked here, in the caller's thread; the duplicate-id check is repeated at
        # intake on the engine thread, which owns the scheduler.
        self.scheduler.validate(request)
        with self._wake:
            if self._stopping:
                raise EngineStoppedError("engine is stopping")
            check_queue_room(len(self._inbox) + self._queued, self.settings.max_queue_size)
            self._inbox.append((request, sink, self._clock_ns()))
            self._wake.notify_all()

    def metrics(self) -> EngineMetrics:
        """The nv_trt_llm_* gauge values as of the last iteration (plus the inbox)."""
        with self._lock:
            m = self._metrics
            inbox = len(self._inbox)
        return dataclasses.replace(m, waiting=m.waiting + inbox) if inbox else m

    # ----------------------------------------------------------------- loop
    def run_once(self) -> StepResult | None:
        """One iteration on the calling thread (the engine thread, or a test that never
        started it): intake, cancellation check, step, delivery. None when idle."""
        self._intake()
        self._check_cancellations()
        if not self.scheduler.has_work:
            self._publish()
            return None
        result = self.scheduler.step()
        self._publish()
        self._deliver(result)
        return result

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._stopping and not self._inbox and not self.scheduler.has_work:
                    self._wake.wait()
                if self._stopping:
                    break
            try:
                self.run_once()
            except Exception as exc:
                log.exception("engine iteration failed")
                self._fail_in_flight(exc)
        self._end_left()

    def _fail_in_flight(self, exc: Exception) -> None:
        """An iteration raised: the requests in flight end with an error, their slots freed
        (what it did to them is unknown: one it finished may have lost its final output). The
        engine goes on with the requests that come next, rather than failing the same
        iteration again and again, or leaving a stream with no final response."""
        left = withdraw_all(self._sinks, self.scheduler.cancel)
        fail_all(left, f"internal error: engine iteration failed: {exc!r}")

    def _intake(self) -> None:
        with self._lock:
            batch = list(self._inbox)
            self._inbox.clear()
            # Counted as queued as they leave the inbox, under the same lock: `submit`'s bound
            # counts every request in one or the other.
            self._queued += len(batch)
        for request, sink, arrival in batch:
            try:
                self.scheduler.submit(request, arrival)
            except RequestRejectedError as exc:  # e.g. a duplicate request id
                call_sink(sink.on_error, str(exc))
                continue
            except Exception as exc:  # out of the inbox, in no table: it must be ended here
                log.exception("submitting request %s failed", request.request_id)
                call_sink(sink.on_error, f"internal error: {exc!r}")
                continue
            self._sinks[request.request_id] = sink
        with self._lock:
            self._queued = self.scheduler.num_waiting

    def _publish(self) -> None:
        m = self.scheduler.metrics()
        with self._lock:
            self._metrics = m
            self._queued = self.scheduler.num_waiting

    def _deliver(self, result: StepResult) -> None:
        for rid, message in result.failed:
            sink = self._sinks.pop(rid, None)
            if sink is not None:
                call_sink(sink.on_error, message)
        for out in result.outputs:
            sink = self._sinks.pop(out.request_id) if out.finished else self._sinks[out.request_id]
            try:
                sink.on_token(out)
            except Exception as exc:
                if not out.finished:
                    self._withdraw(out.request_id)
                fail_sink(sink, out.request_id, exc)

    def _withdraw(self, request_id: str) -> RequestSink | None:
        """Take the request out, its slot freed now: its sink (None when not in flight)."""
        sink = self._sinks.pop(request_id, None)
        self.scheduler.cancel(request_id)
        return sink

    def _cancel(self, request_id: str) -> None:
        """Free the slot now and end the stream with an empty final response."""
        sink = self._withdraw(request_id)
        if sink is not None:
            call_sink(sink.on_cancelled)

    def _check_cancellations(self) -> None:
        if not self._cancel_poll.due(self._clock_ns()):
            return
        for rid in cancelled_requests(list(self._sinks.items())):
            self._cancel(rid)
