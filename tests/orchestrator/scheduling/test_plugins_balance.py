"""Property: with no prefix reuse, the default profile places work on a simulated cluster at least
as evenly as round-robin does (the real orchestrator and plugins on virtual time, llmmesh.sim).

Balance is measured on the placement's outcome: at every arrival, the spread (max - min over
replicas) of the tokens (prompt + output) of the requests in flight on each replica, averaged
over arrivals. Round-robin equalises counts; the default profile weighs each request by its
modelled work, so its spread of work in flight is no larger."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench import workloads as wl
from bench.replay import Result
from llmmesh.sim import ClusterSpec, PoolSpec, simulate


@pytest.fixture(autouse=True)
def _quiet() -> Iterator[None]:
    logging.disable(logging.WARNING)  # per-replica readiness logs of every simulated run
    yield
    logging.disable(logging.NOTSET)


def spread_in_flight(results: Sequence[Result], replicas: Sequence[str]) -> float:
    spans = [
        (r.scheduled_s, r.scheduled_s + r.e2e_s, r.replica_id, r.prompt_tokens + r.output_tokens)
        for r in results
        if r.ok and r.e2e_s is not None
    ]
    arrivals = sorted(s[0] for s in spans)
    total = 0.0
    for t in arrivals:
        load = dict.fromkeys(replicas, 0)
        for start, end, rid, tokens in spans:
            if start <= t < end:
                load[rid] += tokens
        total += max(load.values()) - min(load.values())
    return total / len(arrivals)


def no_reuse(n: int, rate: float, longest: int, seed: int) -> list[wl.Request]:
    return wl.unique_prompts(
        requests=n, prompt_tokens=(64, longest), output_tokens=(8, 96), rate=rate, seed=seed
    )


CLUSTER = ClusterSpec(pools=(PoolSpec(4),))
REPLICAS = [f"default-{i}" for i in range(4)]


@settings(
    max_examples=6,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    n=st.integers(min_value=80, max_value=160),
    rate=st.floats(min_value=5.0, max_value=30.0),
    longest=st.sampled_from([512, 2048, 6000]),
    seed=st.integers(min_value=0, max_value=10_000),
)
def test_default_places_at_least_as_evenly_as_round_robin_without_reuse(
    n: int, rate: float, longest: int, seed: int
) -> None:
    requests = no_reuse(n, rate, longest, seed)
    rr = simulate(requests, CLUSTER, profile="round-robin", seed=seed, oracle=False)
    default = simulate(requests, CLUSTER, profile="default", seed=seed, oracle=False)
    assert rr.summary.ok == default.summary.ok == n
    assert default.summary.hit_rate == 0.0  # nothing to reuse
    spread_rr = spread_in_flight(rr.results, REPLICAS)
    spread_default = spread_in_flight(default.results, REPLICAS)
    assert spread_default <= spread_rr


def test_spread_in_flight_counts_only_overlapping_requests() -> None:
    def res(i: int, start: float, e2e: float, rid: str, tokens: int) -> Result:
        return Result(i, str(i), start, 0.0, 0.01, None, e2e, tokens - 10, 10, replica_id=rid)

    # a: [0, 10) 100 tokens on r0; b: [1, 2) 50 on r1; c: [5, 6) 100 on r1.
    results = [
        res(0, 0.0, 10.0, "r0", 100),
        res(1, 1.0, 1.0, "r1", 50),
        res(2, 5.0, 1.0, "r1", 100),
    ]
    # At t=0: 100 vs 0; t=1: 100 vs 50; t=5: 100 vs 100.
    assert spread_in_flight(results, ["r0", "r1"]) == pytest.approx((100 + 50 + 0) / 3)
