"""Shedding for the orchestrator's own overload: refuse Admits at once, lowest class first, while
calls wait too long before this process starts on them.

Why a separate bound: the admission queue (`capacity.py`) bounds what waits for the engines; it
cannot see calls the orchestrator has not yet started. When decisions cost more CPU than the
process has, gRPC holds the arriving calls unstarted, unbounded by anything of ours: at 1,000
Admit/s on a saturated core, Admits waited 1-2 s and gRPC cancelled those past its own limit
(CANCELLED, no retry-after; `bench-admit`).

Signal: each Admit's sojourn, the time between its sending and its handler's start
(`llmmesh.common.sojourn`: the caller's send time against this host's clock, less the caller's
baseline). The CPU share is no signal here: a process sharing its core is saturated well below
100%.

Control, as CoDel judges a queue: per window of `window_s`, the smallest sojourn seen. A queue
that stands (every call in the window waited) is overload; a burst that some calls waited
behind is not. One level L in [0, 1]:
- a window of at least `MIN_SAMPLES` Admits whose smallest sojourn exceeds `target_s` is
  overloaded (a window of fewer, every one late, neither extends nor ends a run of those; nor
  do windows without a call, up to `after_s` of them: a saturated process starts few handlers).
  From level 0, L first rises once overloaded windows have followed one another for `after_s`
  (1 s): a burst whose queue drains sooner is queued, not shed (bench-burst: without
  this, 1,000 requests at once on a healthy mesh had 762 refused BUSY in one run, and a burst of
  100 had 5). While L > 0, each overloaded window raises it by `STEP`, unless its smallest
  sojourn is below the previous window's by more than half the target: the queue shrinks, the
  shedding is enough (raising it further while the queue drained refused 64% at 64 replicas
  and 500/s, where the CPU could take 90%);
- a window whose smallest is under half the target lowers L by `STEP / 2`, and so does each
  window without a call (`tick` closes those when no call comes);
- a request of class tier t (batch 0, standard 1, interactive 2) is refused with probability
  clamp(3 L - t, 0, 1): every batch request is refused before any standard one, every standard
  one before any interactive one. Once shedding, standard requests are refused from the fourth
  overloaded window on, interactive ones from the seventh.

A refusal is RESOURCE_EXHAUSTED, reason BUSY, with a retry-after; the gateway tries one other
orchestrator (another process may have CPU to spare) and passes the refusal on when that one
refuses too. A refusal costs the process a fraction of a decision, so the calls behind it drain.
Time comes with each sample (the director's clock): nothing here reads a clock.
"""

from __future__ import annotations

import math
import random

from services.orchestrator.domain import Priority

STEP = 0.1  # level change per overloaded window (half of it per idle or calm window)
_HALF_STEPS = round(2 / STEP)  # half-steps from level 0 to 1
# A window is judged overloaded only on this many Admits: one slow call alone (a new connection's
# handshake, a collection) is no standing queue.
MIN_SAMPLES = 3
_TIERS = 3  # batch, standard, interactive


class AdmitShedder:
    def __init__(
        self,
        target_s: float,
        window_s: float,
        after_s: float = 0.0,
        rng: random.Random | None = None,
    ) -> None:
        """`target_s` 0: never sheds. `after_s`: how long a standing queue must have lasted
        before the level first rises (a burst that drains sooner is queued, not shed)."""
        self._target_s = target_s
        self._window_s = window_s
        # Whole windows (the clock's float error never adds one).
        self._after_windows = math.ceil(after_s / window_s - 1e-9) if after_s > 0 else 0
        self._rng = rng or random.Random()
        self._half_steps = 0  # the level in half-steps: exact, so it returns to exactly 0
        self.last_sojourn_s = 0.0
        self._window: int | None = None  # the current window's index: now // window_s
        self._window_min = 0.0
        self._samples = 0  # in the current window
        self._run_start: int | None = None  # the window the run of overloaded ones began in
        self._previous_s: float | None = None  # that run's last window's smallest sojourn

    @property
    def level(self) -> float:
        return self._half_steps / _HALF_STEPS

    def observe(self, sojourn_s: float, now: float) -> None:
        self.last_sojourn_s = sojourn_s
        if self._target_s <= 0:
            return
        self._advance(now)
        if not self._samples or sojourn_s < self._window_min:
            self._window_min = sojourn_s
        self._samples += 1

    def tick(self, now: float) -> None:
        """Close the windows that ended by `now` without a call (periodic upkeep: the level of
        an orchestrator no one calls falls back too)."""
        if self._target_s > 0:
            self._advance(now)

    def _advance(self, now: float) -> None:
        window = int(now // self._window_s)
        if self._window is None:
            self._window = window
            return
        if window <= self._window:
            return
        if self._samples:
            self._judge(self._window_min, self._samples, self._window)
        empty = window - self._window - (1 if self._samples else 0)
        if empty:
            self._lower(empty)
            # A process too busy to start handlers has windows without one: a run of overloaded
            # windows survives gaps shorter than `after_s`.
            if empty >= max(self._after_windows, 1):
                self._run_start = self._previous_s = None
        self._window, self._samples = window, 0

    def _judge(self, smallest_s: float, samples: int, window: int) -> None:
        if smallest_s <= self._target_s:
            self._run_start = self._previous_s = None
            if smallest_s < self._target_s / 2:
                self._lower(1)
            return
        if samples < MIN_SAMPLES:
            return  # a few calls, every one late: neither a standing queue nor its end
        # Shrinking by more than the noise of a standing queue's smallest wait (half the target).
        draining = self._previous_s is not None and (
            self._previous_s - smallest_s > self._target_s / 2
        )
        self._previous_s = smallest_s
        if self._run_start is None:
            self._run_start = window
        if self._half_steps:
            # A queue that shrinks already sheds enough: raising the level further would refuse
            # what the process has room for.
            if not draining:
                self._half_steps = min(_HALF_STEPS, self._half_steps + 2)
        elif window + 1 - self._run_start >= self._after_windows:
            self._half_steps = 2

    def _lower(self, half_steps: int) -> None:
        self._half_steps = max(0, self._half_steps - half_steps)

    def refusal_share(self, priority: Priority) -> float:
        """The share of `priority`'s requests refused at the current level."""
        tier = len(Priority) - 1 - int(priority)  # batch 0 ... interactive 2
        return min(1.0, max(0.0, _TIERS * self.level - tier))

    def refuses(self, priority: Priority) -> bool:
        share = self.refusal_share(priority)
        return share > 0 and (share >= 1 or self._rng.random() < share)
