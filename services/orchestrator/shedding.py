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
  overloaded. From level 0, L first rises once overloaded windows have followed one another for
  `after_s` (1 s): a burst whose queue drains sooner is queued, not shed (bench-burst: without
  this, 1,000 requests at once on a healthy mesh had 762 refused BUSY in one run, and a burst of
  100 had 5). While L > 0, each overloaded window raises it by `STEP`, unless its smallest
  sojourn is below the previous window's: the queue shrinks, the shedding is enough (raising it
  further while the queue drained refused 64% at 64 replicas and 500/s, where the CPU could
  take 90%);
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

import random

from services.orchestrator.domain import Priority

STEP = 0.1  # level change per overloaded window (half of it per idle or calm window)
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
        self._after_s = after_s
        self._standing_since: float | None = None  # start of the run of overloaded windows
        self._previous_s: float | None = None  # that run's last window's smallest sojourn
        self._rng = rng or random.Random()
        self.level = 0.0
        self.last_sojourn_s = 0.0
        self._window: int | None = None  # the current window's index: now // window_s
        self._window_min = 0.0
        self._samples = 0  # in the current window

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
            self._judge(self._window_min, self._samples, self._window * self._window_s)
            idle = window - self._window - 1
        else:
            idle = window - self._window
        if idle:
            self._standing_since = self._previous_s = None
        self.level = max(0.0, self.level - idle * STEP / 2)
        self._window, self._samples = window, 0

    def _judge(self, smallest_s: float, samples: int, start: float) -> None:
        draining = self._previous_s is not None and smallest_s < self._previous_s
        if smallest_s > self._target_s and samples >= MIN_SAMPLES:
            self._previous_s = smallest_s
            if self._standing_since is None:
                self._standing_since = start
            # Once shedding, every overloaded window counts; before, only a queue that stood
            # `after_s` (to the window's end) does. A queue that shrinks already sheds enough:
            # raising the level further would refuse what the process has room for.
            if draining and self.level > 0:
                return
            if self.level > 0 or start + self._window_s - self._standing_since >= self._after_s:
                self.level = min(1.0, self.level + STEP)
            return
        self._standing_since = self._previous_s = None
        if smallest_s < self._target_s / 2:
            self.level = max(0.0, self.level - STEP / 2)

    def refusal_share(self, priority: Priority) -> float:
        """The share of `priority`'s requests refused at the current level."""
        tier = len(Priority) - 1 - int(priority)  # batch 0 ... interactive 2
        return min(1.0, max(0.0, _TIERS * self.level - tier))

    def refuses(self, priority: Priority) -> bool:
        share = self.refusal_share(priority)
        return share > 0 and (share >= 1 or self._rng.random() < share)
