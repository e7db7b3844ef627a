"""The direct-scrape signal source: reads the engines', orchestrator's and gateway's /metrics
pages itself (the local mesh, or a cluster without Prometheus).

Invariants:
- Engine targets are the static list plus the pods behind headless Services, rediscovered each
  round; a target whose page cannot be read or parsed counts as known, not reporting.
- Counters and histogram buckets are kept per series as reset-aware increases (`CounterTrack`),
  bounded in points and pruned once older than the rate window plus the staleness limit.
- A rate or percentile needs two successful reads of its endpoint within the rate window; until
  then it is unknown, not 0. Percentiles follow Prometheus' `histogram_quantile`.
- An orchestrator series labelled by replica belongs to that replica's target pool, or else to its
  pool's only known model version; with neither it is dropped, never guessed.
- Every orchestrator is read (they run active-active, each with its own queue and leases): each
  orchestrator URL's host is resolved every round to all its IPv4 addresses (a headless Service's
  name: one per ready pod; an address: itself) and each is read with the URL's host as Host.
  Their counters are tracked per instance and summed, their gauges summed; the orchestrator
  signals are known when at least one of them was read.
"""

from __future__ import annotations

import asyncio
import http.client
import logging
import math
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

from prometheus_client.parser import text_string_to_metric_families

from llmmesh.common import metric_names as names
from llmmesh.common.discovery import DnsTarget, PodDiscovery, resolve_ipv4
from llmmesh.common.engine_metrics import EngineSample, fetch_metrics_text, parse_engine_metrics
from llmmesh.common.topology import PoolKey
from services.autoscaler.signals import (
    QUANTILE,
    EngineAggregate,
    ModelSignals,
    Observation,
    PoolLabels,
    PoolSignals,
    assemble,
    call_deadline_s,
    finite,
    unread,
)

log = logging.getLogger(__name__)


def family(name: str) -> str:
    """The metric family a parsed page names `name` under: a counter's family has no `_total`
    (its samples do); any other family is named as its metric."""
    return name.removesuffix("_total")


def histogram_quantile(q: float, buckets: Iterable[tuple[float, float]]) -> float | None:
    """Quantile from cumulative (upper bound, count) pairs, linear within a bucket, as
    Prometheus' histogram_quantile: None without observations; the highest finite bound when
    the rank falls in the +Inf bucket."""
    pairs = sorted(buckets)
    if not pairs or not math.isinf(pairs[-1][0]):
        return None
    total = pairs[-1][1]
    if not total > 0:
        return None
    rank = q * total
    prev_bound, prev_count = 0.0, 0.0
    for bound, count in pairs:
        if count >= rank:
            if math.isinf(bound):
                return prev_bound
            if count == prev_count:
                return bound
            lower = prev_bound if prev_bound < bound else 0.0
            return lower + (bound - lower) * (rank - prev_count) / (count - prev_count)
        prev_bound, prev_count = bound, count
    return prev_bound


@dataclass(frozen=True, slots=True)
class EngineTarget:
    replica_id: str
    metrics_url: str
    key: PoolKey
    host_header: str = ""


class CounterTrack:
    """A counter's increase over time, reset-aware; bounded to `max_points` points."""

    __slots__ = ("_last", "_points", "_total")

    def __init__(self, max_points: int):
        self._last: float | None = None
        self._total = 0.0
        self._points: deque[tuple[float, float]] = deque(maxlen=max_points)

    def add(self, t: float, value: float) -> None:
        if not math.isfinite(value):
            return
        if self._last is not None:
            self._total += value - self._last if value >= self._last else value
        self._last = value
        self._points.append((t, self._total))

    @property
    def last_seen(self) -> float:
        return self._points[-1][0] if self._points else -math.inf

    def increase(self, now: float, window_s: float, max_age_s: float) -> tuple[float, float] | None:
        """(increase, seconds) from the oldest point inside the window to the newest; None when
        the newest point is stale or fewer than two points lie in the window."""
        if not self._points or now - self._points[-1][0] > max_age_s:
            return None
        t1, v1 = self._points[-1]
        for t0, v0 in self._points:
            if t0 >= now - window_s:
                return (v1 - v0, t1 - t0) if t1 > t0 else None
        return None


SeriesKey = tuple[str, tuple[tuple[str, str], ...]]
# The label a tracked series gets for the orchestrator instance it was read from.
INSTANCE_LABEL = "__instance__"
Fetch = Callable[[str, str, float], str]
Discover = Callable[[], Awaitable[list[EngineTarget]]]
Resolve = Callable[[str, int], Awaitable[list[str]]]


async def instances(url: str, resolve: Resolve) -> list[tuple[str, str]]:
    """(URL with the host replaced by one of its IPv4 addresses, the original host:port for the
    Host header) per address of `url`'s host; [] when it does not resolve."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        ips = await resolve(host, port)
    except OSError as exc:
        log.info(
            "orchestrator metrics host does not resolve", extra={"url": url, "error": repr(exc)}
        )
        return []
    if ips == [host]:
        return [(url, "")]
    return [(urlunsplit(parts._replace(netloc=f"{ip}:{port}")), f"{host}:{port}") for ip in ips]


class ScrapeSource:
    """Reads the engines', orchestrator's and gateway's /metrics directly (the local mesh, or a
    cluster without Prometheus). Call `collect` at a steady interval: rates need two rounds."""

    def __init__(
        self,
        *,
        targets: Discover,
        orchestrator_urls: Sequence[str],
        gateway_url: str | None,
        pool_models: Mapping[PoolKey, str],
        timeout_s: float,
        rate_window_s: float,
        max_age_s: float,
        pools: Iterable[PoolKey] = (),
        fetch: Fetch = fetch_metrics_text,
        resolve: Resolve = resolve_ipv4,
        max_points: int = 512,
        counted: Callable[[], bool] = lambda: True,
    ):
        """`counted`: whether the targets `targets` answers are every engine there is (a pool
        without one has none), e.g. `TargetDiscovery.complete`; until then an absent pool's
        count is unknown."""
        self._targets = targets
        self._counted = counted
        self._orchestrator_urls = list(orchestrator_urls)
        self._resolve = resolve
        self._gateway_url = gateway_url
        self._pool_models = dict(pool_models)
        self._timeout_s = timeout_s
        self._window_s = rate_window_s
        self._max_age_s = max_age_s
        self._fetch = fetch
        self._max_points = max_points
        self._counters: dict[SeriesKey, CounterTrack] = {}
        self._replica_keys: dict[str, PoolKey] = {}
        self._pools = {*pools, *pool_models}
        self._last_ok: dict[str, float] = {}

    async def _get(self, url: str, host: str = "") -> str | None:
        """The page, or None when it cannot be read: refused, broken HTTP (IncompleteRead,
        BadStatusLine), too large, or not whole within `call_deadline_s(timeout_s)` (the fetch's
        timeout is per socket operation: an endpoint trickling bytes would hold the round)."""
        try:
            return await asyncio.wait_for(
                asyncio.to_thread(self._fetch, url, host, self._timeout_s),
                call_deadline_s(self._timeout_s),
            )
        except (OSError, ValueError, http.client.HTTPException) as exc:  # TimeoutError: OSError
            log.info("scrape failed", extra={"url": url, "error": repr(exc)})
            return None

    def _track(self, now: float, text: str, prefixes: tuple[str, ...], instance: str = "") -> bool:
        """Feed counter/histogram samples named with `prefixes` into their tracks (one track per
        series and `instance`: the same series of two orchestrators are two counters)."""
        try:
            families = list(text_string_to_metric_families(text))
        except ValueError as exc:
            log.info("unparsable metrics page", extra={"error": repr(exc)})
            return False
        for fam in families:
            if not fam.name.startswith(prefixes):
                continue
            for s in fam.samples:
                if not s.name.endswith(("_total", "_bucket")):
                    continue
                labels = {**s.labels, INSTANCE_LABEL: instance} if instance else s.labels
                key = (s.name, tuple(sorted(labels.items())))
                track = self._counters.get(key)
                if track is None:
                    track = self._counters[key] = CounterTrack(self._max_points)
                track.add(now, float(s.value))
        return True

    def _increases(self, now: float, name: str) -> list[tuple[dict[str, str], float, float]]:
        out = []
        for (n, labels), track in self._counters.items():
            if n != name:
                continue
            inc = track.increase(now, self._window_s, self._max_age_s)
            if inc is not None:
                out.append((dict(labels), inc[0], inc[1]))
        return out

    def _rates(self, now: float, name: str, by: Sequence[str]) -> dict[tuple[str, ...], float]:
        out: dict[tuple[str, ...], float] = {}
        for labels, inc, seconds in self._increases(now, name):
            if seconds > 0:
                k = tuple(labels.get(b, "") for b in by)
                out[k] = out.get(k, 0.0) + inc / seconds
        return out

    def _quantiles(
        self, now: float, family: str
    ) -> tuple[dict[str, float | None], dict[str, dict[PoolLabels, float | None]]]:
        """Per model, the histogram's `QUANTILE` over the window: over all its series, and per
        (pool, model version) label of the series that carry a pool (`ModelSignals`)."""
        per_model: dict[str, dict[float, float]] = {}
        per_pool: dict[str, dict[PoolLabels, dict[float, float]]] = {}
        for labels, inc, _ in self._increases(now, f"{family}_bucket"):
            try:
                bound = float(labels.get("le", "nan"))
            except ValueError:
                continue
            model = labels.get("model", "")
            buckets = per_model.setdefault(model, {})
            buckets[bound] = buckets.get(bound, 0.0) + inc
            pool = labels.get("pool", "")
            if pool:
                at = (pool, labels.get("model_version", ""))
                buckets = per_pool.setdefault(model, {}).setdefault(at, {})
                buckets[bound] = buckets.get(bound, 0.0) + inc
        return (
            {m: histogram_quantile(QUANTILE, b.items()) for m, b in per_model.items()},
            {
                m: {at: histogram_quantile(QUANTILE, b.items()) for at, b in pools.items()}
                for m, pools in per_pool.items()
            },
        )

    def _prune(self, now: float) -> None:
        horizon = self._window_s + self._max_age_s
        for key in [k for k, t in self._counters.items() if now - t.last_seen > horizon]:
            del self._counters[key]

    async def _orchestrator_pages(self) -> tuple[list[tuple[str, str]], int]:
        """(instance URL, page) of every orchestrator read this round, and how many there
        are."""
        found = await asyncio.gather(
            *(instances(u, self._resolve) for u in self._orchestrator_urls)
        )
        endpoints = list(dict.fromkeys(e for group in found for e in group))
        pages = await asyncio.gather(*(self._get(url, host) for url, host in endpoints))
        read = [(url, text) for (url, _), text in zip(endpoints, pages, strict=True) if text]
        return read, len(endpoints)

    async def collect(self, now: float) -> Mapping[PoolKey, PoolSignals]:
        targets = await self._targets()
        self._replica_keys = {t.replica_id: t.key for t in targets}
        engine_pages, (orch_pages, orchestrators), gw_text = await asyncio.gather(
            asyncio.gather(*(self._get(t.metrics_url, t.host_header) for t in targets)),
            self._orchestrator_pages(),
            self._get(self._gateway_url) if self._gateway_url else _none(),
        )
        obs = Observation(engines_read=self._counted())
        for target, text in zip(targets, engine_pages, strict=True):
            obs.engines.setdefault(target.key, EngineAggregate()).add(_engine_sample(text))
        orch_read = [
            (url, text)
            for url, text in orch_pages
            if self._track(
                now, text, (family(names.ORCH_DECISIONS), names.ORCH_QUEUE_WAIT), instance=url
            )
        ]
        orch_ok = bool(orch_read)
        obs.unread = unread("orchestrators", orchestrators - len(orch_read), orchestrators)
        gw_ok = gw_text is not None and self._track(
            now, gw_text, (names.GATEWAY_TTFT, names.GATEWAY_ITL, family(names.GATEWAY_TOKENS))
        )
        self._prune(now)
        # A rate needs two reads within the window: until then it is unknown, not 0.
        orch_rates = self._warm("orchestrator", now, orch_ok)
        gw_rates = self._warm("gateway", now, gw_ok)
        if orch_ok:
            obs.queue_depth = _summed(
                _pool_gauge(text, names.ORCH_POOL_QUEUE_DEPTH) for _, text in orch_read
            )
            obs.leases = _summed(
                self._replica_gauge(text, names.ORCH_REPLICA_IN_FLIGHT) for _, text in orch_read
            )
        if orch_rates:
            obs.admissions = {}
            for (model, replica, pool), rate in self._rates(
                now, names.ORCH_DECISIONS, ("model", "replica", "pool")
            ).items():
                key = self._replica_keys.get(replica) or self._sole_version(pool)
                if key is not None:
                    obs.admissions[(model, key)] = obs.admissions.get((model, key), 0.0) + rate
        waits, waits_by = self._quantiles(now, names.ORCH_QUEUE_WAIT) if orch_ok else ({}, {})
        ttft, ttft_by = self._quantiles(now, names.GATEWAY_TTFT) if gw_ok else ({}, {})
        itl, itl_by = self._quantiles(now, names.GATEWAY_ITL) if gw_ok else ({}, {})
        tokens = (
            self._rates(now, names.GATEWAY_TOKENS, ("model", "kind", "pool", "model_version"))
            if gw_ok
            else {}
        )
        by_model: dict[tuple[str, str], float] = {}
        by_pool: dict[tuple[str, str], dict[PoolLabels, float | None]] = {}
        for (m, kind, pool, version), rate in tokens.items():
            by_model[(m, kind)] = by_model.get((m, kind), 0.0) + rate
            if pool:
                pools = by_pool.setdefault((m, kind), {})
                pools[(pool, version)] = (pools.get((pool, version)) or 0.0) + rate
        models = {*waits, *ttft, *itl, *(m for m, _ in by_model)}
        for m in models:
            obs.models[m] = ModelSignals(
                queue_wait_p90_s=waits.get(m),
                ttft_p90_s=ttft.get(m),
                itl_p90_s=itl.get(m),
                prompt_tokens_rate=by_model.get((m, "prompt"), 0.0) if gw_rates else None,
                completion_tokens_rate=by_model.get((m, "completion"), 0.0) if gw_rates else None,
                prompt_tokens_by_pool=by_pool.get((m, "prompt"), {}) if gw_rates else None,
                completion_tokens_by_pool=by_pool.get((m, "completion"), {}) if gw_rates else None,
                queue_wait_by_pool=waits_by.get(m, {}),
                ttft_by_pool=ttft_by.get(m, {}),
                itl_by_pool=itl_by.get(m, {}),
            )
        return assemble(obs, self._pool_models, now)

    def _warm(self, endpoint: str, now: float, ok: bool) -> bool:
        """Whether `endpoint` was also read successfully earlier within the window."""
        previous = self._last_ok.get(endpoint)
        if ok:
            self._last_ok[endpoint] = now
        return ok and previous is not None and 0 < now - previous <= self._window_s

    def _sole_version(self, pool: str) -> PoolKey | None:
        """A replica the targets do not list (e.g. started by an actuator) belongs to its pool's
        only known model version, if there is exactly one."""
        versions = {k for k in (*self._replica_keys.values(), *self._pools) if k.pool == pool}
        return next(iter(versions)) if len(versions) == 1 else None

    def _replica_gauge(self, text: str, name: str) -> dict[PoolKey, float] | None:
        """Per-pool sum of a gauge labelled {replica, pool}; None when the family is absent."""
        try:
            families = list(text_string_to_metric_families(text))
        except ValueError:
            return None
        for fam in families:
            if fam.name != name:
                continue
            out: dict[PoolKey, float] = {}
            for s in fam.samples:
                replica, pool = s.labels.get("replica", ""), s.labels.get("pool", "")
                key = self._replica_keys.get(replica) or self._sole_version(pool)
                value = finite(float(s.value))
                if key is not None and value is not None:
                    out[key] = out.get(key, 0.0) + value
            return out
        return None

    async def close(self) -> None:
        return None


def _engine_sample(text: str | None) -> EngineSample | None:
    if text is None:
        return None
    try:
        return parse_engine_metrics(text)
    except ValueError as exc:  # the parser raises on a malformed page
        log.info("unparsable engine metrics", extra={"error": repr(exc)})
        return None


async def _none() -> None:
    return None


def _summed(gauges: Iterable[dict[PoolKey, float] | None]) -> dict[PoolKey, float] | None:
    """Per-pool sums over the orchestrators' pages; None when no page had the family."""
    out: dict[PoolKey, float] | None = None
    for g in gauges:
        if g is None:
            continue
        out = out if out is not None else {}
        for k, v in g.items():
            out[k] = out.get(k, 0.0) + v
    return out


def _pool_gauge(text: str, name: str) -> dict[PoolKey, float] | None:
    """Per-pool values of a gauge labelled {pool, model_version}; None when the family is absent
    (a present family without a pool's series means 0 for it)."""
    try:
        families = list(text_string_to_metric_families(text))
    except ValueError:
        return None
    for fam in families:
        if fam.name != name:
            continue
        out: dict[PoolKey, float] = {}
        for s in fam.samples:
            key = PoolKey(s.labels.get("pool", ""), s.labels.get("model_version", ""))
            value = finite(float(s.value))
            if value is not None:
                out[key] = out.get(key, 0.0) + value
        return out
    return None


class TargetDiscovery:
    """Engine targets: the static list plus every pod behind the headless Services (a Service
    that fails to resolve keeps its last pods)."""

    def __init__(self, static: Sequence[EngineTarget], dns: Sequence[DnsTarget]) -> None:
        self._static = list(static)
        self._pods = PodDiscovery(dns)

    @property
    def complete(self) -> bool:
        """Every Service has answered once: a pool without targets has no engines."""
        return self._pods.complete

    async def __call__(self) -> list[EngineTarget]:
        pods = await self._pods()
        return [
            *self._static,
            *(
                EngineTarget(
                    replica_id=p.replica_id,
                    metrics_url=p.metrics_url,
                    key=PoolKey(p.target.pool, p.target.model_version),
                    host_header=p.metrics_host,
                )
                for p in pods
            ),
        ]


def target_discovery(static: Sequence[EngineTarget], dns: Sequence[DnsTarget]) -> TargetDiscovery:
    return TargetDiscovery(static, dns)
