"""One engine replica on virtual time: the emulator's own `Scheduler` (iteration-level batching,
FCFS admission, the paged KV cache with prefix reuse and its event stream, the accelerator cost
model), stepped from the virtual-time loop.

An iteration that admits a request runs as `Scheduler.step()`. A stretch of iterations that can
admit nothing (empty queue, or a queue head that cannot fit until a sequence finishes) runs as
one `Scheduler.decode_steps()` up to the next finishing sequence: one loop event instead of one
per token. Such a stretch is planned when it starts and committed lazily, so a request that
arrives in the middle of it (and could be admitted) ends it at the first iteration boundary after
its arrival, exactly where `step()` would have admitted it.

Invariants:
- Every iteration starts when the previous one ends (the engine is never idle with work) or, when
  idle, at the submission that gives it work.
- A request's first token is delivered at the end of its prefill iteration, its completion at the
  end of its last decode iteration; both through the loop at those virtual times.
- KV events reach `on_events` in the order the cache numbered them (gap-free per epoch).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from llmmesh.accelerators import CostProfile
from llmmesh.common.engine_metrics import EngineSample
from llmmesh.emulator.events import KvEvent
from llmmesh.emulator.kv_cache import PagedKvCache
from llmmesh.emulator.scheduler import (
    EngineMetrics,
    GenerationRequest,
    Scheduler,
    SchedulerConfig,
    StepResult,
    TokenOutput,
)
from llmmesh.kvblocks import BlockConfig, new_epoch
from llmmesh.triton.inflight import check_queue_room

NS = 1_000_000_000


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """The emulator settings of one replica (LLMMESH_EMULATOR_*), and its cost profile."""

    cost: CostProfile
    max_batch_size: int = 64
    max_num_tokens: int = 8192
    num_kv_blocks: int = 12800
    block_size: int = 32
    vocab_min: int = 100
    vocab_max: int = 49152
    time_scale: float = 1.0  # LLMMESH_EMULATOR_TIME_SCALE: wall seconds per modelled second
    max_queue_size: int | None = 128  # LLMMESH_EMULATOR_MAX_QUEUE_SIZE (None: unbounded)
    # LLMMESH_EMULATOR_METRICS_INTERVAL_MS: the backend copies the engine's statistics into its
    # gauges this often, so a scrape reads them up to this old; None: a scrape reads the
    # engine's state now (no timer per engine, for large clusters).
    gauge_period_s: float | None = None


@dataclass(slots=True)
class Tracked:
    """Per-request timeline (virtual seconds) and what the engine reports at completion."""

    submitted_s: float
    first_token_s: float | None = None
    finished_s: float | None = None
    output_tokens: int = 0
    reused_blocks: int = 0


class _Run:
    """A planned stretch of decode-only iterations: start time and cumulative end times."""

    __slots__ = ("ends", "start")

    def __init__(self, start: float, durations: Sequence[float] | npt.NDArray[np.float64]) -> None:
        self.start = start
        self.ends: npt.NDArray[np.float64] = np.cumsum(np.concatenate(([start], durations)))[1:]

    @classmethod
    def scaled(cls, start: float, durations: Sequence[float], scale: float) -> _Run:
        return cls(start, durations if scale == 1.0 else np.asarray(durations) * scale)

    def started_before(self, t: float) -> int:
        """Iterations that started before `t` (the first starts at `start`)."""
        return 1 + int(np.searchsorted(self.ends[:-1], t, side="left"))

    def ended_by(self, t: float) -> int:
        return int(np.searchsorted(self.ends, t, side="right"))

    @property
    def end(self) -> float:
        return float(self.ends[-1])


EventSink = Callable[[Sequence[KvEvent]], None]
Done = Callable[[str, Tracked], None]


class SimEngine:
    def __init__(
        self,
        replica_id: str,
        config: EngineConfig,
        loop: asyncio.AbstractEventLoop,
        *,
        on_events: EventSink | None = None,
        on_first_token: Done | None = None,
        on_finished: Done | None = None,
    ) -> None:
        self.replica_id = replica_id
        self.config = config
        self.epoch = new_epoch(time.time_ns())  # a label (the registry orders lifetimes by it)
        self.block_config = BlockConfig(config.block_size)
        self.scheduler = Scheduler(
            SchedulerConfig(config.max_batch_size, config.max_num_tokens),
            PagedKvCache(config.num_kv_blocks, self.block_config),
            config.cost,
            config,
            time_scale=config.time_scale,
        )
        self._loop = loop
        self._scale = config.time_scale
        self._on_events = on_events
        self._on_first = on_first_token
        self._on_finished = on_finished
        self._tracked: dict[str, Tracked] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._busy_until = 0.0  # end of the iteration in progress (or of the planned run)
        self._step: StepResult | None = None  # an admitting iteration in progress
        self._run: _Run | None = None  # a planned decode-only stretch in progress
        self._blocked = False  # the queue head cannot be admitted until a sequence finishes
        self._version = 0  # bumped by every change of the scheduler's state
        self._read_cache: tuple[int, EngineSample] | None = None
        self._gauges: EngineSample | None = None
        self._gauge_timer: asyncio.TimerHandle | None = None
        if config.gauge_period_s is not None:
            self._copy_gauges()
        self.iterations = 0
        self.busy_s = 0.0

    # ---------------------------------------------------------------------------- requests
    def submit(self, req: GenerationRequest) -> Tracked:
        """Queue a request now; raises `RequestRejectedError` if it could never run, or its
        `QueueFullError` when the waiting queue is at its bound (as the emulator engine)."""
        self.scheduler.validate(req)
        check_queue_room(self.scheduler.num_waiting, self.config.max_queue_size)
        now = self._loop.time()
        run = self._run
        if run is not None and not self._blocked and self._admissible_now():
            self._cut(run, now)
        self.scheduler.submit(req, int(now * NS))
        self._version += 1
        tracked = self._tracked[req.request_id] = Tracked(now)
        if self._timer is None:
            self._next(now)
        return tracked

    def _admissible_now(self) -> bool:
        return self.scheduler.num_running < self.config.max_batch_size

    def metrics(self) -> EngineMetrics:
        """The backend's gauges now (a decode stretch in progress is committed up to now)."""
        if self._run is not None:
            self._cut(self._run, self._loop.time(), reschedule=False)
        return self.scheduler.metrics()

    def sample(self) -> EngineSample:
        """What a scrape of the engine's /metrics page reads (`parse_engine_metrics`): the
        gauges as last copied (`gauge_period_s`), or the engine's state now."""
        if self._gauges is not None:
            return self._gauges
        return self._read()

    def _read(self) -> EngineSample:
        # Unchanged since the last read (no submission, iteration or commit; no decode stretch
        # to commit up to now): the same gauges.
        if self._read_cache is not None and self._read_cache[0] == self._version and not self._run:
            return self._read_cache[1]
        m = self.metrics()
        sample = EngineSample(
            float(m.active),
            float(m.waiting),
            float(m.kv_used_blocks),
            float(m.kv_max_blocks),
            float(m.max_active),
            float(m.kv_free_blocks),
        )
        self._read_cache = (self._version, sample)
        return sample

    def _copy_gauges(self) -> None:
        self._gauges = self._read()
        assert self.config.gauge_period_s is not None
        self._gauge_timer = self._loop.call_later(self.config.gauge_period_s, self._copy_gauges)

    def stop(self) -> None:
        """Stop copying gauges (the replica is gone); requests in flight are not touched."""
        if self._gauge_timer is not None:
            self._gauge_timer.cancel()
            self._gauge_timer = None

    @property
    def idle(self) -> bool:
        return self._timer is None and not self.scheduler.has_work

    @property
    def load(self) -> int:
        """Requests running or queued in the engine."""
        return self.scheduler.num_running + self.scheduler.num_waiting

    # ---------------------------------------------------------------------------- iterations
    def _next(self, now: float) -> None:
        """Start the next iteration (or decode stretch) at `now`; idle when there is no work."""
        sched = self.scheduler
        self._timer = None
        if not sched.has_work:
            return
        if sched.num_running and (self._blocked or not self._has_waiting()):
            steps = sched.decode_horizon()
            run = self._run = _Run.scaled(now, sched.decode_durations(steps), self._scale)
            self._busy_until = run.end
            self._timer = self._loop.call_at(run.end, self._run_done)
            return
        step = self._step = sched.step(int(now * NS))
        self._version += 1
        self.iterations += 1
        self.busy_s += step.duration_s * self._scale
        self._blocked = sched.head_waits_for_finish
        self._busy_until = now + step.duration_s * self._scale
        self._timer = self._loop.call_at(self._busy_until, self._step_done)

    def _has_waiting(self) -> bool:
        return self.scheduler.num_waiting > 0

    def _step_done(self) -> None:
        step, self._step = self._step, None
        assert step is not None
        now = self._busy_until
        for out in step.outputs:
            self._deliver(out, now)
        if step.events and self._on_events is not None:
            self._on_events(step.events)
        self._next(now)

    def _run_done(self) -> None:
        run, self._run = self._run, None
        assert run is not None
        self._commit(run, len(run.ends))
        self._next(run.end)

    def _cut(self, run: _Run, now: float, *, reschedule: bool = True) -> None:
        """Commit the iterations of `run` that ended by `now` (`reschedule` False: an observation;
        the rest stays planned), or that started before `now` (`reschedule`: a request arrived
        that the next iteration admits; the stretch ends after the last of them)."""
        total = len(run.ends)
        if not reschedule:
            done = run.ended_by(now)
            if 0 < done < total:
                self._commit(run, done)
                run.start = float(run.ends[done - 1])
                run.ends = run.ends[done:]
            return
        started = run.started_before(now)
        if started >= total:
            return  # its last iteration is already running: nothing changes
        self._commit(run, started)
        end = float(run.ends[started - 1])
        self._run = None
        assert self._timer is not None
        self._timer.cancel()
        self._busy_until = end
        self._timer = self._loop.call_at(end, self._next, end)

    def _commit(self, run: _Run, steps: int) -> None:
        res = self.scheduler.decode_steps(steps, int(run.start * NS))
        self._version += 1
        self.iterations += steps
        self.busy_s += sum(res.durations_s) * self._scale
        end = float(run.ends[steps - 1])
        for out in res.finished:
            self._deliver(out, end)
        if res.events and self._on_events is not None:
            self._on_events(res.events)

    def _deliver(self, out: TokenOutput, now: float) -> None:
        tracked = self._tracked.get(out.request_id)
        if tracked is None:
            return
        tracked.output_tokens = out.index + 1
        if tracked.first_token_s is None:
            tracked.first_token_s = now
            tracked.reused_blocks = out.blocks.reused_blocks
            if self._on_first is not None:
                self._on_first(out.request_id, tracked)
        if out.finished:
            del self._tracked[out.request_id]
            tracked.finished_s = now
            self._blocked = False
            if self._on_finished is not None:
                self._on_finished(out.request_id, tracked)
