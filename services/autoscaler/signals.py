"""Per-pool load signals and the sources that read them.

Invariants:
- Every signal is `None` when it is not known: never read, not finite (NaN/Inf), or older than
  `max_age_s`. A source never substitutes a guess; the policy decides what unknown means.
- A pool is a `PoolKey` (orchestrator pool, model version). Engine gauges carry both; orchestrator
  admissions are attributed to a pool through the replica that served them; gateway signals are
  labelled by served model and apply to every pool serving that model, its token rates split in
  proportion to the pool's share of the model's admissions.
- Rates and percentiles come from counter/histogram increases over `rate_window_s`, reset-aware
  (a counter that goes down restarted from zero).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import urllib.parse
import urllib.request
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

from prometheus_client.parser import text_string_to_metric_families

from llmmesh.common import metric_names as names
from llmmesh.common.discovery import DnsTarget, discover_pods
from llmmesh.common.engine_metrics import EngineSample, fetch_metrics_text, parse_engine_metrics
from llmmesh.common.topology import PoolKey

log = logging.getLogger(__name__)

QUANTILE = 0.9


def family(name: str) -> str:
    """The metric family a parsed page names `name` under: a counter's family has no `_total`
    (its samples do); any other family is named as its metric."""
    return name.removesuffix("_total")


@dataclass(frozen=True, slots=True)
class PoolSignals:
    """What is known about one pool at `sampled_at` (unix seconds). `None` = unknown."""

    sampled_at: float
    replicas_known: int | None = None
    """Engine replicas the source knows of (targets, discovered pods), reporting or not."""
    reporting_replicas: int | None = None
    """Engine replicas whose metrics were read."""
    engine_active: float | None = None
    engine_waiting: float | None = None
    kv_utilization: float | None = None
    """Used / max KV blocks over the pool's reporting engines, in [0, 1]."""
    queue_depth: float | None = None
    """Requests waiting in the orchestrator's admission queue for this pool."""
    leases_in_flight: float | None = None
    """The orchestrator's live leases on the pool's replicas (requests being served)."""
    queue_wait_p90_s: float | None = None
    ttft_p90_s: float | None = None
    itl_p90_s: float | None = None
    arrival_rate: float | None = None
    """Requests per second admitted to this pool."""
    prompt_tokens_rate: float | None = None
    completion_tokens_rate: float | None = None

    def age_s(self, now: float) -> float:
        return max(0.0, now - self.sampled_at)

    @property
    def in_flight(self) -> float | None:
        """Requests in the pool's engines; the orchestrator's leases when no engine is read."""
        if self.engine_active is None or self.engine_waiting is None:
            return self.leases_in_flight
        return self.engine_active + self.engine_waiting


class SignalSource(Protocol):
    """Reads every pool's signals. `collect` never raises for an unreachable or malformed
    endpoint: what could not be read is `None`."""

    async def collect(self, now: float) -> Mapping[PoolKey, PoolSignals]: ...

    async def close(self) -> None: ...


def finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


# --- aggregation shared by both sources ----------------------------------------------------


@dataclass(slots=True)
class EngineAggregate:
    known: int = 0
    reporting: int = 0
    active: float = 0.0
    waiting: float = 0.0
    kv_used: float = 0.0
    kv_max: float = 0.0

    def add(self, sample: EngineSample | None) -> None:
        self.known += 1
        if sample is None:
            return
        self.reporting += 1
        self.active += sample.active
        self.waiting += sample.waiting
        self.kv_used += sample.kv_used
        self.kv_max += sample.kv_max


@dataclass(frozen=True, slots=True)
class ModelSignals:
    """Signals the gateway and orchestrator label by served model only."""

    queue_wait_p90_s: float | None = None
    ttft_p90_s: float | None = None
    itl_p90_s: float | None = None
    prompt_tokens_rate: float | None = None
    completion_tokens_rate: float | None = None


@dataclass(slots=True)
class Observation:
    """One round of raw readings, before attribution to pools."""

    engines: dict[PoolKey, EngineAggregate] = field(default_factory=dict)
    queue_depth: dict[PoolKey, float] | None = None
    """None: the orchestrator gauge could not be read (a pool absent from a read gauge: 0)."""
    admissions: dict[tuple[str, PoolKey], float] | None = None
    """Admission rate per (model, pool); None: unknown (a pool absent from a known map: 0)."""
    leases: dict[PoolKey, float] | None = None
    """Live leases per pool; None: unknown (a pool absent from a known map: 0)."""
    models: dict[str, ModelSignals] = field(default_factory=dict)


def assemble(
    obs: Observation, pool_models: Mapping[PoolKey, str], now: float
) -> dict[PoolKey, PoolSignals]:
    """Attribute an observation to pools (see the module invariants)."""
    keys: set[PoolKey] = set(obs.engines) | set(pool_models)
    if obs.queue_depth is not None:
        keys |= set(obs.queue_depth)
    if obs.admissions is not None:
        keys |= {k for _, k in obs.admissions}
    seen_models = set(obs.models) | ({m for m, _ in obs.admissions} if obs.admissions else set())
    sole = next(iter(seen_models)) if len(seen_models) == 1 else None

    def model_of(key: PoolKey) -> str | None:
        return pool_models.get(key) or sole

    pools_of: dict[str, list[PoolKey]] = {}
    for key in keys:
        m = model_of(key)
        if m is not None:
            pools_of.setdefault(m, []).append(key)

    out: dict[PoolKey, PoolSignals] = {}
    for key in sorted(keys):
        eng = obs.engines.get(key)
        sig = PoolSignals(sampled_at=now)
        if eng is not None:
            sig = replace(sig, replicas_known=eng.known, reporting_replicas=eng.reporting)
            if eng.reporting:
                sig = replace(
                    sig,
                    engine_active=finite(eng.active),
                    engine_waiting=finite(eng.waiting),
                    kv_utilization=finite(eng.kv_used / eng.kv_max) if eng.kv_max > 0 else None,
                )
        if obs.queue_depth is not None:
            sig = replace(sig, queue_depth=finite(obs.queue_depth.get(key, 0.0)))
        if obs.leases is not None:
            sig = replace(sig, leases_in_flight=finite(obs.leases.get(key, 0.0)))
        model = model_of(key)
        if obs.admissions is not None:
            arrivals = sum(v for (_, k), v in obs.admissions.items() if k == key)
            sig = replace(sig, arrival_rate=finite(arrivals))
        if model is not None and model in obs.models:
            ms = obs.models[model]
            share = _share(obs.admissions, model, key, pools_of.get(model, [key]))
            sig = replace(
                sig,
                queue_wait_p90_s=ms.queue_wait_p90_s,
                ttft_p90_s=ms.ttft_p90_s,
                itl_p90_s=ms.itl_p90_s,
                prompt_tokens_rate=_scaled(ms.prompt_tokens_rate, share),
                completion_tokens_rate=_scaled(ms.completion_tokens_rate, share),
            )
        out[key] = sig
    return out


def _share(
    admissions: Mapping[tuple[str, PoolKey], float] | None,
    model: str,
    key: PoolKey,
    pools: Sequence[PoolKey],
) -> float | None:
    """This pool's fraction of the model's admissions; even split when nothing was admitted."""
    if admissions is None:
        return 1.0 if len(pools) == 1 else None
    total = sum(v for (m, _), v in admissions.items() if m == model)
    if total > 0:
        return admissions.get((model, key), 0.0) / total
    return 1.0 / max(1, len(pools))


def _scaled(value: float | None, share: float | None) -> float | None:
    return None if value is None or share is None else finite(value * share)


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


# --- direct scraping ------------------------------------------------------------------------


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
Fetch = Callable[[str, str, float], str]
Discover = Callable[[], Awaitable[list[EngineTarget]]]


class ScrapeSource:
    """Reads the engines', orchestrator's and gateway's /metrics directly (the local mesh, or a
    cluster without Prometheus). Call `collect` at a steady interval: rates need two rounds."""

    def __init__(
        self,
        *,
        targets: Discover,
        orchestrator_url: str | None,
        gateway_url: str | None,
        pool_models: Mapping[PoolKey, str],
        timeout_s: float,
        rate_window_s: float,
        max_age_s: float,
        pools: Iterable[PoolKey] = (),
        fetch: Fetch = fetch_metrics_text,
        max_points: int = 512,
    ):
        self._targets = targets
        self._orchestrator_url = orchestrator_url
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
        try:
            return await asyncio.to_thread(self._fetch, url, host, self._timeout_s)
        except (OSError, ValueError) as exc:
            log.info("scrape failed", extra={"url": url, "error": repr(exc)})
            return None

    def _track(self, now: float, text: str, prefixes: tuple[str, ...]) -> bool:
        """Feed counter/histogram samples named with `prefixes` into their tracks."""
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
                key = (s.name, tuple(sorted(s.labels.items())))
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

    def _quantiles(self, now: float, family: str) -> dict[str, float | None]:
        per_model: dict[str, dict[float, float]] = {}
        for labels, inc, _ in self._increases(now, f"{family}_bucket"):
            try:
                bound = float(labels.get("le", "nan"))
            except ValueError:
                continue
            buckets = per_model.setdefault(labels.get("model", ""), {})
            buckets[bound] = buckets.get(bound, 0.0) + inc
        return {m: histogram_quantile(QUANTILE, b.items()) for m, b in per_model.items()}

    def _prune(self, now: float) -> None:
        horizon = self._window_s + self._max_age_s
        for key in [k for k, t in self._counters.items() if now - t.last_seen > horizon]:
            del self._counters[key]

    async def collect(self, now: float) -> Mapping[PoolKey, PoolSignals]:
        targets = await self._targets()
        self._replica_keys = {t.replica_id: t.key for t in targets}
        pages = await asyncio.gather(
            *(self._get(t.metrics_url, t.host_header) for t in targets),
            self._get(self._orchestrator_url) if self._orchestrator_url else _none(),
            self._get(self._gateway_url) if self._gateway_url else _none(),
        )
        *engine_pages, orch_text, gw_text = pages
        obs = Observation()
        for target, text in zip(targets, engine_pages, strict=True):
            obs.engines.setdefault(target.key, EngineAggregate()).add(_engine_sample(text))
        orch_ok = orch_text is not None and self._track(
            now, orch_text, (family(names.ORCH_DECISIONS), names.ORCH_QUEUE_WAIT)
        )
        gw_ok = gw_text is not None and self._track(
            now, gw_text, (names.GATEWAY_TTFT, names.GATEWAY_ITL, family(names.GATEWAY_TOKENS))
        )
        self._prune(now)
        # A rate needs two reads within the window: until then it is unknown, not 0.
        orch_rates = self._warm("orchestrator", now, orch_ok)
        gw_rates = self._warm("gateway", now, gw_ok)
        if orch_ok and orch_text is not None:
            obs.queue_depth = _pool_gauge(orch_text, names.ORCH_POOL_QUEUE_DEPTH)
            obs.leases = self._replica_gauge(orch_text, names.ORCH_REPLICA_IN_FLIGHT)
        if orch_rates:
            obs.admissions = {}
            for (model, replica, pool), rate in self._rates(
                now, names.ORCH_DECISIONS, ("model", "replica", "pool")
            ).items():
                key = self._replica_keys.get(replica) or self._sole_version(pool)
                if key is not None:
                    obs.admissions[(model, key)] = obs.admissions.get((model, key), 0.0) + rate
        waits = self._quantiles(now, names.ORCH_QUEUE_WAIT) if orch_ok else {}
        ttft = self._quantiles(now, names.GATEWAY_TTFT) if gw_ok else {}
        itl = self._quantiles(now, names.GATEWAY_ITL) if gw_ok else {}
        tokens = self._rates(now, names.GATEWAY_TOKENS, ("model", "kind")) if gw_ok else {}
        models = {*waits, *ttft, *itl, *(m for m, _ in tokens)}
        for m in models:
            obs.models[m] = ModelSignals(
                queue_wait_p90_s=waits.get(m),
                ttft_p90_s=ttft.get(m),
                itl_p90_s=itl.get(m),
                prompt_tokens_rate=tokens.get((m, "prompt"), 0.0) if gw_rates else None,
                completion_tokens_rate=tokens.get((m, "completion"), 0.0) if gw_rates else None,
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


def target_discovery(static: Sequence[EngineTarget], dns: Sequence[DnsTarget]) -> Discover:
    """Engine targets: the static list plus every pod behind the headless Services."""

    async def discover() -> list[EngineTarget]:
        pods = await discover_pods(dns)
        return [
            *static,
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

    return discover


# --- Prometheus ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PromQLConfig:
    base_url: str
    timeout_s: float
    rate_window_s: float
    max_age_s: float
    engine_selector: str
    orchestrator_selector: str
    gateway_selector: str


@dataclass(frozen=True, slots=True)
class PromQueries:
    """Every query the PromQL source runs, in one place. Engine series carry the target labels
    `pool`, `model_version` and `replica` (mesh/observability/prometheus/scrape-configs.yaml);
    gauges are read with last_over_time over the staleness limit, so older samples are absent."""

    engines_known: str
    engines_reporting: str
    engine_active: str
    engine_waiting: str
    kv_used: str
    kv_max: str
    queue_depth: str
    leases: str
    orchestrator_up: str
    admissions: str
    queue_wait_p90: str
    gateway_up: str
    ttft_p90: str
    itl_p90: str
    tokens: str

    @classmethod
    def build(cls, c: PromQLConfig) -> PromQueries:
        age = f"{max(1, math.ceil(c.max_age_s))}s"
        w = f"{max(1, math.ceil(c.rate_window_s))}s"

        def engine(kind: str, family: str, label: str) -> str:
            sel = (
                f'{c.engine_selector},{label}="{kind}"'
                if c.engine_selector
                else f'{label}="{kind}"'
            )
            return f"sum by (pool, model_version) (last_over_time({family}{{{sel}}}[{age}]))"

        req, kv = names.TRTLLM_REQUEST_METRICS, names.TRTLLM_KV_CACHE_BLOCK_METRICS
        replica_version = (
            "max by (replica, model_version) "
            f'(last_over_time({req}{{request_type="active"}}[{age}])) * 0 + 1'
        )

        def quantile(family: str, selector: str) -> str:
            return (
                f"histogram_quantile({QUANTILE}, sum by (model, le) "
                f"(rate({family}_bucket{{{selector}}}[{w}])))"
            )

        return cls(
            engines_known=f"count by (pool, model_version) (up{{{c.engine_selector}}})",
            engines_reporting=(
                "count by (pool, model_version) "
                f'(last_over_time({req}{{{c.engine_selector},request_type="active"}}[{age}]))'
            ),
            engine_active=engine("active", req, "request_type"),
            engine_waiting=engine("waiting", req, "request_type"),
            kv_used=engine("used", kv, "kv_cache_block_type"),
            kv_max=engine("max", kv, "kv_cache_block_type"),
            queue_depth=(
                f"sum by (pool, model_version) "
                f"(last_over_time({names.ORCH_POOL_QUEUE_DEPTH}{{{c.orchestrator_selector}}}[{age}]))"
            ),
            leases=(
                f"sum by (pool, model_version) "
                f"(last_over_time({names.ORCH_REPLICA_IN_FLIGHT}{{{c.orchestrator_selector}}}[{age}]) "
                f"* on (replica) group_left (model_version) ({replica_version}))"
            ),
            orchestrator_up=f"max(last_over_time(up{{{c.orchestrator_selector}}}[{age}]))",
            admissions=(
                f"sum by (model, pool, model_version) "
                f"(rate({names.ORCH_DECISIONS}{{{c.orchestrator_selector}}}[{w}]) "
                f"* on (replica) group_left (model_version) ({replica_version}))"
            ),
            queue_wait_p90=quantile(names.ORCH_QUEUE_WAIT, c.orchestrator_selector),
            gateway_up=f"max(last_over_time(up{{{c.gateway_selector}}}[{age}]))",
            ttft_p90=quantile(names.GATEWAY_TTFT, c.gateway_selector),
            itl_p90=quantile(names.GATEWAY_ITL, c.gateway_selector),
            tokens=f"sum by (model, kind) (rate({names.GATEWAY_TOKENS}{{{c.gateway_selector}}}[{w}]))",
        )


Vector = list[tuple[dict[str, str], float | None]]
HttpGet = Callable[[str, float], bytes]


def http_get(url: str, timeout_s: float) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout_s) as resp:
        return bytes(resp.read())


class PromQLError(RuntimeError):
    pass


def parse_vector(body: bytes) -> Vector:
    """An instant-query answer as (labels, value); non-finite values (NaN) become None."""
    try:
        doc = json.loads(body)
    except ValueError as exc:
        raise PromQLError(f"not JSON: {exc}") from None
    if not isinstance(doc, dict) or doc.get("status") != "success":
        err = doc.get("error") if isinstance(doc, dict) else None
        raise PromQLError(f"query failed: {err or 'malformed answer'}")
    data = doc.get("data")
    if not isinstance(data, dict):
        raise PromQLError("answer without data")
    kind, result = data.get("resultType"), data.get("result")
    if kind == "scalar" and isinstance(result, list) and len(result) == 2:
        return [({}, _number(result[1]))]
    if kind != "vector" or not isinstance(result, list):
        raise PromQLError(f"expected an instant vector, got {kind!r}")
    out: Vector = []
    for item in result:
        if not isinstance(item, dict):
            raise PromQLError("malformed vector element")
        metric, value = item.get("metric", {}), item.get("value")
        if not isinstance(metric, dict) or not isinstance(value, list) or len(value) != 2:
            raise PromQLError("malformed vector element")
        out.append(({str(k): str(v) for k, v in metric.items()}, _number(value[1])))
    return out


def _number(text: object) -> float | None:
    try:
        return finite(float(str(text)))
    except ValueError:
        return None


class PromQLSource:
    """Reads the same signals from a Prometheus server's HTTP API (`/api/v1/query`)."""

    def __init__(
        self, config: PromQLConfig, pool_models: Mapping[PoolKey, str], get: HttpGet = http_get
    ):
        self._config = config
        self._queries = PromQueries.build(config)
        self._pool_models = dict(pool_models)
        self._get = get

    @property
    def queries(self) -> PromQueries:
        return self._queries

    async def query(self, promql: str) -> Vector | None:
        """One instant query; None when Prometheus cannot be asked or answers an error."""
        url = (
            f"{self._config.base_url.rstrip('/')}/api/v1/query?"
            f"{urllib.parse.urlencode({'query': promql})}"
        )
        try:
            body = await asyncio.to_thread(self._get, url, self._config.timeout_s)
            return parse_vector(body)
        except (OSError, PromQLError) as exc:
            log.info("promql query failed", extra={"query": promql, "error": repr(exc)})
            return None

    async def collect(self, now: float) -> Mapping[PoolKey, PoolSignals]:
        q = self._queries
        names = [
            q.engines_known,
            q.engines_reporting,
            q.engine_active,
            q.engine_waiting,
            q.kv_used,
            q.kv_max,
            q.queue_depth,
            q.leases,
            q.orchestrator_up,
            q.admissions,
            q.queue_wait_p90,
            q.gateway_up,
            q.ttft_p90,
            q.itl_p90,
            q.tokens,
        ]
        (
            known,
            rep,
            active,
            waiting,
            used,
            kmax,
            queue,
            lease,
            orch_up,
            adm,
            waits,
            gw_up,
            ttft,
            itl,
            tok,
        ) = await asyncio.gather(*(self.query(n) for n in names))
        obs = Observation()
        kn, rp = _by_pool(known), _by_pool(rep)
        act, wai, use, mx = _by_pool(active), _by_pool(waiting), _by_pool(used), _by_pool(kmax)
        for key in set(kn) | set(rp):
            reporting = int(rp.get(key, 0))
            agg = EngineAggregate(known=max(int(kn.get(key, 0)), reporting))
            if reporting and key in act and key in wai and key in use and key in mx:
                agg.reporting = reporting
                agg.active, agg.waiting = act[key], wai[key]
                agg.kv_used, agg.kv_max = use[key], mx[key]
            obs.engines[key] = agg
        orch_alive = _scalar(orch_up) == 1.0
        if orch_alive and queue is not None:
            # Prometheus cannot tell an unexported gauge from one without series: both read 0.
            obs.queue_depth = _by_pool(queue)
        if orch_alive and lease is not None:
            obs.leases = _by_pool(lease)
        if orch_alive and adm is not None:
            obs.admissions = {}
            for labels, value in adm:
                if value is not None:
                    key = PoolKey(labels.get("pool", ""), labels.get("model_version", ""))
                    obs.admissions[(labels.get("model", ""), key)] = value
        gw_alive = _scalar(gw_up) == 1.0
        w8, tt, it = _by_model(waits), _by_model(ttft), _by_model(itl)
        tokens: dict[tuple[str, str], float] = {}
        for labels, value in tok or []:
            if value is not None:
                tokens[(labels.get("model", ""), labels.get("kind", ""))] = value
        for m in {*w8, *tt, *it, *(m for m, _ in tokens)}:
            obs.models[m] = ModelSignals(
                queue_wait_p90_s=w8.get(m),
                ttft_p90_s=tt.get(m),
                itl_p90_s=it.get(m),
                prompt_tokens_rate=tokens.get((m, "prompt"), 0.0) if gw_alive else None,
                completion_tokens_rate=tokens.get((m, "completion"), 0.0) if gw_alive else None,
            )
        return assemble(obs, self._pool_models, now)

    async def close(self) -> None:
        return None


def _by_pool(vector: Vector | None) -> dict[PoolKey, float]:
    out: dict[PoolKey, float] = {}
    for labels, value in vector or []:
        if value is not None:
            out[PoolKey(labels.get("pool", ""), labels.get("model_version", ""))] = value
    return out


def _by_model(vector: Vector | None) -> dict[str, float]:
    return {labels.get("model", ""): v for labels, v in vector or [] if v is not None}


def _scalar(vector: Vector | None) -> float | None:
    if not vector:
        return None
    return vector[0][1]
