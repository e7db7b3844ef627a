"""The PromQL signal source: reads the same signals from a Prometheus server's HTTP API
(`/api/v1/query`), one instant query per signal, all in `PromQueries`.

Invariants:
- `collect` never raises: a query Prometheus cannot answer (unreachable, an error, a malformed
  body) is logged and read as no answer; a NaN or infinite sample is unknown.
- Gauges are read with last_over_time over the staleness limit, so older samples are absent;
  rates and percentiles come from `rate` over the rate window, at `QUANTILE`.
- The orchestrators' queue depth, leases and admission rate count only while one's `up` is 1,
  the gateways' token rates only while one gateway's is; while some instance's `up` is 0 those
  sums undercount, and the pools' signals say so (`PoolSignals.unread`). Prometheus cannot tell
  an unexported gauge from one without series: both read 0 for the pool.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
import math
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Final

from llmmesh.common import metric_names as names
from llmmesh.common.engine_metrics import get_bounded
from llmmesh.common.topology import PoolKey
from services.autoscaler.signals import (
    QUANTILE,
    EngineAggregate,
    ModelSignals,
    Observation,
    PoolLabels,
    PoolSignals,
    SourceUnavailable,
    assemble,
    call_deadline_s,
    finite,
    unread,
)

log = logging.getLogger(__name__)


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
    # The same percentiles per pool label (and model version, where Prometheus adds it).
    queue_wait_p90_by_pool: str
    ttft_p90_by_pool: str
    itl_p90_by_pool: str

    @classmethod
    def build(cls, c: PromQLConfig) -> PromQueries:
        age = f"{max(1, math.ceil(c.max_age_s))}s"
        w = f"{max(1, math.ceil(c.rate_window_s))}s"

        def engine_sel(matcher: str) -> str:
            """The engine selector and one more matcher (the selector may be empty)."""
            return f"{c.engine_selector},{matcher}" if c.engine_selector else matcher

        def engine(kind: str, family: str, label: str) -> str:
            sel = engine_sel(f'{label}="{kind}"')
            return f"sum by (pool, model_version) (last_over_time({family}{{{sel}}}[{age}]))"

        req, kv = names.TRTLLM_REQUEST_METRICS, names.TRTLLM_KV_CACHE_BLOCK_METRICS
        # Each engine replica's model version, from its scrape target's labels (`up`): the
        # orchestrator's per-replica series join it `on (replica)`. Not from the engines' own
        # series: while those are missing (renamed, blocked) the join would be empty, and the
        # pool's leases and arrivals would read as none, scaling a busy pool down.
        replicas, active = engine_sel('replica!=""'), engine_sel('request_type="active"')
        replica_version = (
            f"max by (replica, model_version) (last_over_time(up{{{replicas}}}[{age}])) * 0 + 1"
        )

        def quantile(family: str, selector: str, by: str = "model") -> str:
            return (
                f"histogram_quantile({QUANTILE}, sum by ({by}, le) "
                f"(rate({family}_bucket{{{selector}}}[{w}])))"
            )

        def pool_quantile(family: str, selector: str) -> str:
            pooled = f'{selector},pool!=""' if selector else 'pool!=""'
            return quantile(family, pooled, "model, pool, model_version")

        return cls(
            engines_known=f"count by (pool, model_version) (up{{{c.engine_selector}}})",
            engines_reporting=(
                f"count by (pool, model_version) (last_over_time({req}{{{active}}}[{age}]))"
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
            orchestrator_up=f"last_over_time(up{{{c.orchestrator_selector}}}[{age}])",
            admissions=(
                f"sum by (model, pool, model_version) "
                f"(rate({names.ORCH_DECISIONS}{{{c.orchestrator_selector}}}[{w}]) "
                f"* on (replica) group_left (model_version) ({replica_version}))"
            ),
            queue_wait_p90=quantile(names.ORCH_QUEUE_WAIT, c.orchestrator_selector),
            gateway_up=f"last_over_time(up{{{c.gateway_selector}}}[{age}])",
            ttft_p90=quantile(names.GATEWAY_TTFT, c.gateway_selector),
            itl_p90=quantile(names.GATEWAY_ITL, c.gateway_selector),
            tokens=(
                f"sum by (model, kind, pool, model_version) "
                f"(rate({names.GATEWAY_TOKENS}{{{c.gateway_selector}}}[{w}]))"
            ),
            queue_wait_p90_by_pool=pool_quantile(names.ORCH_QUEUE_WAIT, c.orchestrator_selector),
            ttft_p90_by_pool=pool_quantile(names.GATEWAY_TTFT, c.gateway_selector),
            itl_p90_by_pool=pool_quantile(names.GATEWAY_ITL, c.gateway_selector),
        )


Vector = list[tuple[dict[str, str], float | None]]
HttpGet = Callable[[str, float], bytes]


# The largest query answer read (the autoscaler's queries return one series per pool).
MAX_ANSWER_BYTES: Final = 16 << 20


def http_get(url: str, timeout_s: float) -> bytes:
    return get_bounded(url, "", timeout_s, MAX_ANSWER_BYTES)


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
            body = await asyncio.wait_for(
                asyncio.to_thread(self._get, url, self._config.timeout_s),
                call_deadline_s(self._config.timeout_s),
            )
            return parse_vector(body)
        # TimeoutError: OSError; ValueError: over the size bound
        except (OSError, ValueError, PromQLError, http.client.HTTPException) as exc:
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
            q.queue_wait_p90_by_pool,
            q.ttft_p90_by_pool,
            q.itl_p90_by_pool,
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
            waits_by,
            ttft_by,
            itl_by,
        ) = results = await asyncio.gather(*(self.query(n) for n in names))
        if all(r is None for r in results):
            raise SourceUnavailable(
                f"Prometheus at {self._config.base_url}: all {len(names)} queries failed"
            )
        obs = Observation(engines_read=known is not None)
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
        orch_alive = _any_up(orch_up)
        obs.unread = [*_unread("orchestrators", orch_up), *_unread("gateways", gw_up)]
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
        gw_alive = _any_up(gw_up)
        w8, tt, it = _by_model(waits), _by_model(ttft), _by_model(itl)
        w8_by, tt_by, it_by = (
            _by_model_pool(waits_by),
            _by_model_pool(ttft_by),
            _by_model_pool(itl_by),
        )
        tokens: dict[tuple[str, str], float] = {}
        tokens_by: dict[tuple[str, str], dict[PoolLabels, float | None]] = {}
        for labels, value in tok or []:
            if value is not None:
                at = (labels.get("model", ""), labels.get("kind", ""))
                tokens[at] = tokens.get(at, 0.0) + value
                if pool := labels.get("pool", ""):
                    tokens_by.setdefault(at, {})[(pool, labels.get("model_version", ""))] = value
        for m in {*w8, *tt, *it, *(m for m, _ in tokens)}:
            obs.models[m] = ModelSignals(
                queue_wait_p90_s=w8.get(m),
                ttft_p90_s=tt.get(m),
                itl_p90_s=it.get(m),
                prompt_tokens_rate=tokens.get((m, "prompt"), 0.0) if gw_alive else None,
                completion_tokens_rate=tokens.get((m, "completion"), 0.0) if gw_alive else None,
                prompt_tokens_by_pool=tokens_by.get((m, "prompt"), {}) if gw_alive else None,
                completion_tokens_by_pool=(
                    tokens_by.get((m, "completion"), {}) if gw_alive else None
                ),
                queue_wait_by_pool=None if w8_by is None else w8_by.get(m, {}),
                ttft_by_pool=None if tt_by is None else tt_by.get(m, {}),
                itl_by_pool=None if it_by is None else it_by.get(m, {}),
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


def _by_model_pool(vector: Vector | None) -> dict[str, dict[PoolLabels, float | None]] | None:
    """Per model, per (pool, model version) label: the series' value (NaN: none observed);
    None when the query failed (unknown, not "no series labels a pool")."""
    if vector is None:
        return None
    out: dict[str, dict[PoolLabels, float | None]] = {}
    for labels, v in vector:
        pool = labels.get("pool", "")
        if pool:
            at = (pool, labels.get("model_version", ""))
            out.setdefault(labels.get("model", ""), {})[at] = v
    return out


def _any_up(up: Vector | None) -> bool:
    """Whether some instance's `up` is 1."""
    return any(v == 1.0 for _, v in up or [])


def _unread(service: str, up: Vector | None) -> list[str]:
    """`unread` for the instances whose `up` is not 1 among those with one."""
    values = [v for _, v in up or []]
    return unread(service, sum(1 for v in values if v != 1.0), len(values))
