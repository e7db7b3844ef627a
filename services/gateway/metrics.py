"""The gateway's Prometheus metrics and the only code that updates them.

Modules call `record_*` (or, on the per-token path, the children `StreamMetrics` resolved once
per attempt); none touches a metric object. Names come from `llmmesh.common.metric_names`.

Label bounds: `model` is a served model name or "unknown"; `tenant` comes from the tenants file
only ("" without authentication, never the client's `user` hint); `pool` is the pool of the
replica an attempt was leased (the orchestrator's policy names them; "" before a lease).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import Counter, Gauge, Histogram

from llmmesh.common import metric_names as names
from llmmesh.common.errors import (
    Cancelled,
    DeadlineExceeded,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    ServiceError,
    Unauthenticated,
    Unavailable,
)
from services.gateway.errors import RateLimited, ReplicaFailed, RequestIdConflict

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 2.5, 5, 10, 30)

# By the serving replica's pool too: the autoscaler judges each pool by its own latencies (a
# long-prompt pool's first tokens are slow by design). The model version is not a label: each
# gateway serves one, and Prometheus adds it from the pod (mesh/observability/prometheus).
_TTFT = Histogram(
    names.GATEWAY_TTFT, "Time to first token.", ["model", "pool"], buckets=_LATENCY_BUCKETS
)
_ITL = Histogram(
    names.GATEWAY_ITL, "Gap between tokens.", ["model", "pool"], buckets=_LATENCY_BUCKETS
)
_DURATION = Histogram(names.GATEWAY_DURATION, "Whole request.", ["model"], buckets=_LATENCY_BUCKETS)
# outcome: `outcome_label`'s bounded set.
_REQUESTS = Counter(names.GATEWAY_REQUESTS, "Requests by outcome.", ["model", "outcome", "tenant"])
# Per attempt, by the serving replica's pool: what its engines processed (an attempt's prompt
# is the request's prompt plus what earlier attempts generated), so the autoscaler plans each
# pool for its own request shape (a long-prompt pool's are not the model's average).
_TOKENS = Counter(
    names.GATEWAY_TOKENS, "Tokens processed by the engines.", ["model", "pool", "kind"]
)
_IN_FLIGHT = Gauge(names.GATEWAY_IN_FLIGHT, "Requests being served.", ["model"])
# Only with authentication (a tenant from the tenants file).
_TENANT_TOKENS = Counter(names.GATEWAY_TENANT_TOKENS, "Tokens per tenant.", ["tenant", "kind"])
_RATE_LIMITED = Counter(
    names.GATEWAY_RATE_LIMITED, "Requests refused by a tenant limit.", ["tenant", "limit"]
)
# Shared rate limiter (limits_redis.py). op: admit | charge (completion tokens and refunds).
_RATE_LIMIT_REDIS_ERRORS = Counter(
    names.GATEWAY_RATE_LIMIT_REDIS_ERRORS,
    "Redis calls of the shared rate limiter that failed (connection, timeout, script).",
    ["op"],
)
_RATE_LIMIT_FALLBACK = Counter(
    names.GATEWAY_RATE_LIMIT_FALLBACK,
    "Shared rate-limit calls decided by the gateway's local fallback share because Redis was "
    "unreachable.",
    ["op"],
)
_RESUME_REQUESTS = Counter(
    names.GATEWAY_RESUME_REQUESTS,
    "Keyed requests by what the idempotency store did (new, attached, replayed, conflict, "
    "not_found, full; with Redis also taken_over: continued a generation whose gateway died, "
    "unavailable: Redis unreachable).",
    ["result"],
)
_RESUME_EVICTIONS = Counter(
    names.GATEWAY_RESUME_EVICTIONS,
    "Generations forgotten by the idempotency store (expired, capacity, abandoned).",
    ["reason"],
)
_RESUME_ENTRIES = Gauge(names.GATEWAY_RESUME_ENTRIES, "Generations held by the idempotency store.")
_RESUME_TOKENS = Gauge(
    names.GATEWAY_RESUME_TOKENS, "Completion tokens held or reserved by the idempotency store."
)
# Shared store (resume_redis.py). op: open | takeover | flush | follow | forget | release
_RESUME_REDIS_WRITES = Counter(
    names.GATEWAY_RESUME_REDIS_WRITES,
    "Batches of a running keyed generation's events written to Redis (and claim renewals).",
)
_RESUME_REDIS_ERRORS = Counter(
    names.GATEWAY_RESUME_REDIS_ERRORS, "Redis calls of the shared resume store that failed.", ["op"]
)
# phase: before_first_token | mid_stream; outcome: `record_migration`'s bounded set.
_MIGRATIONS = Counter(
    names.GATEWAY_MIGRATIONS,
    "Requests moved to another replica after theirs failed, by phase (before_first_token, "
    "mid_stream) and outcome (migrated, limit_reached, admission_failed).",
    ["phase", "outcome"],
)
_DEGRADED = Gauge(
    names.GATEWAY_DEGRADED,
    "1 while no orchestrator answers and the gateway admits over its last-known replica view.",
)
_DEGRADED_ADMISSIONS = Counter(
    names.GATEWAY_DEGRADED_ADMISSIONS,
    "Leases the gateway granted itself in degraded mode (least outstanding, last-known view).",
)
_ADMIT_FAILOVERS = Counter(
    names.GATEWAY_ADMIT_FAILOVERS,
    "Admit calls tried again on another orchestrator because one was not reached.",
)
_USAGE_RECORDS = Counter(
    names.GATEWAY_USAGE_RECORDS,
    "Usage records by what happened to them in the usage log (written, dropped, write_error).",
    ["result"],
)
# Exported from 0 (every bounded label value): the alerts on a failure's rate
# (LlmmeshUsageRecordsLost, LlmmeshRateLimiterFallback) select series that exist before the first
# failure, and a rate sees that failure (no earlier sample to rise from, it would be lost).
USAGE_RESULTS = ("written", "dropped", "write_error")
RATE_LIMIT_OPS = ("admit", "charge")
for _result in USAGE_RESULTS:
    _USAGE_RECORDS.labels(_result)
for _op in RATE_LIMIT_OPS:
    _RATE_LIMIT_FALLBACK.labels(_op)
    _RATE_LIMIT_REDIS_ERRORS.labels(_op)


# -- requests -------------------------------------------------------------------------------
# Outcomes that are no failure of the service: the SLO rules' `outcome!~` matcher lists them.
CALLER_OUTCOMES = ("success", "cancelled", "invalid", "unauthenticated", "rate_limited")


def outcome_label(err: ServiceError) -> str:
    """Bounded label set for `llmmesh_gateway_requests_total{outcome}`. The SLO rules count
    what the caller caused as good (`CALLER_OUTCOMES`); `rejected` (the mesh out of capacity)
    is an error, a tenant over its own limits (`rate_limited`) is not."""
    if isinstance(err, InvalidArgument | NotFound | RequestIdConflict):
        return "invalid"
    if isinstance(err, Unauthenticated):
        return "unauthenticated"
    if isinstance(err, RateLimited):
        return "rate_limited"
    if isinstance(err, ResourceExhausted):
        return "rejected"
    if isinstance(err, ReplicaFailed):
        return "replica_error"
    if isinstance(err, DeadlineExceeded):
        return "deadline"
    if isinstance(err, Cancelled):
        return "cancelled"
    if isinstance(err, Unavailable):
        return "unavailable"
    return "error"


def record_in_flight(model: str, delta: int) -> None:
    """+1 when a generation starts being served, -1 when it ends."""
    _IN_FLIGHT.labels(model).inc(delta)


def record_request(model: str, outcome: str, tenant: str, duration_s: float) -> None:
    """Once per request, whatever way it ends."""
    _REQUESTS.labels(model, outcome, tenant).inc()
    _DURATION.labels(model).observe(duration_s)


def record_rate_limited(tenant: str, limit: str) -> None:
    _RATE_LIMITED.labels(tenant, limit).inc()


def record_rate_limit_redis_error(op: str) -> None:
    _RATE_LIMIT_REDIS_ERRORS.labels(op).inc()


def record_rate_limit_fallback(op: str) -> None:
    _RATE_LIMIT_FALLBACK.labels(op).inc()


def record_tenant_prompt_tokens(tenant: str, tokens: int) -> None:
    """A validated prompt of an authenticated tenant."""
    _TENANT_TOKENS.labels(tenant, "prompt").inc(tokens)


# A histogram or counter series that appears with its first observation loses it to a rate over
# the scrapes (the direct scrape and PromQL's `rate()` alike: no earlier sample to rise from).
# Each (model, pool) latency and token series is therefore exported from 0 once both are known: a model once
# a request for it is served (`StreamMetrics`: a model no request used exports nothing, so the
# autoscaler does not count it as one in use), the pools from the orchestrators' replica view
# (`record_pools_known`). Bounded by the models served and the policy's pools.
_SERVED_MODELS: set[str] = set()
_KNOWN_POOLS: set[str] = set()


def _served(model: str) -> None:
    """A request for `model` is served: its latency series start at 0 for every known pool."""
    if model not in _SERVED_MODELS:
        _SERVED_MODELS.add(model)
        for pool in _KNOWN_POOLS:
            _zero_series(model, pool)


def record_pools_known(pools: Iterable[str]) -> None:
    """Pools of the replicas an orchestrator listed: their latency series start at 0."""
    for pool in pools:
        if pool not in _KNOWN_POOLS:
            _KNOWN_POOLS.add(pool)
            for model in _SERVED_MODELS:
                _zero_series(model, pool)


def _zero_series(model: str, pool: str) -> None:
    _TTFT.labels(model, pool)
    _ITL.labels(model, pool)
    _TOKENS.labels(model, pool, "prompt")
    _TOKENS.labels(model, pool, "completion")


class StreamMetrics:
    """One attempt's per-token metric updates, with their label children resolved once;
    `pool`: the pool of the replica serving the attempt."""

    __slots__ = ("completion", "observe_itl", "observe_ttft", "prompt", "tenant_completion")

    def __init__(self, model: str, pool: str, tenant: str | None) -> None:
        _served(model)
        self.observe_ttft = _TTFT.labels(model, pool).observe
        self.observe_itl = _ITL.labels(model, pool).observe
        self.prompt = _TOKENS.labels(model, pool, "prompt").inc
        self.completion = _TOKENS.labels(model, pool, "completion").inc
        # A no-op without authentication (no tenant label).
        self.tenant_completion: Callable[[float], None] = (
            _ignore if tenant is None else _TENANT_TOKENS.labels(tenant, "completion").inc
        )


def _ignore(amount: float) -> None:
    pass


# -- request migration ----------------------------------------------------------------------
def record_migration(phase: str, outcome: str) -> None:
    """A replica failed a request: `migrated` (re-admitted on another replica), `limit_reached`
    (no attempt left: the client gets UNAVAILABLE) or `admission_failed` (no other replica)."""
    _MIGRATIONS.labels(phase, outcome).inc()


# -- orchestrators ---------------------------------------------------------------------------
def record_degraded(on: bool) -> None:
    _DEGRADED.set(1 if on else 0)


def record_degraded_admission() -> None:
    _DEGRADED_ADMISSIONS.inc()


def record_admit_failover() -> None:
    _ADMIT_FAILOVERS.inc()


# -- idempotency store ----------------------------------------------------------------------
def record_resume_request(result: str) -> None:
    _RESUME_REQUESTS.labels(result).inc()


def record_resume_eviction(reason: str) -> None:
    _RESUME_EVICTIONS.labels(reason).inc()


def record_resume_store(entries: int, tokens: int) -> None:
    _RESUME_ENTRIES.set(entries)
    _RESUME_TOKENS.set(tokens)


def record_resume_redis_write() -> None:
    _RESUME_REDIS_WRITES.inc()


def record_resume_redis_error(op: str) -> None:
    _RESUME_REDIS_ERRORS.labels(op).inc()


# -- usage log ------------------------------------------------------------------------------
def record_usage_log(result: str, records: int = 1) -> None:
    _USAGE_RECORDS.labels(result).inc(records)
