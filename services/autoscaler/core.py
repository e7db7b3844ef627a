"""Autoscaler core: engine signals per pool → desired replicas, with the reason in words.

Policy (minimal; later issues add SLO-driven capacity models and stabilisation):
    desired = clamp(ceil((active + waiting) / target_per_replica), min, max)
    +1 when pool KV use > kv_high_watermark, never scaling down while KV use is that high.
A pool with no replica reporting keeps its current count: missing signals never scale down.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from prometheus_client import Gauge

from llmmesh.common.discovery import discover_pods
from llmmesh.common.engine_metrics import EngineSample, fetch_metrics_text, parse_engine_metrics
from services.autoscaler.settings import AutoscalerSettings, ScrapeTarget

log = logging.getLogger(__name__)

_DESIRED = Gauge(
    "llmmesh_autoscaler_desired_replicas", "Recommended replicas.", ["pool", "model_version"]
)
_CURRENT = Gauge(
    "llmmesh_autoscaler_current_replicas", "Replicas known.", ["pool", "model_version"]
)


@dataclass(frozen=True, slots=True)
class PoolSignals:
    active: float
    waiting: float
    kv_utilization: float | None
    reporting: int


@dataclass(frozen=True, slots=True)
class Recommendation:
    pool: str
    model_version: str
    current: int
    desired: int
    reason: str
    signals: PoolSignals
    computed_at: float


def recommend(
    pool: str,
    model_version: str,
    current: int,
    samples: Sequence[EngineSample],
    settings: AutoscalerSettings,
    now: float,
) -> Recommendation:
    if not samples:
        sig = PoolSignals(0.0, 0.0, None, 0)
        return Recommendation(
            pool, model_version, current, current, "no replica reported metrics: holding", sig, now
        )
    active = sum(s.active for s in samples)
    waiting = sum(s.waiting for s in samples)
    kv_max = sum(s.kv_max for s in samples)
    kv_util = sum(s.kv_used for s in samples) / kv_max if kv_max > 0 else None
    sig = PoolSignals(active, waiting, kv_util, len(samples))
    load = active + waiting
    desired = math.ceil(load / settings.target_requests_per_replica)
    reason = f"load {load:g} requests / {settings.target_requests_per_replica:g} per replica"
    if kv_util is not None and kv_util > settings.kv_high_watermark:
        desired = max(desired, current + 1)
        reason += f"; KV use {kv_util:.2f} > {settings.kv_high_watermark:.2f}"
    clamped = min(max(desired, settings.min_replicas), settings.max_replicas)
    if clamped != desired:
        reason += f"; clamped to [{settings.min_replicas}, {settings.max_replicas}]"
    return Recommendation(pool, model_version, current, clamped, reason, sig, now)


class Autoscaler:
    def __init__(
        self,
        settings: AutoscalerSettings,
        fetch: Callable[[str, str, float], str] = fetch_metrics_text,
    ):
        self._settings = settings
        self._fetch = fetch
        self._latest: dict[tuple[str, str], Recommendation] = {}

    async def _scrape(self, target: ScrapeTarget) -> EngineSample | None:
        try:
            text = await asyncio.to_thread(
                self._fetch, target.metrics_url, target.host_header, self._settings.scrape_timeout_s
            )
        except OSError as exc:
            log.info("scrape failed", extra={"replica": target.replica_id, "error": repr(exc)})
            return None
        return parse_engine_metrics(text)

    async def targets(self) -> list[ScrapeTarget]:
        pods = await discover_pods(self._settings.replica_dns)
        return [
            *self._settings.targets,
            *(
                ScrapeTarget(
                    replica_id=p.replica_id,
                    metrics_url=p.metrics_url,
                    pool=p.target.pool,
                    model_version=p.target.model_version,
                    host_header=p.metrics_host,
                )
                for p in pods
            ),
        ]

    async def evaluate(self) -> Mapping[tuple[str, str], Recommendation]:
        targets = await self.targets()
        samples = await asyncio.gather(*(self._scrape(t) for t in targets))
        pools: dict[tuple[str, str], list[EngineSample]] = {}
        counts: dict[tuple[str, str], int] = {}
        for t, s in zip(targets, samples, strict=True):
            key = (t.pool, t.model_version)
            counts[key] = counts.get(key, 0) + 1
            pools.setdefault(key, [])
            if s is not None:
                pools[key].append(s)
        now = time.time()
        for (pool, version), got in pools.items():
            rec = recommend(pool, version, counts[(pool, version)], got, self._settings, now)
            previous = self._latest.get((pool, version))
            if previous is None or previous.desired != rec.desired:
                log.info(
                    "recommendation",
                    extra={
                        "pool": pool,
                        "model_version": version,
                        "desired": rec.desired,
                        "reason": rec.reason,
                    },
                )
            self._latest[(pool, version)] = rec
            _DESIRED.labels(pool, version).set(rec.desired)
            _CURRENT.labels(pool, version).set(rec.current)
        return dict(self._latest)

    def latest(self) -> list[Recommendation]:
        return list(self._latest.values())

    async def run(self) -> None:
        while True:
            await self.evaluate()
            await asyncio.sleep(self._settings.interval_s)
