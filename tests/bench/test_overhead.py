"""The benchmarks' CPU split holds for a whole run."""

from __future__ import annotations

import os
from typing import Any

import pytest

from bench.overhead import BARE, DIRECT, MESH, Row, pinning, summarize, verdicts


def test_the_split_is_the_same_after_this_process_was_pinned() -> None:
    """A run pins itself to the first half, then splits again for its next configuration (as
    bench-admit does per replica count): the second split must not see only that half."""
    before = os.sched_getaffinity(0)
    if len(before) < 2:
        pytest.skip("one CPU: nothing to split")
    split = pinning(True)
    assert split is not None
    load, mesh = split
    assert load
    assert mesh
    assert not load & mesh
    try:
        os.sched_setaffinity(0, load)  # this thread only: nothing else to restore
        assert pinning(True) == split
    finally:
        os.sched_setaffinity(0, before)
    assert pinning(False) is None


def test_least_in_flight_sends_each_stream_to_the_emptiest_target() -> None:
    from bench.overhead import LeastInFlight

    picker = LeastInFlight(2)
    with picker.pick() as a, picker.pick() as b:
        assert {a, b} == {0, 1}
        with picker.pick() as c:
            assert c == 0  # a tie goes to the first
            with picker.pick() as d:
                assert d == 1  # not blind alternation by request index: 0 holds two now
                assert picker.in_flight == [2, 2]
    assert picker.in_flight == [0, 0]


def _row(path: str, conc: int, repeat: int, p50: float, p99: float, tok_s: float) -> Row:
    row = Row(path, conc, 10, p50, p99, tok_s)
    row.repeat = repeat
    return row


def test_summary_is_per_repeat_then_median_with_the_range() -> None:
    rows = []
    # repeat 0: added p50 1.0; repeat 1: 5.0; repeat 2: 2.0 -> median 2.0, range 1..5
    for rep, (direct, mesh) in enumerate([(3.0, 4.0), (3.0, 8.0), (2.0, 4.0)]):
        rows.append(_row(DIRECT, 1, rep, direct, direct * 2, 100.0))
        m = _row(MESH, 1, rep, mesh, mesh * 2, 90.0)
        m.gateway_cpu_us_per_token = 150.0
        rows.append(m)
        b = _row(BARE, 1, rep, direct + 0.5, direct * 2, 100.0)
        b.relay_cpu_us_per_token = 100.0
        rows.append(b)
    [s] = summarize(rows, [1])
    assert s["repeats"] == 3
    assert s["added_ttft_p50_ms"] == 2.0
    assert s["added_ttft_p50_ms_range"] == [1.0, 5.0]
    assert s["mesh_over_bare_throughput"] == 0.9
    assert s["gateway_over_relay_cpu"] == 1.5
    got = {what: met for what, _, met in verdicts([s])}
    assert got == {
        "x1 added_ttft_p50_ms <= 1.5": False,
        "x1 added_ttft_p99_ms <= 5": True,  # medians of 2, 10 and 4 ms more at p99 -> 4
        "x1 gateway_over_relay_cpu <= 1.5": True,
    }


async def test_a_stream_without_tokens_is_no_sample() -> None:
    """Its TTFT would read 0 and flatter the arm."""
    from bench.overhead import NoTokens, grpc_sample

    class Empty:
        def Generate(self, req: object, timeout: float) -> object:
            async def none() -> Any:
                return
                yield

            return none()

    with pytest.raises(NoTokens):
        await grpc_sample(Empty(), [1, 2], 4, seed=1)  # type: ignore[arg-type]
