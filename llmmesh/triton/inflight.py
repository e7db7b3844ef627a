"""Request bookkeeping shared by the engines behind the `tensorrt_llm` model (the emulator and the
CPU engine): the sink protocol, sink calls that never raise, cancellation polling, and the
waiting queue / running set of an iteration-level scheduler. What a request costs and how a step
runs stay with each engine.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any, Generic, Protocol, TypeVar

log = logging.getLogger(__name__)

O_contra = TypeVar("O_contra", contravariant=True)
S = TypeVar("S")


class RequestRejectedError(ValueError):
    """The request is invalid or can never run on this engine."""


class QueueFullError(RequestRejectedError):
    """The engine's waiting queue is at its bound (TensorRT-LLM's `max_queue_size`): the request
    is refused at once and may be retried later or on another replica. The message starts with
    `RESOURCE_EXHAUSTED`, which the gateway's fault classification reads as back-pressure."""

    def __init__(self, waiting: int, max_queue_size: int) -> None:
        super().__init__(
            f"RESOURCE_EXHAUSTED: {waiting} requests already wait for a batch slot "
            f"(max_queue_size={max_queue_size}); retry later"
        )
        self.waiting = waiting
        self.max_queue_size = max_queue_size


def check_queue_room(waiting: int, max_queue_size: int | None) -> None:
    """Raise `QueueFullError` when `waiting` requests already fill a queue bounded at
    `max_queue_size` (None: unbounded, TensorRT-LLM's default)."""
    if max_queue_size is not None and waiting >= max_queue_size:
        raise QueueFullError(waiting, max_queue_size)


class RequestSink(Protocol[O_contra]):
    """Where one request's results go. Exactly one of on_token(finished=True), on_error or
    on_cancelled ends a request."""

    def on_token(self, output: O_contra) -> None: ...

    def on_error(self, message: str) -> None: ...

    def on_cancelled(self) -> None: ...

    def is_cancelled(self) -> bool: ...


def call_sink(fn: Callable[..., None], *args: object) -> None:
    """Call a sink callback; a failure is logged, never raised (the engine keeps serving)."""
    try:
        fn(*args)
    except Exception:
        log.exception("request sink callback failed")


def fail_sink(sink: RequestSink[Any], request_id: str, exc: Exception) -> None:
    """A request whose result could not be delivered (`on_token` raised) ends with an error,
    whatever token failed: after a failed final send nothing else would end it (the client and
    Triton would wait for ever), and a cancel's empty final would read as a normal end."""
    log.exception("sink of request %s failed; ending it", request_id)
    call_sink(sink.on_error, f"internal error: {exc}")


def withdraw_all(
    sinks: dict[str, RequestSink[Any]], cancel: Callable[[str], object]
) -> list[RequestSink[Any]]:
    """Take every request in flight out (the engine stops, or a step raised): `sinks` emptied,
    each request's slot freed by `cancel` (one that raises is logged: a failed step may have
    left it half-done, and it ends anyway). The sinks, for `fail_all` (outside the lock)."""
    left = list(sinks.items())
    sinks.clear()
    for rid, _ in left:
        try:
            cancel(rid)
        except Exception:
            log.exception("cancelling request %s failed; it ends anyway", rid)
    return [sink for _, sink in left]


def fail_all(sinks: Iterable[RequestSink[Any]], message: str) -> None:
    """End each request with `message` as its error."""
    for sink in sinks:
        call_sink(sink.on_error, message)


class CancellationPoll:
    """Paces cancellation checks: `due()` is true at most once per `period_ms`."""

    def __init__(self, period_ms: float) -> None:
        self._period_ns = int(period_ms * 1e6)
        self._next_ns = 0

    def due(self, now_ns: int) -> bool:
        if now_ns < self._next_ns:
            return False
        self._next_ns = now_ns + self._period_ns
        return True


def cancelled_requests(sinks: Iterable[tuple[str, RequestSink[Any]]]) -> list[str]:
    """Ids of the requests whose sink reports cancellation; a sink whose `is_cancelled()` raises
    counts as cancelled."""
    found: list[str] = []
    for rid, sink in sinks:
        try:
            cancelled = sink.is_cancelled()
        except Exception:
            log.exception("is_cancelled() of request %s failed; cancelling it", rid)
            cancelled = True
        if cancelled:
            found.append(rid)
    return found


class RequestQueues(ABC, Generic[S]):
    """A scheduler's first-come-first-served waiting queue and its running set, keyed by request
    id; a request is in at most one of them. Subclasses free a running request's resources in
    `_release`."""

    def __init__(self) -> None:
        self._waiting: OrderedDict[str, S] = OrderedDict()
        self._running: OrderedDict[str, S] = OrderedDict()

    @abstractmethod
    def _release(self, request_id: str) -> None:
        """Free what a running request holds (it has left the running set)."""

    @staticmethod
    def _check_lengths(prompt_len: int, max_new_tokens: int) -> None:
        if prompt_len == 0:
            raise RequestRejectedError("input_ids must hold at least one token")
        if max_new_tokens <= 0:
            raise RequestRejectedError(f"request_output_len must be positive, got {max_new_tokens}")

    def _check_not_in_flight(self, request_id: str) -> None:
        if request_id in self._waiting or request_id in self._running:
            raise RequestRejectedError(f"request id {request_id!r} is already in flight")

    def cancel(self, request_id: str) -> bool:
        """Drop a waiting or running request now; False if it is not in flight."""
        if self._waiting.pop(request_id, None) is not None:
            return True
        if self._running.pop(request_id, None) is not None:
            self._release(request_id)
            return True
        return False

    def in_flight(self) -> list[str]:
        return [*self._running, *self._waiting]

    @property
    def has_work(self) -> bool:
        return bool(self._waiting or self._running)

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)
