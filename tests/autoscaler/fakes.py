"""Test doubles for the autoscaler: metrics pages, a signal source, an actuator, a clock."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import ClassVar

from llmmesh.common import metric_names as names
from llmmesh.common.topology import TRITON_MODEL, PoolKey
from services.autoscaler.actuators.contracts import ReplicaCounts
from services.autoscaler.signals import PoolSignals


def engine_page(active: float, waiting: float, used: float, total: float) -> str:
    req, kv, model = names.TRTLLM_REQUEST_METRICS, names.TRTLLM_KV_CACHE_BLOCK_METRICS, TRITON_MODEL
    return f"""# HELP {req} TRT LLM request metrics
# TYPE {req} gauge
{req}{{model="{model}",request_type="active",version="1"}} {active}
{req}{{model="{model}",request_type="waiting",version="1"}} {waiting}
# HELP {kv} TRT LLM KV cache block metrics
# TYPE {kv} gauge
{kv}{{kv_cache_block_type="used",model="{model}",version="1"}} {used}
{kv}{{kv_cache_block_type="max",model="{model}",version="1"}} {total}
"""


def histogram(
    name: str,
    model: str,
    buckets: Sequence[tuple[str, float]],
    by_pool: Mapping[str, Sequence[tuple[str, float]]] | None = None,
) -> str:
    """One model's histogram: a series without a pool label, or (`by_pool`) one per pool."""
    lines = [f"# HELP {name} h", f"# TYPE {name} histogram"]
    series = {"": buckets} if by_pool is None else by_pool
    for pool, counts in series.items():
        labels = f'model="{model}",pool="{pool}"' if pool else f'model="{model}"'
        for le, count in counts:
            lines.append(f'{name}_bucket{{le="{le}",{labels}}} {count}')
        total = counts[-1][1]
        lines.append(f"{name}_count{{{labels}}} {total}")
        lines.append(f"{name}_sum{{{labels}}} {total * 0.1}")
    return "\n".join(lines) + "\n"


def orchestrator_page(
    decisions: Mapping[tuple[str, str], float],
    pool_queue: Mapping[PoolKey, float] | None,
    waits: Sequence[tuple[str, float]] = (("0.1", 0), ("1.0", 0), ("+Inf", 0)),
    model: str = "m",
    leases: Mapping[tuple[str, str], float] | None = None,
    waits_by_pool: Mapping[str, Sequence[tuple[str, float]]] | None = None,
) -> str:
    """`decisions`, `leases`: (replica, pool) -> counter / gauge value; queue waits `waits`,
    or per pool `waits_by_pool`."""
    decided, leased, queued = (
        names.ORCH_DECISIONS,
        names.ORCH_REPLICA_IN_FLIGHT,
        names.ORCH_POOL_QUEUE_DEPTH,
    )
    out = [f"# HELP {decided} Leases granted.", f"# TYPE {decided} counter"]
    for (replica, pool), v in decisions.items():
        out.append(f'{decided}{{model="{model}",pool="{pool}",replica="{replica}"}} {v}')
    if leases is not None:
        out += [f"# HELP {leased} Live leases per replica.", f"# TYPE {leased} gauge"]
        for (replica, pool), v in leases.items():
            out.append(f'{leased}{{pool="{pool}",replica="{replica}"}} {v}')
    if pool_queue is not None:
        out += [f"# HELP {queued} Queued per pool.", f"# TYPE {queued} gauge"]
        for key, v in pool_queue.items():
            out.append(f'{queued}{{model_version="{key.model_version}",pool="{key.pool}"}} {v}')
    return "\n".join(out) + "\n" + histogram(names.ORCH_QUEUE_WAIT, model, waits, waits_by_pool)


def gateway_page(
    prompt: float,
    completion: float,
    ttft: Sequence[tuple[str, float]],
    model: str = "m",
    ttft_by_pool: Mapping[str, Sequence[tuple[str, float]]] | None = None,
    tokens_by_pool: Mapping[str, tuple[float, float]] | None = None,
) -> str:
    """`prompt`, `completion`: the model's token counters, without a pool label; or, with
    `tokens_by_pool` (pool: (prompt, completion)), one pair of series per pool instead."""
    tokens = names.GATEWAY_TOKENS
    lines = [f"# HELP {tokens} Tokens.", f"# TYPE {tokens} counter"]
    if tokens_by_pool is None:
        lines.append(f'{tokens}{{kind="prompt",model="{model}"}} {prompt}')
        lines.append(f'{tokens}{{kind="completion",model="{model}"}} {completion}')
    else:
        for pool, (p, c) in tokens_by_pool.items():
            lines.append(f'{tokens}{{kind="prompt",model="{model}",pool="{pool}"}} {p}')
            lines.append(f'{tokens}{{kind="completion",model="{model}",pool="{pool}"}} {c}')
    return "\n".join(lines) + "\n" + histogram(names.GATEWAY_TTFT, model, ttft, ttft_by_pool)


class FakeClock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


class FakeSource:
    """Returns whatever the test put in `signals` (sampled now unless the signal says so)."""

    def __init__(self) -> None:
        self.signals: dict[PoolKey, PoolSignals] = {}
        self.fail = False
        self.closed = False

    async def collect(self, now: float) -> Mapping[PoolKey, PoolSignals]:
        if self.fail:
            raise RuntimeError("source broke")
        return dict(self.signals)

    async def close(self) -> None:
        self.closed = True


class FakeActuator:
    """Implements the Actuator protocol; replicas become ready when the test says so."""

    TYPE: ClassVar[str] = "fake"

    def __init__(self, counts: Mapping[PoolKey, ReplicaCounts]):
        self.counts = dict(counts)
        self.applied: list[tuple[PoolKey, int, str]] = []
        self.closed = False

    async def observe(self) -> Mapping[PoolKey, ReplicaCounts]:
        return dict(self.counts)

    async def apply(self, key: PoolKey, desired: int, reason: str) -> None:
        self.applied.append((key, desired, reason))
        now = self.counts.get(key, ReplicaCounts(0))
        if desired > now.provisioned:
            self.counts[key] = ReplicaCounts(now.ready, desired - now.ready)
        elif desired < now.provisioned:
            self.counts[key] = ReplicaCounts(min(now.ready, desired), max(0, desired - now.ready))

    def finish_starts(self) -> None:
        self.counts = {k: ReplicaCounts(c.provisioned) for k, c in self.counts.items()}

    async def close(self) -> None:
        self.closed = True
