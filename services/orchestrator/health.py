"""Replica health: readiness probe results, outlier ejection, and the engine sampler (scrape →
fresh sample). Every time comes from the injected clock.

Invariants:
- A replica is ejected after `consecutive_errors` failures in a row, for
  `base_ejection_seconds * ejections`, unless that would eject more than
  `max_ejection_percent` of its pool (the pool keeps serving rather than going dark).
- A success or a passed probe resets the consecutive-error count.
- An engine sample older than `metrics_max_age_s` is unknown, never stale data.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

from llmmesh.common.engine_metrics import EngineSample, parse_engine_metrics
from services.orchestrator import metrics
from services.orchestrator.domain import Clock
from services.orchestrator.policy import HealthPolicy
from services.orchestrator.replicas import ReplicaSet, ReplicaState
from services.orchestrator.settings import ReplicaSpec

log = logging.getLogger(__name__)

# (metrics URL, Host header, timeout) → exposition text; raises OSError when unreachable.
FetchMetrics = Callable[[str, str, float], str]


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

    def record_success(self, st: ReplicaState) -> None:
        st.consecutive_errors = 0

    def record_error(self, st: ReplicaState, *, reason: str) -> None:
        """Count a failure; eject after `consecutive_errors` in a row unless the pool's ejection
        budget is spent."""
        st.consecutive_errors += 1
        hp = self._policy
        now = self._clock()
        if st.consecutive_errors < hp.consecutive_errors or st.ejected(now):
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
        metrics.record_ejection(st.spec.id, st.spec.pool)
        metrics.record_healthy(st.spec.id, st.spec.pool, st.healthy(now))
        log.warning(
            "replica ejected",
            extra={"replica": st.spec.id, "reason": reason, "for_s": st.ejected_until - now},
        )

    def set_ready(self, st: ReplicaState, ready: bool) -> bool:
        """Record a probe result; True when the replica just stopped being ready (its cached
        blocks are gone or unreachable)."""
        lost = st.ready and not ready
        if st.ready != ready:
            log.warning("replica readiness changed", extra={"replica": st.spec.id, "ready": ready})
        st.ready = ready
        if ready:
            st.consecutive_errors = 0
        else:
            self.record_error(st, reason="readiness probe failed")
        metrics.record_healthy(st.spec.id, st.spec.pool, st.healthy(self._clock()))
        return lost

    async def probe(self, st: ReplicaState) -> bool:
        try:
            return await self._probe.ready(st.spec, st.spec.models, self._timeout_s)
        except Exception as exc:  # a probe failure means not ready, whatever the cause
            log.debug("probe failed", extra={"replica": st.spec.id, "error": repr(exc)})
            return False


class EngineSampler:
    """Engine gauges per replica from Triton's /metrics, with their age."""

    def __init__(
        self, fetch: FetchMetrics, timeout_s: float, max_age_s: float, clock: Clock
    ) -> None:
        self._fetch = fetch
        self._timeout_s = timeout_s
        self._max_age_s = max_age_s
        self._clock = clock

    def fresh(self, st: ReplicaState, now: float) -> EngineSample | None:
        if st.sample is None or now - st.sample_at > self._max_age_s:
            return None
        return st.sample

    async def scrape(self, replicas: Iterable[ReplicaState]) -> None:
        async def one(st: ReplicaState) -> None:
            try:
                text = await asyncio.to_thread(
                    self._fetch, st.spec.metrics_url, st.spec.metrics_host, self._timeout_s
                )
            except OSError as exc:
                log.debug(
                    "metrics scrape failed", extra={"replica": st.spec.id, "error": repr(exc)}
                )
                return
            sample = parse_engine_metrics(text)
            if sample is not None:
                st.sample, st.sample_at = sample, self._clock()

        await asyncio.gather(*(one(st) for st in replicas if st.spec.metrics_url))
