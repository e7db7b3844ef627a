"""Autoscaler core: the loop source → policy per pool → log, metrics, history → actuator.

Invariants:
- One evaluation decides every pool known from the configuration, the signals or the actuator; a
  pool without signals gets all-unknown signals (the policy holds it). Except a pool never decided
  of which nothing is known (no count, no signal: the process started during a metrics outage):
  it stays undecided, and `desired` answers Unavailable (KEDA's HPA keeps its count), rather than
  a count made up from its minimum.
- `current` is what the actuator reports provisioned (ready + starting); without an actuator (KEDA
  or an HPA act on `desired`) it is the engine replicas known to the source, else the last desired,
  else (something read of the pool, no engine: a pool at zero) the policy's minimum.
- The history is bounded (`decision_history`); sequence numbers increase by one per decision.
- A pool no one configures, manages or asks for (KEDA), unread for FORGET_AFTER x
  `signal_max_age_s` while its source reads others, is forgotten with its gauges: pools seen
  come and go with model versions; a source outage forgets nothing.
- A failing source or actuator is logged and the loop goes on: the last decisions stay served.
  A policy that fails on a pool's inputs holds that pool (`error_hold`); the others are decided.
- Two clocks: samples are stamped, aged and recorded on the wall clock (`clock`: Prometheus's
  and the engines' timestamps are Unix time); the policy's windows, periods and holds run on
  `timer` (monotonic), so a step of the wall clock (NTP, a VM resumed) neither freezes a
  scale-down period nor ends one early. The policy sees each sample as old as the wall clock
  says, on the timer's clock.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Final, get_args

from prometheus_client import Counter, Gauge

from llmmesh.common import metric_names as names
from llmmesh.common.errors import Unavailable
from llmmesh.common.telemetry import remove_series
from llmmesh.common.topology import PoolKey
from services.autoscaler.actuators.contracts import Actuator, ReplicaCounts
from services.autoscaler.policy import (
    Cause,
    Direction,
    PolicyConfig,
    PoolState,
    ScaleDecision,
    decide,
    hold,
)
from services.autoscaler.settings import AutoscalerSettings
from services.autoscaler.signals import PoolSignals, SignalSource, SourceUnavailable

log = logging.getLogger(__name__)

_LABELS = ["pool", "model_version"]
_DESIRED = Gauge(
    names.AS_DESIRED_REPLICAS,
    "Replicas the policy wants (an HPA external metric with target AverageValue 1).",
    _LABELS,
)
_CURRENT = Gauge(names.AS_CURRENT_REPLICAS, "Replicas provisioned (ready + starting).", _LABELS)
_READY = Gauge(names.AS_READY_REPLICAS, "Replicas ready (actuator).", _LABELS)
_STARTING = Gauge(names.AS_STARTING_REPLICAS, "Replicas starting (actuator).", _LABELS)
_DRAINING = Gauge(names.AS_DRAINING_REPLICAS, "Replicas draining (actuator).", _LABELS)
_PANIC = Gauge(names.AS_PANIC, "1 while the pool is in panic mode.", _LABELS)
_DECISIONS = Counter(
    names.AS_DECISIONS,
    "Evaluations by direction and cause.",
    [*_LABELS, "direction", "cause"],
)
_STAGES: Final = ("source", "observe", "decide", "apply", "evaluate")
_ERRORS = Counter(names.AS_ERRORS, f"Failures by stage ({', '.join(_STAGES)}).", ["stage"])
for _stage in _STAGES:
    _ERRORS.labels(_stage)  # each series exported from the start (a rate over none is empty)


# In units of signal_max_age_s: how long a pool unread, unconfigured and unmanaged is kept.
FORGET_AFTER: Final = 10


@dataclass(frozen=True, slots=True)
class Recorded:
    """A decision as kept and served: which pool, when, and the counts by state."""

    sequence: int
    key: PoolKey
    decided_at: float
    decision: ScaleDecision
    counts: ReplicaCounts | None
    changed: bool


class Autoscaler:
    def __init__(
        self,
        settings: AutoscalerSettings,
        source: SignalSource,
        actuator: Actuator | None = None,
        clock: Callable[[], float] = time.time,
        timer: Callable[[], float] = time.monotonic,
    ):
        self._settings = settings
        self._source = source
        self._actuator = actuator
        self._clock = clock
        self._timer = timer
        self._states: dict[PoolKey, PoolState] = {}
        self._latest: dict[PoolKey, Recorded] = {}
        # When `desired` was last asked for each decided pool (its keys are within `_latest`'s).
        self._asked: dict[PoolKey, float] = {}
        self._forget_after_s = FORGET_AFTER * settings.signal_max_age_s
        self._history: deque[Recorded] = deque(maxlen=settings.decision_history)
        self._seq = itertools.count(1)
        self._updated = asyncio.Event()

    def policy_for(self, key: PoolKey) -> PolicyConfig:
        return self._settings.policy_for(key)

    async def _signals(self, now: float) -> Mapping[PoolKey, PoolSignals]:
        try:
            return await self._source.collect(now)
        except SourceUnavailable as err:  # every pool holds; counted, for the alert
            log.warning("signal source read nothing", extra={"error": str(err)})
            _ERRORS.labels("source").inc()
            return {}
        except Exception:  # a source bug must not stop the loop: every pool holds
            log.exception("signal source failed")
            _ERRORS.labels("source").inc()
            return {}

    async def _counts(self) -> Mapping[PoolKey, ReplicaCounts] | None:
        if self._actuator is None:
            return None
        try:
            return await self._actuator.observe()
        except Exception:
            log.exception("actuator observe failed")
            _ERRORS.labels("observe").inc()
            return None

    def _current(
        self, key: PoolKey, sig: PoolSignals, counts: Mapping[PoolKey, ReplicaCounts] | None
    ) -> int | None:
        """The pool's replica count to decide from; None while nothing is known of a pool never
        decided (a process started during a metrics outage): its minimum would be served as a
        decision, and KEDA's HPA would scale a busy pool down to it."""
        if counts is not None and key in counts:
            return counts[key].provisioned
        if self._actuator is None and sig.replicas_known is not None:
            return sig.replicas_known
        last = self._latest.get(key)
        if last is not None:
            return last.decision.desired
        if self._actuator is None or counts is None:
            # Its count is unknown (KEDA or an HPA act on `desired`, its engines not counted;
            # or the actuator could not report): a count made up here (the minimum) would be
            # decided from, and a pool running more scaled down to it.
            return None
        # A pool the actuator does not manage (nothing is applied to it).
        return self.policy_for(key).min_replicas if sig.known() else None

    async def evaluate(self) -> list[Recorded]:
        """One round over every pool; returns this round's decisions."""
        now, at = self._clock(), self._timer()
        signals = await self._signals(now)
        counts = await self._counts()
        present = {p.key for p in self._settings.pools} | set(signals) | set(counts or {})
        if signals:  # a round whose source read nothing (down, failing) forgets nothing
            self._forget_gone(now, present)
        keys = present | set(self._latest)
        out: list[Recorded] = []
        for key in sorted(keys):
            sig = signals.get(key) or PoolSignals(sampled_at=now)
            if key not in signals and key in self._latest:
                # Unread this round: keep the last sample time so it turns stale, not fresh.
                sig = PoolSignals(sampled_at=self._latest[key].decision.signals.sampled_at)
            current = self._current(key, sig, counts)
            if current is None:
                continue  # not decided: `desired` answers Unavailable
            state = self._states.setdefault(key, PoolState())
            policy = self.policy_for(key)
            try:
                timed = dataclasses.replace(sig, sampled_at=at - sig.age_s(now))
                decision = decide(
                    policy, state, timed, current, at, self._settings.signal_max_age_s
                )
                decision = dataclasses.replace(decision, signals=sig)
            except Exception as err:  # one pool's inputs must not stop the others or the loop
                log.exception("policy failed", extra={"pool": key.pool})
                _ERRORS.labels("decide").inc()
                held = state.desired = hold(policy, state, current)
                decision = ScaleDecision(
                    current, held, Cause.ERROR_HOLD, f"policy failed ({err!r}): holding {held}", sig
                )
            out.append(self._record(key, now, decision, counts.get(key) if counts else None))
        self._updated.set()
        self._updated = asyncio.Event()
        if self._actuator is not None:
            for rec in out:
                if counts is None or rec.key not in counts:
                    # A pool the actuator does not manage, or a round it could not report
                    # (its `apply` refuses pools it does not manage): nothing to apply.
                    continue
                try:
                    await self._actuator.apply(rec.key, rec.decision.desired, rec.decision.reason)
                except Exception:
                    log.exception("actuator apply failed", extra={"pool": rec.key.pool})
                    _ERRORS.labels("apply").inc()
        return out

    def _forget_gone(self, now: float, present: set[PoolKey]) -> None:
        """A pool no one configures or manages and no source has read for FORGET_AFTER x
        `signal_max_age_s` is gone (a model version rolled out, a label seen once): its state,
        last decision and gauges go, or every version ever seen would be decided and exported
        for the life of the process."""
        for key in [
            k
            for k, rec in self._latest.items()
            if k not in present
            and now - rec.decision.signals.sampled_at > self._forget_after_s
            and now - self._asked.get(k, -math.inf) > self._forget_after_s  # KEDA asks for it
        ]:
            del self._latest[key]
            self._asked.pop(key, None)
            self._states.pop(key, None)
            labels = (key.pool, key.model_version)
            remove_series(
                (gauge, labels)
                for gauge in (_DESIRED, _CURRENT, _READY, _STARTING, _DRAINING, _PANIC)
            )
            # Its decision counters too (their rates would read 0 forever: alert rules divide
            # them, LlmmeshAutoscalerBlind).
            remove_series(
                (_DECISIONS, (*labels, direction, cause.value))
                for direction in get_args(Direction)
                for cause in Cause
            )
            log.info("pool forgotten", extra={"pool": key.pool, "model_version": key.model_version})

    def _record(
        self, key: PoolKey, now: float, d: ScaleDecision, counts: ReplicaCounts | None
    ) -> Recorded:
        prev = self._latest.get(key)
        changed = prev is None or (prev.decision.desired, prev.decision.cause) != (
            d.desired,
            d.cause,
        )
        rec = Recorded(next(self._seq), key, now, d, counts, changed)
        self._latest[key] = rec
        self._history.append(rec)
        labels = (key.pool, key.model_version)
        if prev is None:
            # Every (direction, cause) series of a pool from its first decision, at 0: rate()
            # sees the first increase of each, and rules over a cause (LlmmeshAutoscalerBlind)
            # have their series while the pool is decided otherwise (`_forget_gone` removes them).
            for direction in get_args(Direction):
                for cause in Cause:
                    _DECISIONS.labels(*labels, direction, cause.value)
        _DESIRED.labels(*labels).set(d.desired)
        _CURRENT.labels(*labels).set(d.current)
        _PANIC.labels(*labels).set(1 if d.panic else 0)
        if counts is not None:
            _READY.labels(*labels).set(counts.ready)
            _STARTING.labels(*labels).set(counts.starting)
            _DRAINING.labels(*labels).set(counts.draining)
        _DECISIONS.labels(*labels, d.direction, d.cause.value).inc()
        if changed:
            s = d.signals
            log.info(
                "scaling decision",
                extra={
                    "pool": key.pool,
                    "model_version": key.model_version,
                    "current": d.current,
                    "desired": d.desired,
                    "cause": d.cause.value,
                    "reason": d.reason,
                    "panic": d.panic,
                    "signals": {
                        "age_s": round(s.age_s(now), 3),
                        "reporting": s.reporting_replicas,
                        "active": s.engine_active,
                        "waiting": s.engine_waiting,
                        "kv_utilization": s.kv_utilization,
                        "queue_depth": s.queue_depth,
                        "queue_wait_p90_s": s.queue_wait_p90_s,
                        "ttft_p90_s": s.ttft_p90_s,
                        "itl_p90_s": s.itl_p90_s,
                        "arrival_rate": s.arrival_rate,
                        "prompt_tokens_rate": s.prompt_tokens_rate,
                        "completion_tokens_rate": s.completion_tokens_rate,
                    },
                },
            )
        return rec

    def latest(self) -> list[Recorded]:
        return [self._latest[k] for k in sorted(self._latest)]

    def desired(self, key: PoolKey) -> int:
        """The latest desired count. A pool asked for (KEDA) is not forgotten while it is asked
        for. Unavailable for a pool not decided yet (before the first evaluation, or nothing
        known of it since the process started): no count is made up."""
        rec = self._latest.get(key)
        if rec is None:  # a key that was never decided is not kept for anything
            raise Unavailable(
                f"pool {key.pool} model version {key.model_version}: not decided yet "
                "(nothing known of it since the autoscaler started)"
            )
        self._asked[key] = self._clock()
        return rec.decision.desired

    def decisions(
        self,
        *,
        pool: str | None = None,
        model_version: str | None = None,
        after_sequence: int = 0,
        limit: int = 0,
        changes_only: bool = False,
    ) -> list[Recorded]:
        out = [
            r
            for r in self._history
            if r.sequence > after_sequence
            and (pool is None or r.key.pool == pool)
            and (model_version is None or r.key.model_version == model_version)
            and (r.changed or not changes_only)
        ]
        return out[-limit:] if limit > 0 else out

    async def wait_for_update(self) -> None:
        """Returns after the next evaluation."""
        await self._updated.wait()

    async def run(self) -> None:
        while True:
            try:
                await self.evaluate()
            except Exception:  # the loop outlives any round: the next one decides again
                log.exception("evaluation failed")
                _ERRORS.labels("evaluate").inc()
            await asyncio.sleep(self._settings.interval_s)

    async def close(self) -> None:
        await self._source.close()
        if self._actuator is not None:
            await self._actuator.close()
