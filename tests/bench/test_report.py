from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from bench import report
from bench.replay import Result
from bench.workloads import Request


@pytest.mark.parametrize(
    ("values", "q", "expected"),
    [
        ([1, 2, 3, 4], 50, 2.5),
        ([1, 2, 3, 4], 0, 1),
        ([1, 2, 3, 4], 100, 4),
        ([4, 1, 3, 2], 50, 2.5),  # order does not matter
        (list(range(1, 11)), 90, 9.1),
        (list(range(1, 11)), 99, 9.91),
        ([7], 99, 7),
        ([0, 10], 25, 2.5),
    ],
)
def test_percentile_matches_numpy_linear(values: list[float], q: float, expected: float) -> None:
    assert report.percentile(values, q) == pytest.approx(expected)


def test_percentile_edges() -> None:
    assert math.isnan(report.percentile([], 50))
    # Infinitely late requests (refused ones, in a TTFT p99): infinite where they are reached,
    # never NaN, and not reached below them.
    assert report.percentile([0.1] * 100 + [math.inf], 99) == 0.1
    assert report.percentile([0.1] * 100 + [math.inf] * 2, 99) == math.inf
    assert report.percentile([0.1] * 10 + [math.inf] * 10, 99) == math.inf
    assert report.percentile([0.1, math.inf], 50) == math.inf
    with pytest.raises(ValueError, match="q must be"):
        report.percentile([1], 101)


def _p(*tokens: int) -> list[int]:
    return list(tokens)


# Block size 4. Tokens 1..8 are two full blocks [1-4][5-8].
ORACLE_CASES = [
    # (prompts in arrival order, reusable tokens per prompt)
    ([_p(1, 2, 3, 4, 5, 6, 7, 8)], [0]),
    # Same two blocks + one token: both blocks reusable ((9 - 1) // 4 = 2).
    ([_p(*range(1, 9)), _p(*range(1, 10))], [0, 8]),
    # Identical 8-token prompt: the last token is always recomputed, so only 1 block ((8-1)//4).
    ([_p(*range(1, 9)), _p(*range(1, 9))], [0, 4]),
    # Shares the first block only.
    ([_p(*range(1, 9)), _p(1, 2, 3, 4, 99, 98, 97, 96, 95)], [0, 4]),
    # Same block content at another position is not a prefix hit (chained hashes).
    ([_p(5, 6, 7, 8, 1), _p(1, 2, 3, 4, 5, 6, 7, 8, 9)], [0, 0]),
    # Reuse accumulates across earlier prompts (infinite cache): C extends A's prefix with B's.
    (
        [
            _p(1, 2, 3, 4, 0),
            _p(1, 2, 3, 4, 5, 6, 7, 8, 0),
            _p(1, 2, 3, 4, 5, 6, 7, 8, 9, 9, 9, 9, 0),
        ],
        [0, 4, 8],
    ),
    # Shorter than a block: nothing to reuse.
    ([_p(1, 2, 3), _p(1, 2, 3)], [0, 0]),
]


@pytest.mark.parametrize(("prompts", "reuse"), ORACLE_CASES)
def test_oracle_reuse(prompts: list[list[int]], reuse: list[int]) -> None:
    assert report.oracle_reuse(prompts, 4) == reuse


def test_oracle_hit_rate_orders_by_arrival() -> None:
    a = Request(1.0, list(range(1, 10)), 1)  # 9 tokens, arrives second
    b = Request(0.0, list(range(1, 10)), 1)  # identical, arrives first
    c = Request(2.0, [50, 51, 52], 1)
    # b: 0, a: (9-1)//4 = 2 blocks = 8 tokens, c: 0 -> 8 / 21
    assert report.oracle_hit_rate([a, b, c], 4) == pytest.approx(8 / 21)


def _result(i: int, **kw: object) -> Result:
    base: dict[str, object] = {
        "index": i,
        "request_id": f"r{i}",
        "scheduled_s": float(i),
        "send_lag_s": 0.0,
        "ttft_s": 0.1,
        "itl_mean_s": 0.01,
        "e2e_s": 1.0,
        "output_tokens": 10,
        "prompt_tokens": 100,
        "cached_prompt_tokens": 50,
        "replica_id": "replica-0",
    }
    base.update(kw)
    return Result(**base)  # type: ignore[arg-type]


def test_summarize() -> None:
    results = [
        _result(0, ttft_s=0.1, cached_prompt_tokens=0),
        _result(1, ttft_s=0.3, replica_id="replica-1", send_lag_s=0.02),
        _result(2, ttft_s=0.2, e2e_s=3.0, cached_prompt_tokens=100),
        _result(3, outcome="RESOURCE_EXHAUSTED", ttft_s=None, e2e_s=None, output_tokens=0),
    ]
    s = report.summarize("arm", results, oracle=0.75)
    assert (s.requests, s.ok) == (4, 3)
    assert s.errors == {"RESOURCE_EXHAUSTED": 1}
    assert s.ttft_s.mean == pytest.approx(0.2)
    assert s.ttft_s.p50 == pytest.approx(0.2)
    assert s.output_tokens == 30
    # From the first scheduled arrival (0) to the last completion (2 + 3 = 5).
    assert s.duration_s == pytest.approx(5.0)
    assert s.throughput_tok_s == pytest.approx(6.0)
    assert s.hit_rate == pytest.approx(150 / 300)
    assert s.hit_vs_oracle == pytest.approx(0.5 / 0.75)
    assert s.replicas == {"replica-0": 2, "replica-1": 1}
    assert s.max_send_lag_s == pytest.approx(0.02)


def test_summarize_empty_is_nan_not_an_error() -> None:
    s = report.summarize("arm", [])
    assert s.requests == 0
    assert math.isnan(s.ttft_s.mean)
    assert math.isnan(s.hit_rate)


@pytest.mark.parametrize(
    ("value", "op", "bound", "passed"),
    [
        (0.4, "<=", 0.5, True),
        (0.5, "<=", 0.5, True),
        (0.6, "<=", 0.5, False),
        (1.5, ">=", 1.45, True),
        (1.0, ">=", 1.45, False),
        (math.nan, ">=", 0.9, False),
    ],
)
def test_check(value: float, op: str, bound: float, passed: bool) -> None:
    assert report.Check("x", value, op, bound).passed is passed


def test_ratio() -> None:
    assert report.ratio(1, 4) == 0.25
    assert math.isnan(report.ratio(1, 0))
    assert math.isnan(report.ratio(math.nan, 1))


def test_tables_align() -> None:
    s = report.summarize("round-robin", [_result(0)], oracle=0.5)
    lines = report.summary_table([s]).splitlines()
    assert len(lines) == 3
    assert len({len(line) for line in lines}) == 1
    assert "round-robin" in lines[2]
    text = report.checks_table(
        [report.Check("t", 0.4, "<=", 0.5), report.Check("u", 1.0, ">=", 1.45)]
    )
    assert "met" in text
    assert "MISSED" in text


def test_write_json_turns_nan_into_null(tmp_path: Path) -> None:
    path = report.write_json(
        "x.json", {"a": math.nan, "b": [1.5, math.inf], "c": {"d": 1}}, tmp_path
    )
    assert json.loads(path.read_text()) == {"a": None, "b": [1.5, None], "c": {"d": 1}}


def test_write_json_takes_a_name_or_a_path(tmp_path: Path) -> None:
    results = tmp_path / "bench-results"
    assert report.write_json("x.json", {}, results) == results / "x.json"
    # A path is not put under the directory again (bench-results/bench-results/x.json).
    elsewhere = tmp_path / "other" / "y.json"
    assert report.write_json(str(elsewhere), {"a": 1}, results) == elsewhere
    assert json.loads(elsewhere.read_text()) == {"a": 1}
    assert sorted(p.name for p in results.iterdir()) == ["x.json"]
