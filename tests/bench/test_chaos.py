"""bench.chaos without a mesh: the token comparison, the lease share, the workload, the targets
and the table (the benchmark itself, `make bench-chaos`, runs minutes and is not a test)."""

from __future__ import annotations

from bench.chaos import (
    SCENARIOS,
    RunResult,
    Stream,
    compare,
    lease_share,
    parser,
    summarize_run,
    table,
    targets,
    workload,
)
from bench.report import Check


def test_compare_counts_lost_and_duplicated_tokens() -> None:
    ref = [1, 2, 3, 4, 5, 6]
    assert compare(ref, ref) == (0, 0)
    assert compare(ref, [1, 2, 3]) == (3, 0)  # a stream cut short
    assert compare(ref, [1, 2, 5, 6]) == (2, 0)  # a gap
    assert compare(ref, [1, 2, 3, 3, 4, 5, 6]) == (0, 1)  # one token twice
    assert compare(ref, [1, 2, 9, 4, 5, 6]) == (1, 1)  # a wrong token: lost and extra
    assert compare([], [7]) == (0, 1)


def test_lease_share_between_snapshots() -> None:
    before = {"replica-0": 10.0, "replica-1": 10.0}
    after = {"replica-0": 11.0, "replica-1": 109.0}
    share, dead, total = lease_share(before, after, "replica-0")
    assert (dead, total) == (1.0, 100.0)
    assert share == 0.01
    assert lease_share(before, before, "replica-0") == (0.0, 0.0, 0.0)


def test_workload_is_deterministic_and_spread() -> None:
    a = workload(4, 2, 100, 16, seed=3)
    assert a == workload(4, 2, 100, 16, seed=3)
    assert [s.index for s in a] == list(range(8))
    assert [s.client for s in a] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert all(50 <= s.max_tokens <= 150 and len(s.prompt) == 16 for s in a)
    assert len({s.prompt for s in a}) == 8
    assert len({s.seed for s in a}) == 8


def test_a_run_is_summarized_against_the_reference_and_checked() -> None:
    ref = {0: [1, 2, 3], 1: [4, 5, 6]}
    ok = Stream(0, start_s=0.0, first_token_s=0.5, end_s=1.0, tokens=[1, 2, 3], completed=True)
    cut = Stream(1, start_s=0.0, first_token_s=0.2, end_s=1.0, tokens=[4], code="UNAVAILABLE")
    run = RunResult("replica-kill", [ok, cut], None, 2.0, [0.5, 0.6])
    row = summarize_run(run, ref, {0: [1, 2, 3], 1: [4, 5, 6]})
    assert (row["completed"], row["tokens_lost"], row["tokens_duplicated"]) == (1, 2, 0)
    assert row["failed_by_code"] == {"UNAVAILABLE": 1}
    checks = {c.name: c for c in targets(row, "replica-kill")}
    assert not checks["completed share"].passed
    assert not checks["tokens lost"].passed
    assert checks["tokens duplicated"].passed
    row["targets"] = [{"name": c.name, "met": c.passed} for c in checks.values()]
    text = table([row, {"scenario": "gateway-kill", "skipped": "no redis-server"}])
    assert "1/2" in text
    assert "UNAVAILABLE 1" in text
    assert "MISSED" in text
    assert "skipped" in text
    assert "no redis-server" in text


def test_smoke_arguments_parse() -> None:
    args = parser().parse_args(["--streams", "20", "--tokens", "100", "--scenarios", "stub-kill"])
    assert (args.streams, args.tokens, args.scenarios) == (20, 100, ["stub-kill"])
    assert parser().parse_args([]).scenarios == SCENARIOS
    assert Check("x", 0.0, "<=", 0).passed
