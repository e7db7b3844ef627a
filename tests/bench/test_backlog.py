"""bench.backlog's level: the queued long requests stay queued while short ones flow."""

from __future__ import annotations

from bench.backlog import one_level, table


async def test_short_requests_flow_past_a_backlogged_pool_and_the_waiters_stay() -> None:
    empty = await one_level(long=1, short=3, waiting=0, requests=10)
    busy = await one_level(long=1, short=3, waiting=40, requests=10)
    assert (empty["waiting"], busy["waiting"]) == (0, 40)
    for row in (empty, busy):
        assert row["cpu_us_per_request"] > 0
        assert row["wall_us_per_request"] > 0
    busy["x_empty"] = empty["x_empty"] = 1.0
    text = table({"rows": [empty, busy]}, {"rows": [empty]})
    assert "before: CPU us" in text
    assert text.splitlines()[-1].split("|")[0].strip() == "40"
