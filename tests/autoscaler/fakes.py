"""Test doubles for the autoscaler: metrics pages, a signal source, an actuator, a clock."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import ClassVar

from services.autoscaler.actuators.contracts import PoolKey, ReplicaCounts
from services.autoscaler.signals import PoolSignals


def engine_page(active: float, waiting: float, used: float, total: float) -> str:
    return f"""# HELP nv_trt_llm_request_metrics TRT LLM request metrics
# TYPE nv_trt_llm_request_metrics gauge
nv_trt_llm_request_metrics{{model="tensorrt_llm",request_type="active",version="1"}} {active}
nv_trt_llm_request_metrics{{model="tensorrt_llm",request_type="waiting",version="1"}} {waiting}
# HELP nv_trt_llm_kv_cache_block_metrics TRT LLM KV cache block metrics
# TYPE nv_trt_llm_kv_cache_block_metrics gauge
nv_trt_llm_kv_cache_block_metrics{{kv_cache_block_type="used",model="tensorrt_llm",version="1"}} {used}
nv_trt_llm_kv_cache_block_metrics{{kv_cache_block_type="max",model="tensorrt_llm",version="1"}} {total}
"""


def histogram(name: str, model: str, buckets: Sequence[tuple[str, float]]) -> str:
    lines = [f"# HELP {name} h", f"# TYPE {name} histogram"]
    for le, count in buckets:
        lines.append(f'{name}_bucket{{le="{le}",model="{model}"}} {count}')
    total = buckets[-1][1]
    lines.append(f'{name}_count{{model="{model}"}} {total}')
    lines.append(f'{name}_sum{{model="{model}"}} {total * 0.1}')
    return "\n".join(lines) + "\n"


def orchestrator_page(
    decisions: Mapping[tuple[str, str], float],
    pool_queue: Mapping[PoolKey, float] | None,
    waits: Sequence[tuple[str, float]] = (("0.1", 0), ("1.0", 0), ("+Inf", 0)),
    model: str = "m",
    leases: Mapping[tuple[str, str], float] | None = None,
) -> str:
    """`decisions`, `leases`: (replica, pool) -> counter / gauge value."""
    out = [
        "# HELP llmmesh_orchestrator_decisions_total Leases granted.",
        "# TYPE llmmesh_orchestrator_decisions_total counter",
    ]
    for (replica, pool), v in decisions.items():
        out.append(
            f'llmmesh_orchestrator_decisions_total{{model="{model}",pool="{pool}",replica="{replica}"}} {v}'
        )
    if leases is not None:
        out += [
            "# HELP llmmesh_orchestrator_replica_in_flight Live leases per replica.",
            "# TYPE llmmesh_orchestrator_replica_in_flight gauge",
        ]
        for (replica, pool), v in leases.items():
            out.append(
                f'llmmesh_orchestrator_replica_in_flight{{pool="{pool}",replica="{replica}"}} {v}'
            )
    if pool_queue is not None:
        out += [
            "# HELP llmmesh_orchestrator_pool_queue_depth Queued per pool.",
            "# TYPE llmmesh_orchestrator_pool_queue_depth gauge",
        ]
        for key, v in pool_queue.items():
            out.append(
                f'llmmesh_orchestrator_pool_queue_depth{{model_version="{key.model_version}",pool="{key.pool}"}} {v}'
            )
    return (
        "\n".join(out) + "\n" + histogram("llmmesh_orchestrator_queue_wait_seconds", model, waits)
    )


def gateway_page(
    prompt: float,
    completion: float,
    ttft: Sequence[tuple[str, float]],
    model: str = "m",
) -> str:
    return (
        "# HELP llmmesh_gateway_tokens_total Tokens.\n"
        "# TYPE llmmesh_gateway_tokens_total counter\n"
        f'llmmesh_gateway_tokens_total{{kind="prompt",model="{model}"}} {prompt}\n'
        f'llmmesh_gateway_tokens_total{{kind="completion",model="{model}"}} {completion}\n'
        + histogram("llmmesh_gateway_time_to_first_token_seconds", model, ttft)
    )


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
