"""bench-overload's pure parts: the retrying client's policy (virtual sleeps, seeded jitter), the
workload's priority mix, a step's summary and its targets."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator

import pytest

from bench.overload import (
    PRIORITIES,
    AttemptTimes,
    parser,
    summarize,
    targets,
    within_slo_share,
    workload,
)
from bench.replay import Chunk, Final, Refused, RequestError, Result, RetryingClient, replay
from bench.workloads import Request


class Scripted:
    """Refuses the first `refusals` attempts (code, retry-after), then streams two tokens; with
    `cut`, fails after the first token instead."""

    def __init__(self, refusals: list[tuple[str, float | None]], cut: bool = False) -> None:
        self.refusals = list(refusals)
        self.cut = cut
        self.attempts = 0

    async def generate(
        self, request: Request, request_id: str
    ) -> AsyncIterator[Chunk | Final | Refused]:
        self.attempts += 1
        if self.refusals:
            code, after = self.refusals.pop(0)
            raise RequestError(code, "refused", after)
        yield Chunk(1)
        if self.cut:
            raise RequestError("UNAVAILABLE", "replica died")
        yield Chunk(1)
        yield Final(4, 2, 0, "r0")


def retrying(inner: Scripted, sleeps: list[float], max_retries: int = 2) -> RetryingClient:
    async def sleep(s: float) -> None:
        sleeps.append(s)

    return RetryingClient(inner, max_retries=max_retries, rng=random.Random(1), sleep=sleep)


REQ = Request(0.0, [1, 2, 3, 4], 2)


@pytest.mark.parametrize(
    ("refusals", "cut", "outcome", "attempts", "sleep_bounds"),
    [
        ([], False, "ok", 1, []),
        ([("RESOURCE_EXHAUSTED", 3.0)], False, "ok", 2, [(3.0, 3.75)]),  # retry-after + jitter
        ([("UNAVAILABLE", None)], False, "ok", 2, [(0.375, 0.5)]),  # backoff 0.5 s - jitter
        (
            [("RESOURCE_EXHAUSTED", None), ("RESOURCE_EXHAUSTED", None)],
            False,
            "ok",
            3,
            [(0.375, 0.5), (0.75, 1.0)],  # doubling
        ),
        ([("RESOURCE_EXHAUSTED", 1.0)] * 3, False, "RESOURCE_EXHAUSTED", 3, [(1, 1.25)] * 2),
        ([("RESOURCE_EXHAUSTED", 120.0)], False, "ok", 2, [(0.375, 0.5)]),  # > 60 s: backoff
        ([("INVALID_ARGUMENT", None)], False, "INVALID_ARGUMENT", 1, []),  # not retried
        ([], True, "UNAVAILABLE", 1, []),  # cut after the first token: never retried
    ],
)
async def test_retrying_client(
    refusals: list[tuple[str, float | None]],
    cut: bool,
    outcome: str,
    attempts: int,
    sleep_bounds: list[tuple[float, float]],
) -> None:
    inner = Scripted(refusals, cut)
    sleeps: list[float] = []
    [res] = await replay([REQ], retrying(inner, sleeps))
    assert res.outcome == outcome
    assert inner.attempts == attempts
    assert len(sleeps) == len(sleep_bounds)
    for s, (lo, hi) in zip(sleeps, sleep_bounds, strict=True):
        assert lo <= s <= hi
    retried = [r for r in refusals if r[0] in {"RESOURCE_EXHAUSTED", "UNAVAILABLE"}]
    assert res.refusals == retried[:attempts]  # every refusal kept, retried or final


def test_workload_mix_and_rate() -> None:
    reqs = workload(50.0, 40.0, 64, 100, seed=3)
    assert 1800 <= len(reqs) <= 2200
    assert all(r.arrival_s < 40.0 for r in reqs)
    assert len({tuple(r.prompt_token_ids) for r in reqs}) == len(reqs)
    shares = {p: sum(r.meta["priority"] == p for r in reqs) / len(reqs) for p in PRIORITIES}
    assert shares["interactive"] == pytest.approx(0.2, abs=0.03)
    assert shares["standard"] == pytest.approx(0.6, abs=0.03)
    assert shares["batch"] == pytest.approx(0.2, abs=0.03)


def result(
    i: int,
    priority: str,
    ttft: float | None,
    outcome: str = "ok",
    refusals: list[tuple[str, float | None]] | None = None,
    tokens: int = 100,
) -> Result:
    return Result(
        index=i,
        request_id=str(i),
        scheduled_s=0.0,
        send_lag_s=0.0,
        ttft_s=ttft,
        itl_mean_s=None,
        e2e_s=None,
        output_tokens=tokens,
        prompt_tokens=64,
        outcome=outcome,
        refusals=refusals or [],
        meta={"priority": priority},
    )


def test_summary_and_targets() -> None:
    ra = ("RESOURCE_EXHAUSTED", 1.5)
    results = [
        result(0, "interactive", 0.1),
        result(1, "interactive", 0.3, refusals=[ra]),  # retried once, then served
        result(2, "standard", 1.0),
        result(3, "standard", 3.0),  # served, over the SLO: not goodput
        result(4, "batch", None, "RESOURCE_EXHAUSTED", [ra, ra, ra], tokens=0),
    ]
    step = summarize(
        results,
        mode="retry",
        multiplier=5,
        offered_rps=0.5,
        duration_s=10.0,
        capacity_rps=0.4,
        slo_s=2.0,
    )
    assert step.completed_rps == pytest.approx(0.4)
    assert step.goodput_rps == pytest.approx(0.3)
    assert step.goodput_share == pytest.approx(0.75)
    assert step.refusals == {"RESOURCE_EXHAUSTED": 4}
    assert step.refusals_with_retry_after == {"RESOURCE_EXHAUSTED": 4}
    assert step.failures == {"RESOURCE_EXHAUSTED": 1}
    assert step.retried_requests == 2
    assert step.ttft_ms["interactive"] == {"n": 2, "p50": 100.0, "p99": 300.0}
    assert step.ttft_ms["batch"]["n"] == 0
    step.rss_mib = {"gateway": (100.0, 120.0)}
    checks = targets(step, 2.0)
    assert checks["goodput>=90%"] is False
    assert checks["interactive p99 within SLO"] is True
    assert checks["refusals all RESOURCE_EXHAUSTED+retry-after"] is True
    assert checks["0 streams cut"] is True
    assert all(v for k, v in checks.items() if k.startswith("RSS"))

    cut = result(5, "standard", 0.2, "UNAVAILABLE", tokens=30)
    no_after = result(
        6, "standard", None, "RESOURCE_EXHAUSTED", [("RESOURCE_EXHAUSTED", None)], tokens=0
    )
    bad = summarize(
        [*results, cut, no_after],
        mode="no-retry",
        multiplier=10,
        offered_rps=1,
        duration_s=10,
        capacity_rps=0.4,
        slo_s=2.0,
    )
    assert bad.cut_after_first_token == 1
    checks = targets(bad, 2.0)
    assert checks["0 streams cut"] is False
    assert checks["refusals all RESOURCE_EXHAUSTED+retry-after"] is False


def test_within_slo_share_counts_failures_as_misses() -> None:
    rs = [result(0, "standard", 0.5), result(1, "standard", None, "RESOURCE_EXHAUSTED")]
    assert within_slo_share(rs, 2.0) == 0.5
    assert within_slo_share([], 2.0) == 0.0


def test_goodput_counts_the_admitted_attempt_end_to_end_counts_the_retry_wait() -> None:
    ra = ("RESOURCE_EXHAUSTED", 1.5)
    results = [
        result(0, "interactive", 0.5),
        # refused, retried after its retry-after: 2.6 s after its arrival, 0.4 s after the send
        # of the admitted attempt
        result(1, "standard", 2.6, refusals=[ra]),
        result(2, "batch", 2.5),  # admitted attempt itself over the SLO
    ]
    step = summarize(
        results,
        mode="retry",
        multiplier=5,
        offered_rps=0.3,
        duration_s=10.0,
        capacity_rps=0.3,
        slo_s=2.0,
        admitted_ttft_s={"0": 0.5, "1": 0.4, "2": 2.5},
    )
    assert step.goodput_share == pytest.approx(2 / 3)
    assert step.goodput_e2e_share == pytest.approx(1 / 3)
    assert step.ttft_ms["standard"] == {"n": 1, "p50": 400.0, "p99": 400.0}


def test_goodput_counts_first_tokens_within_the_step() -> None:
    late = result(1, "standard", 0.5)
    late.scheduled_s = 9.8  # first token at 10.3 s, after the 10 s step (a retry, the drain)
    step = summarize(
        [result(0, "standard", 0.5), late],
        mode="retry",
        multiplier=1,
        offered_rps=0.2,
        duration_s=10.0,
        capacity_rps=0.2,
        slo_s=2.0,
    )
    assert step.goodput_rps == pytest.approx(0.1)
    assert step.completed_rps == pytest.approx(0.2)


async def test_attempt_times_record_the_attempt_that_produced_the_first_token() -> None:
    inner = Scripted([("RESOURCE_EXHAUSTED", 0.0)])
    attempts = AttemptTimes(inner)
    client = retrying(inner, [])
    client.inner = attempts
    [res] = await replay([REQ], client, request_id_prefix="t")
    assert res.ok
    assert inner.attempts == 2
    assert list(attempts.ttft_s) == [res.request_id]
    assert 0 <= attempts.ttft_s[res.request_id] < 1.0


@pytest.mark.parametrize(
    ("given", "stem"), [([], "overload"), (["--out", "x"], "x"), (["--out", "x.json"], "x")]
)
def test_out_names_the_files_with_or_without_json(given: list[str], stem: str) -> None:
    assert parser().parse_args(given).out == stem
