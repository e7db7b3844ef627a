"""Per-pool load signals: what the policy reads, the interface a source implements, and the
attribution of one round of raw readings to pools. The sources live in `scrape` (each /metrics
page read directly) and `promql` (a Prometheus server).

Invariants:
- Every signal is `None` when it is not known: never read, not finite (NaN/Inf), or older than
  `max_age_s`. A source never substitutes a guess; the policy decides what unknown means.
- A pool is a `PoolKey` (orchestrator pool, model version). Engine gauges carry both; orchestrator
  admissions are attributed to a pool through the replica that served them; gateway signals are
  labelled by served model and apply to every pool serving that model; its token rates are the
  pool's own where the series label pools (as the latencies below), else split in proportion to
  the pool's share of the admissions of those pools (the orchestrator labels them by its Triton
  model, which may be named otherwise; its queue wait is read under that name).
- Latency percentiles (queue wait, TTFT, ITL) are the pool's own where the series label pools
  (`pool_p90`): a pool then never inherits another pool's latencies (a long-prompt pool's slow
  first tokens), and one that served nothing in the window has none. Series without a pool
  label (services older than the label) give the model's percentile to each of its pools.
- Rates and percentiles come from counter/histogram increases over `rate_window_s`, reset-aware
  (a counter that goes down restarted from zero); percentiles are the `QUANTILE` of the window.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

from llmmesh.common.engine_metrics import EngineSample, read_deadline_s
from llmmesh.common.topology import PoolKey

QUANTILE = 0.9


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
    unread: tuple[str, ...] = ()
    """Instances of a service read this round only in part (e.g. "1 of 2 orchestrators"): the
    signals summed over that service's instances count only those read, a lower bound."""

    def age_s(self, now: float) -> float:
        return max(0.0, now - self.sampled_at)

    def known(self) -> bool:
        """Whether a source read anything of the pool itself: its engines, or the orchestrator's
        queue, leases or admissions for it (not the model-wide latencies and token rates a
        source gives every pool of the model)."""
        return any(
            v is not None
            for v in (
                self.replicas_known,
                self.reporting_replicas,
                self.engine_active,
                self.engine_waiting,
                self.kv_utilization,
                self.queue_depth,
                self.leases_in_flight,
                self.arrival_rate,
            )
        )

    @property
    def in_flight(self) -> float | None:
        """Requests in the pool's engines; the orchestrator's leases when no engine is read."""
        if self.engine_active is None or self.engine_waiting is None:
            return self.leases_in_flight
        return self.engine_active + self.engine_waiting


class SourceUnavailable(Exception):
    """The source read nothing this round: every query or page it asks for failed."""


class SignalSource(Protocol):
    """Reads every pool's signals. `collect` raises for an unreachable or malformed endpoint
    only when nothing at all was read (`SourceUnavailable`): otherwise what could not be read is
    `None`."""

    async def collect(self, now: float) -> Mapping[PoolKey, PoolSignals]: ...

    async def close(self) -> None: ...


def call_deadline_s(timeout_s: float) -> float:
    """How long a source waits for one HTTP read's thread: the read's own deadline
    (`read_deadline_s`, which ends the thread) and the one socket wait it may be in then."""
    return read_deadline_s(timeout_s) + timeout_s


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


# A latency series' pool and model version labels ("" where it has none: gateways and the
# orchestrator label the pool, Prometheus adds the version of a gateway pod).
PoolLabels = tuple[str, str]


@dataclass(frozen=True, slots=True)
class ModelSignals:
    """Signals the gateway and orchestrator label by served model: each percentile over every
    series of the model, and (`*_by_pool`) over the series of each pool label (empty when no
    series carries one; None when they could not be read)."""

    queue_wait_p90_s: float | None = None
    ttft_p90_s: float | None = None
    itl_p90_s: float | None = None
    prompt_tokens_rate: float | None = None
    completion_tokens_rate: float | None = None
    queue_wait_by_pool: Mapping[PoolLabels, float | None] | None = field(default_factory=dict)
    ttft_by_pool: Mapping[PoolLabels, float | None] | None = field(default_factory=dict)
    itl_by_pool: Mapping[PoolLabels, float | None] | None = field(default_factory=dict)
    prompt_tokens_by_pool: Mapping[PoolLabels, float | None] | None = field(default_factory=dict)
    completion_tokens_by_pool: Mapping[PoolLabels, float | None] | None = field(
        default_factory=dict
    )


def pool_p90(
    by_pool: Mapping[PoolLabels, float | None] | None, model_p90: float | None, key: PoolKey
) -> float | None:
    """The pool's percentile: of its series (under its model version, else under none) where
    the model's series label pools, None when none of them is the pool's; the model's
    (`model_p90`) where no series labels a pool; None when the pools' series could not be
    read (`by_pool` None: the model's would be another pool's as likely as this one's)."""
    if by_pool is None:
        return None
    if not by_pool:
        return finite(model_p90)
    for labels in ((key.pool, key.model_version), (key.pool, "")):
        if labels in by_pool:
            return finite(by_pool[labels])
    return None


def pool_rate(
    by_pool: Mapping[PoolLabels, float | None] | None,
    model_rate: float | None,
    share: float | None,
    key: PoolKey,
) -> float | None:
    """The pool's token rate: of its series (under its model version, else under none) where
    the model's series label pools, None when none of them is the pool's; the model's rate times
    the pool's `share` of the model's admissions where no series labels a pool (gateways older
    than the label); None when the pools' series could not be read."""
    if by_pool is None:
        return None
    if not by_pool:
        return _scaled(model_rate, share)
    return pool_p90(by_pool, None, key)  # the same lookup as a pool's percentile


@dataclass(slots=True)
class Observation:
    """One round of raw readings, before attribution to pools."""

    engines: dict[PoolKey, EngineAggregate] = field(default_factory=dict)
    engines_read: bool = False
    """The engines were counted (discovery answered, the count query did): a pool absent from
    `engines` has none (a pool at zero), not an unknown count."""
    queue_depth: dict[PoolKey, float] | None = None
    """None: the orchestrator gauge could not be read (a pool absent from a read gauge: 0)."""
    admissions: dict[tuple[str, PoolKey], float] | None = None
    """Admission rate per (model, pool); None: unknown (a pool absent from a known map: 0)."""
    leases: dict[PoolKey, float] | None = None
    """Live leases per pool; None: unknown (a pool absent from a known map: 0)."""
    models: dict[str, ModelSignals] = field(default_factory=dict)
    unread: list[str] = field(default_factory=list)
    """Services some of whose instances could not be read (`PoolSignals.unread`)."""


def unread(service: str, missed: int, instances: int) -> list[str]:
    """`Observation.unread`'s entry for a service of which `missed` of `instances` were not
    read: none when all or none were (none read: its signals are unknown, not lower bounds)."""
    if 0 < missed < instances:
        return [f"{missed} of {instances} {service} not read"]
    return []


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

    orchestrator_models = _orchestrator_models(obs.admissions)
    out: dict[PoolKey, PoolSignals] = {}
    for key in sorted(keys):
        eng = obs.engines.get(key)
        sig = PoolSignals(sampled_at=now, unread=tuple(obs.unread))
        if eng is None and obs.engines_read:
            sig = replace(sig, replicas_known=0, reporting_replicas=0)
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
        # The orchestrator labels its series by the Triton model it admits for, which may not
        # be the gateway's served name: its queue wait is read under that label.
        queue = obs.models.get(orchestrator_models.get(key) or model or "")
        if queue is not None:
            wait = pool_p90(queue.queue_wait_by_pool, queue.queue_wait_p90_s, key)
            sig = replace(sig, queue_wait_p90_s=wait)
        if model is not None and model in obs.models:
            ms = obs.models[model]
            share = _share(obs.admissions, key, pools_of.get(model, [key]))
            sig = replace(
                sig,
                ttft_p90_s=pool_p90(ms.ttft_by_pool, ms.ttft_p90_s, key),
                itl_p90_s=pool_p90(ms.itl_by_pool, ms.itl_p90_s, key),
                prompt_tokens_rate=pool_rate(
                    ms.prompt_tokens_by_pool, ms.prompt_tokens_rate, share, key
                ),
                completion_tokens_rate=pool_rate(
                    ms.completion_tokens_by_pool, ms.completion_tokens_rate, share, key
                ),
            )
            if sig.queue_wait_p90_s is None:
                wait = pool_p90(ms.queue_wait_by_pool, ms.queue_wait_p90_s, key)
                sig = replace(sig, queue_wait_p90_s=wait)
        out[key] = sig
    return out


def _orchestrator_models(
    admissions: Mapping[tuple[str, PoolKey], float] | None,
) -> dict[PoolKey, str]:
    """Per pool, the model label of most of its admissions (the orchestrator's name for it)."""
    best: dict[PoolKey, tuple[float, str]] = {}
    for (m, k), v in (admissions or {}).items():
        if k not in best or v > best[k][0]:
            best[k] = (v, m)
    return {k: m for k, (_, m) in best.items()}


def _share(
    admissions: Mapping[tuple[str, PoolKey], float] | None,
    key: PoolKey,
    pools: Sequence[PoolKey],
) -> float | None:
    """This pool's fraction of the admissions of `pools` (every pool serving its model, whatever
    model label the admissions carry); even split when nothing was admitted."""
    if admissions is None:
        return 1.0 if len(pools) == 1 else None
    among = set(pools)
    total = sum(v for (_, k), v in admissions.items() if k in among)
    if total > 0:
        return sum(v for (_, k), v in admissions.items() if k == key) / total
    return 1.0 / max(1, len(pools))


def _scaled(value: float | None, share: float | None) -> float | None:
    return None if value is None or share is None else finite(value * share)
