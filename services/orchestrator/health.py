"""Replica health: readiness probe results, outlier ejection, and the engine sampler (scrape →
fresh sample). Every time comes from the injected clock.

Invariants:
- A replica is ejected after `consecutive_errors` failures in a row, or when at least
  `failure_percentage` of its recent requests failed on it (over at least
  `failure_min_requests` of its last `failure_window_requests` outcomes, none older than
  `failure_window_s`), for `base_ejection_seconds * ejections`, unless that would eject more than
  `max_ejection_percent` of its pool (the pool keeps serving rather than going dark).
- A successful request resets the consecutive-error count, and so does a replica coming back to
  ready, which also ends its ejection; a passed probe of a replica that was ready does not:
  Triton answers ServerReady and ModelReady true while its Python-backend stub is dead (observed
  on 2.51), so only the requests can tell, and the re-probe after each failure must not erase
  them. An ejection starts a fresh failure window.
- An engine sample older than `metrics_max_age_s` is unknown, never stale data.
- A sample is stored with this orchestrator's lease count on the replica at the time (the larger
  of before and after the scrape), so the director can tell its own load from the others'.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence
from typing import Protocol

from llmmesh.common.engine_metrics import EngineSample, fetch_metrics_text, parse_engine_metrics
from services.orchestrator import metrics
from services.orchestrator.domain import Clock
from services.orchestrator.policy import HealthPolicy
from services.orchestrator.replicas import ReplicaSet, ReplicaState
from services.orchestrator.settings import ReplicaSpec

log = logging.getLogger(__name__)

# (metrics URL, Host header, timeout) → exposition text, or the sample itself from an
# in-process engine (a simulator's); raises when unreachable.
FetchMetrics = Callable[[str, str, float], Awaitable[str | EngineSample]]


async def fetch_in_thread(url: str, host: str, timeout_s: float) -> str:
    """`fetch_metrics_text` (blocking urllib) in a worker thread: for a core without an HTTP
    client of its own (the service injects `probe.HttpMetrics`)."""
    return await asyncio.to_thread(fetch_metrics_text, url, host, timeout_s)


class ReplicaProbe(Protocol):
    async def ready(
        self, replica: ReplicaSpec, models: Sequence[str], timeout_s: float
    ) -> bool: ...


class Health:
    def __init__(
        self,
        policy: HealthPolicy,
        replicas: ReplicaSet,
        probe: ReplicaProbe,
        probe_timeout_s: float,
        clock: Clock,
    ) -> None:
        self._policy = policy
        self._replicas = replicas
        self._probe = probe
        self._timeout_s = probe_timeout_s
        self._clock = clock

    def _window(self, st: ReplicaState, now: float) -> None:
        """Drop outcomes older than the window or beyond its length."""
        hp = self._policy
        q = st.outcomes
        while q and (now - q[0][0] > hp.failure_window_s or len(q) > hp.failure_window_requests):
            if q.popleft()[1]:
                st.failed_outcomes -= 1

    def record_success(self, st: ReplicaState) -> None:
        st.consecutive_errors = 0
        now = self._clock()
        st.outcomes.append((now, False))
        self._window(st, now)

    def window_moves_at(self, st: ReplicaState) -> float:
        """When the oldest outcome leaves the window by age (infinity without one): until then
        `recent_failures` changes only by a new outcome."""
        q = st.outcomes
        return q[0][0] + self._policy.failure_window_s if q else math.inf

    def recent_failures(self, st: ReplicaState, now: float) -> int:
        """Requests that failed on the replica within the window (the scorers' load penalty)."""
        self._window(st, now)
        return st.failed_outcomes

    def record_error(self, st: ReplicaState, *, reason: str, request: bool = True) -> None:
        """Count a failure (`request`: a request that failed on the replica, else a failed
        probe); eject after `consecutive_errors` in a row or on the failure share of recent
        requests, unless the pool's ejection budget is spent."""
        st.consecutive_errors += 1
        hp = self._policy
        now = self._clock()
        if request:
            st.outcomes.append((now, True))
            st.failed_outcomes += 1
            self._window(st, now)
        if st.ejected(now):
            return
        why = self._ejection_cause(st)
        if why is None:
            return
        pool = [x for x in self._replicas.live() if x.spec.pool == st.spec.pool]
        ejected = sum(1 for x in pool if x.ejected(now))
        if (ejected + 1) * 100 > hp.max_ejection_percent * len(pool):
            log.warning(
                "ejection budget spent", extra={"replica": st.spec.id, "pool": st.spec.pool}
            )
            return
        st.ejections += 1
        st.ejected_until = now + hp.base_ejection_seconds * st.ejections
        st.outcomes.clear()
        st.failed_outcomes = 0
        metrics.record_ejection(st.spec.id, st.spec.pool)
        metrics.record_healthy(st.spec.id, st.spec.pool, st.healthy(now))
        log.warning(
            "replica ejected",
            extra={
                "replica": st.spec.id,
                "reason": reason,
                "cause": why,
                "for_s": st.ejected_until - now,
            },
        )

    def _ejection_cause(self, st: ReplicaState) -> str | None:
        hp = self._policy
        if st.consecutive_errors >= hp.consecutive_errors:
            return "consecutive_errors"
        total = len(st.outcomes)
        failed = st.failed_outcomes
        if total >= hp.failure_min_requests and failed * 100 >= hp.failure_percentage * total:
            return "failure_percentage"
        return None

    def set_ready(self, st: ReplicaState, ready: bool) -> bool:
        """Record a probe result; True when the replica just stopped being ready (its cached
        blocks are gone or unreachable)."""
        lost = st.ready and not ready
        if st.ready != ready:
            log.warning("replica readiness changed", extra={"replica": st.spec.id, "ready": ready})
        if ready and not st.ready:
            # Back from not ready (a restarted replica): its probe failures are over, and an
            # ejection they caused ends with them, as Envoy un-ejects a host that passes an
            # active health check. A replica that stayed ready keeps both (requests decide).
            st.consecutive_errors = 0
            st.ejected_until = 0.0
        st.ready = ready
        if not ready:
            self.record_error(st, reason="readiness probe failed", request=False)
        metrics.record_healthy(st.spec.id, st.spec.pool, st.healthy(self._clock()))
        return lost

    async def probe(self, st: ReplicaState) -> bool:
        try:
            return await self._probe.ready(st.spec, st.spec.models, self._timeout_s)
        except Exception as exc:  # a probe failure means not ready, whatever the cause
            log.debug("probe failed", extra={"replica": st.spec.id, "error": repr(exc)})
            return False


async def staggered(
    call: Callable[[ReplicaState], Coroutine[object, object, object]],
    replicas: Sequence[ReplicaState],
    spread_s: float,
) -> None:
    """`call` for every replica, each in its own task, replica i's started `i * spread_s / n`
    after the round began (all at once when 0), then awaited: a round's answers (and the work
    on them, in the event loop) arrive spread out, not as one burst that holds up the Admits
    behind it (with 64 replicas, a burst held them up to tens of ms). A replica removed before
    its turn is skipped; a call that raises is logged and ends no other."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    step = spread_s / max(len(replicas), 1)
    tasks: list[asyncio.Task[object]] = []
    called: list[ReplicaState] = []
    try:
        for i, st in enumerate(replicas):
            if i and step > 0:
                await asyncio.sleep(max(0.0, start + i * step - loop.time()))
            if not st.removed:
                tasks.append(asyncio.create_task(call(st)))
                called.append(st)
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        for st, outcome in zip(called, outcomes, strict=True):
            if isinstance(outcome, Exception):
                log.error(
                    "replica round call failed",
                    extra={"replica": st.spec.id, "error": repr(outcome)},
                )
    finally:
        for t in tasks:
            t.cancel()


class EngineSampler:
    """Engine gauges per replica from Triton's /metrics, with their age."""

    def __init__(
        self,
        fetch: FetchMetrics,
        timeout_s: float,
        max_age_s: float,
        clock: Clock,
        *,
        gauge_period_s: float = 0.0,
    ) -> None:
        """`gauge_period_s`: how old a replica's gauges may be when fetched (the backend copies
        its statistics into them that often)."""
        self._fetch = fetch
        self._timeout_s = timeout_s
        self._max_age_s = max_age_s
        self._clock = clock
        self._gauge_period_s = gauge_period_s

    def fresh(self, st: ReplicaState, now: float) -> EngineSample | None:
        if st.sample is None or now - st.sample_at > self._max_age_s:
            return None
        return st.sample

    def fresh_until(self, st: ReplicaState) -> float:
        """When the replica's stored sample stops being fresh (infinity without one)."""
        return math.inf if st.sample is None else st.sample_at + self._max_age_s

    async def scrape(
        self,
        replicas: Iterable[ReplicaState],
        spread_s: float = 0.0,
        on_sample: Callable[[], None] | None = None,
    ) -> None:
        """One round. `spread_s`: see `staggered`; 0: one fetch after the other, inline (an
        in-process engine's sample, a simulator's). `on_sample`: called after each sample
        stored (what waits on a replica's load need not wait for the whole round)."""
        targets = [st for st in replicas if st.spec.metrics_url]

        async def one(st: ReplicaState) -> None:
            if await self._scrape_one(st) and on_sample is not None:
                on_sample()

        if not spread_s:
            for st in targets:
                await one(st)
            return
        await staggered(one, targets, spread_s)

    async def _scrape_one(self, st: ReplicaState) -> bool:
        """Whether a sample was stored."""
        start = self._clock()
        try:
            text = await self._fetch(st.spec.metrics_url, st.spec.metrics_host, self._timeout_s)
            return self._store(st, text, start - self._gauge_period_s)
        except Exception as exc:  # no sample, whatever the cause (unreachable, a bad page)
            log.debug("metrics scrape failed", extra={"replica": st.spec.id, "error": repr(exc)})
            return False

    def _store(self, st: ReplicaState, text: str | EngineSample, taken_since: float) -> bool:
        """`taken_since`: the earliest time the sample's gauges may have been taken."""
        sample = text if isinstance(text, EngineSample) else parse_engine_metrics(text)
        if sample is None:
            return False
        st.sample, st.sample_at = sample, self._clock()
        st.sample_in_flight = st.in_flight_peak(taken_since)
        return True
