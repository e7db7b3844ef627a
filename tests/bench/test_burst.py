"""bench-burst's pure parts: the burst itself, one burst's summary and its targets."""

from __future__ import annotations

from bench.burst import burst, summarize, targets
from bench.replay import Result


def result(i: int, outcome: str = "ok", **kw: object) -> Result:
    fields: dict[str, object] = {
        "index": i,
        "request_id": f"r{i}",
        "scheduled_s": 0.0,
        "send_lag_s": 0.0,
        "ttft_s": 0.1 * (i + 1) if outcome == "ok" else None,
        "itl_mean_s": None,
        "e2e_s": None,
        "output_tokens": 4 if outcome == "ok" else 0,
        "prompt_tokens": 8,
        "outcome": outcome,
    }
    fields.update(kw)
    return Result(**fields)  # type: ignore[arg-type]


def test_a_burst_arrives_at_once_with_unique_prompts_and_the_priority_mix() -> None:
    reqs = burst(200, 16, 5, seed=3)
    assert {r.arrival_s for r in reqs} == {0.0}
    assert len({tuple(r.prompt_token_ids) for r in reqs}) == 200
    assert all(r.prompt_tokens == 16 and r.max_tokens == 5 for r in reqs)
    assert {r.meta["priority"] for r in reqs} == {"interactive", "standard", "batch"}
    assert burst(200, 16, 5, seed=3) == reqs


def test_refusals_with_retry_after_meet_the_targets() -> None:
    refused = result(2, "RESOURCE_EXHAUSTED", refusals=[("RESOURCE_EXHAUSTED", 1.5)])
    b = summarize(3, [result(0), result(1), refused])
    b.recovery_s = 2.0
    assert (b.served, b.refused, b.refused_with_retry_after) == (
        2,
        {"RESOURCE_EXHAUSTED": 1},
        {"RESOURCE_EXHAUSTED": 1},
    )
    assert b.ttft_ms["p50"] is not None
    assert all(targets(b).values())


def test_a_cut_stream_a_refusal_without_retry_after_and_a_death_are_missed() -> None:
    cut = result(0, "UNAVAILABLE", output_tokens=40)
    bare = result(1, "RESOURCE_EXHAUSTED", refusals=[("RESOURCE_EXHAUSTED", None)])
    b = summarize(2, [cut, bare])
    b.engine_deaths = 1
    got = targets(b)
    assert b.cut_after_first_token == 1
    assert not got["0 streams cut"]
    assert not got["0 engine deaths"]
    assert not got["every failure a refusal with retry-after"]
    assert not got["serving again"]
