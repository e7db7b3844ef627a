"""Open-loop replay: send each request at its arrival time (times a time-scale factor), whatever
happened to earlier ones, and capture per request: TTFT, inter-token gaps, output tokens, cached
prompt tokens, replica and outcome.

Time comes from a `Clock` (the event loop's by default) so tests can drive the scheduler on
virtual time. A concurrency cap protects the machine: when `max_in_flight` requests are open,
the next send waits for one to finish; that lag is recorded per request (`send_lag_s`) and TTFT
is measured from the *scheduled* arrival, so a late send shows up as latency instead of being
hidden (no coordinated omission).

Retrying clients (`RetryingClient`): a refused request (RESOURCE_EXHAUSTED, UNAVAILABLE) is sent
again, at most `max_retries` times, after the server's retry-after plus up to 25% jitter, or,
without one, after an exponential backoff (0.5 s doubling to 8 s, minus up to 25% jitter), as the
OpenAI SDK does by default (2 retries). Only before the first token: a stream cut after it is
not retried. TTFT still counts from the first attempt's scheduled arrival; every refusal is kept
on the result (`refusals`: code and the retry-after it carried).
"""

from __future__ import annotations

import asyncio
import math
import random
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TextIO

from bench.workloads import Meta, Request


@dataclass(frozen=True, slots=True)
class Chunk:
    """Some output tokens arrived."""

    tokens: int


@dataclass(frozen=True, slots=True)
class Final:
    """The request completed; usage as reported by the gateway."""

    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int
    replica_id: str
    queue_ms: float = 0.0
    finish_reason: str = ""


@dataclass(frozen=True, slots=True)
class Refused:
    """An attempt was refused and will be retried (RetryingClient); `retry_after_s` as the
    server sent it (None: none)."""

    code: str
    retry_after_s: float | None


class RequestError(Exception):
    """The request failed; `code` is the gRPC status name (e.g. RESOURCE_EXHAUSTED),
    `retry_after_s` the server's retry-after (None: none sent)."""

    def __init__(self, code: str, message: str = "", retry_after_s: float | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.retry_after_s = retry_after_s


class Client(Protocol):
    def generate(
        self, request: Request, request_id: str
    ) -> AsyncIterator[Chunk | Final | Refused]: ...


RETRIED_CODES = frozenset({"RESOURCE_EXHAUSTED", "UNAVAILABLE"})


class RetryingClient:
    """`inner` with the OpenAI SDK's retry policy (module docstring); `rng` and `sleep` are
    injectable for tests."""

    def __init__(
        self,
        inner: Client,
        *,
        max_retries: int = 2,
        rng: random.Random | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.inner = inner
        self.max_retries = max_retries
        self._rng = rng or random.Random(0)
        self._sleep = sleep

    def delay_s(self, retry: int, retry_after_s: float | None) -> float:
        """Wait before retry number `retry` (0-based)."""
        if retry_after_s is not None and 0 <= retry_after_s <= 60:
            return retry_after_s * (1 + 0.25 * self._rng.random())
        backoff: float = min(0.5 * 2.0**retry, 8.0)
        return backoff * (1 - 0.25 * self._rng.random())

    async def generate(
        self, request: Request, request_id: str
    ) -> AsyncIterator[Chunk | Final | Refused]:
        retry = 0
        while True:
            started = False
            try:
                async for event in self.inner.generate(request, request_id):
                    started = started or isinstance(event, Chunk)
                    yield event
                return
            except RequestError as exc:
                if started or exc.code not in RETRIED_CODES or retry >= self.max_retries:
                    raise
                yield Refused(exc.code, exc.retry_after_s)
                await self._sleep(self.delay_s(retry, exc.retry_after_s))
                retry += 1


class Clock(Protocol):
    def now(self) -> float: ...

    async def sleep_until(self, deadline: float) -> None: ...


class LoopClock:
    """The running event loop's monotonic clock."""

    def now(self) -> float:
        return asyncio.get_running_loop().time()

    async def sleep_until(self, deadline: float) -> None:
        delay = deadline - self.now()
        if delay > 0:
            await asyncio.sleep(delay)


@dataclass
class Result:
    index: int
    request_id: str
    scheduled_s: float  # arrival time in the run (after the time scale), from the run's start
    send_lag_s: float  # actual send - scheduled (event-loop lag, concurrency cap)
    ttft_s: float | None  # scheduled arrival -> first token
    itl_mean_s: float | None  # (last token - first token) / (tokens - 1)
    e2e_s: float | None  # scheduled arrival -> completion
    output_tokens: int
    prompt_tokens: int
    cached_prompt_tokens: int = 0
    replica_id: str = ""
    queue_ms: float = 0.0
    outcome: str = "ok"  # "ok", a gRPC status name, "incomplete" or "client_error"
    error: str = ""
    # Every refusal of the request, retried or final: (gRPC code, the retry-after it carried).
    refusals: list[tuple[str, float | None]] = field(default_factory=list)
    gaps_s: list[float] = field(default_factory=list)  # between consecutive token chunks
    meta: Meta = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.outcome == "ok"


class Progress:
    """One status line on stderr: rewritten in place on a terminal, printed every
    `interval_s` otherwise. Wall-clock rate limited; never used for synchronisation."""

    def __init__(
        self,
        label: str,
        total: int,
        *,
        stream: TextIO = sys.stderr,
        interval_s: float | None = None,
    ) -> None:
        self.label = label
        self.total = total
        self.stream = stream
        self.tty = stream.isatty()
        self.interval_s = interval_s if interval_s is not None else (0.25 if self.tty else 10.0)
        self._last = -math.inf
        self._start = time.monotonic()

    def update(
        self, sent: int, done: int, errors: int, in_flight: int, *, final: bool = False
    ) -> None:
        now = time.monotonic()
        if not final and now - self._last < self.interval_s:
            return
        self._last = now
        width = 24
        filled = int(width * done / self.total) if self.total else width
        bar = "#" * filled + "." * (width - filled)
        line = (
            f"[{self.label}] [{bar}] {done}/{self.total} done, {sent} sent, "
            f"{in_flight} open, {errors} failed, {now - self._start:.0f}s"
        )
        if self.tty:
            self.stream.write("\r\x1b[2K" + line + ("\n" if final else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


async def replay(
    requests: Sequence[Request],
    client: Client,
    *,
    time_scale: float = 1.0,
    max_in_flight: int = 512,
    clock: Clock | None = None,
    progress: Progress | None = None,
    request_id_prefix: str = "bench",
) -> list[Result]:
    """Send every request at `start + arrival_s * time_scale`; results in `requests` order."""
    if time_scale <= 0:
        raise ValueError("time_scale must be positive")
    if max_in_flight <= 0:
        raise ValueError("max_in_flight must be positive")
    clk = clock or LoopClock()
    slots = asyncio.Semaphore(max_in_flight)
    results: list[Result | None] = [None] * len(requests)
    counts = {"sent": 0, "done": 0, "errors": 0}
    tasks: set[asyncio.Task[None]] = set()

    def tick(final: bool = False) -> None:
        if progress is not None:
            progress.update(
                counts["sent"],
                counts["done"],
                counts["errors"],
                counts["sent"] - counts["done"],
                final=final,
            )

    async def one(index: int, start: float, scheduled: float) -> None:
        req = requests[index]
        due = start + scheduled
        res = Result(
            index=index,
            request_id=f"{request_id_prefix}-{index}",
            scheduled_s=scheduled,
            send_lag_s=clk.now() - due,
            ttft_s=None,
            itl_mean_s=None,
            e2e_s=None,
            output_tokens=0,
            prompt_tokens=req.prompt_tokens,
            meta=dict(req.meta),
        )
        first = last = math.nan
        final: Final | None = None
        try:
            async for event in client.generate(req, res.request_id):
                if isinstance(event, Refused):
                    res.refusals.append((event.code, event.retry_after_s))
                elif isinstance(event, Chunk):
                    if event.tokens <= 0:
                        continue
                    t = clk.now()
                    if res.output_tokens == 0:
                        first = t
                        res.ttft_s = t - due
                    else:
                        res.gaps_s.append(t - last)
                    last = t
                    res.output_tokens += event.tokens
                else:
                    final = event
            if final is None:
                res.outcome, res.error = "incomplete", "stream ended without a completion"
            else:
                res.e2e_s = clk.now() - due
                res.cached_prompt_tokens = final.cached_prompt_tokens
                res.replica_id = final.replica_id
                res.queue_ms = final.queue_ms
                res.prompt_tokens = final.prompt_tokens or res.prompt_tokens
                if res.output_tokens > 1:
                    res.itl_mean_s = (last - first) / (res.output_tokens - 1)
        except RequestError as exc:
            res.outcome, res.error = exc.code, exc.message
            if exc.code in RETRIED_CODES and res.output_tokens == 0:
                res.refusals.append((exc.code, exc.retry_after_s))
        except Exception as exc:  # a client bug must not stop the run; it is counted
            res.outcome, res.error = "client_error", f"{type(exc).__name__}: {exc}"
        finally:
            slots.release()
            results[index] = res
            counts["done"] += 1
            if not res.ok:
                counts["errors"] += 1
            tick()

    start = clk.now()
    order = sorted(range(len(requests)), key=lambda i: requests[i].arrival_s)
    for i in order:
        scheduled = requests[i].arrival_s * time_scale
        await clk.sleep_until(start + scheduled)
        await slots.acquire()
        counts["sent"] += 1
        task = asyncio.create_task(one(i, start, scheduled))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        tick()
    while tasks:
        await asyncio.gather(*list(tasks))
    tick(final=True)
    out = [r for r in results if r is not None]
    assert len(out) == len(requests)
    return out
