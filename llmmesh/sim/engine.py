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
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from llmmesh.accelerators import CostProfile
from llmmesh.common.metric_names import TRTLLM_KV_CACHE_BLOCK_METRICS, TRTLLM_REQUEST_METRICS
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
from llmmesh.kvblocks import BlockConfig

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

    def __init__(self, start: float, durations: Sequence[float]) -> None:
        self.start = start
        ends, t = [], start
        for d in durations:
            t += d
            ends.append(t)
        self.ends = ends


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
        self.epoch = uuid.uuid4().hex
        self.block_config = BlockConfig(config.block_size)
        self.scheduler = Scheduler(
            SchedulerConfig(config.max_batch_size, config.max_num_tokens),
            PagedKvCache(config.num_kv_blocks, self.block_config),
            config.cost,
            config,
        )
        self._loop = loop
        self._on_events = on_events
        self._on_first = on_first_token
        self._on_finished = on_finished
        self._tracked: dict[str, Tracked] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._busy_until = 0.0  # end of the iteration in progress (or of the planned run)
        self._step: StepResult | None = None  # an admitting iteration in progress
        self._run: _Run | None = None  # a planned decode-only stretch in progress
        self._blocked = False  # the queue head cannot be admitted until a sequence finishes
        self.iterations = 0
        self.busy_s = 0.0

    # ---------------------------------------------------------------------------- requests
    def submit(self, req: GenerationRequest) -> Tracked:
        """Queue a request now; raises `RequestRejectedError` if it could never run."""
        now = self._loop.time()
        run = self._run
        if run is not None and not self._blocked and self._admissible_now():
            self._cut(run, now)
        self.scheduler.submit(req, int(now * NS))
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

    def metrics_text(self) -> str:
        """The two gauge families of the engine's /metrics page that the control plane reads."""
        m = self.metrics()
        lines = [f"# TYPE {TRTLLM_REQUEST_METRICS} gauge"]
        lines += [
            f'{TRTLLM_REQUEST_METRICS}{{request_type="{k}"}} {v}'
            for k, v in m.request_metrics().items()
        ]
        lines.append(f"# TYPE {TRTLLM_KV_CACHE_BLOCK_METRICS} gauge")
        lines += [
            f'{TRTLLM_KV_CACHE_BLOCK_METRICS}{{kv_cache_block_type="{k}"}} {v}'
            for k, v in m.kv_cache_block_metrics().items()
        ]
        return "\n".join(lines) + "\n"

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
            run = self._run = _Run(now, sched.decode_durations(steps))
            self._busy_until = run.ends[-1]
            self._timer = self._loop.call_at(run.ends[-1], self._run_done)
            return
        step = self._step = sched.step(int(now * NS))
        self.iterations += 1
        self.busy_s += step.duration_s
        self._blocked = self._has_waiting()
        self._busy_until = now + step.duration_s
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
        self._next(run.ends[-1])

    def _cut(self, run: _Run, now: float, *, reschedule: bool = True) -> None:
        """Commit the iterations of `run` that started before `now`; with `reschedule`, end the
        stretch at the end of the last of them (the next iteration starts there)."""
        started = 1
        ends = run.ends
        while started < len(ends) and ends[started - 1] < now:
            started += 1
        if started >= len(ends):
            if reschedule:
                return  # its last iteration is already running: nothing changes
            started = len(ends)
        if not reschedule:
            # Observation only: commit what has ended by now, keep the rest planned.
            done = 0
            while done < len(ends) and ends[done] <= now:
                done += 1
            if done == 0 or done == len(ends):
                return
            self._commit(run, done)
            run.start = ends[done - 1]
            run.ends = ends[done:]
            return
        self._commit(run, started)
        end = ends[started - 1]
        self._run = None
        assert self._timer is not None
        self._timer.cancel()
        self._busy_until = end
        self._timer = self._loop.call_at(end, self._next, end)

    def _commit(self, run: _Run, steps: int) -> None:
        res = self.scheduler.decode_steps(steps, int(run.start * NS))
        self.iterations += steps
        self.busy_s += sum(res.durations_s)
        end = run.ends[steps - 1]
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
