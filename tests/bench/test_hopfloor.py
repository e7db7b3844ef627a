"""The hop floor's three ways run against a real server process, which ends with the run."""

from __future__ import annotations

import os

from bench.hopfloor import context_switches, measure


def hop_floor_servers() -> set[int]:
    """Processes running `bench.hopfloor --serve` now."""
    out = set()
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            with open(f"/proc/{p}/cmdline", "rb") as f:
                if b"bench.hopfloor\0--serve" in f.read():
                    out.add(int(p))
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return out


async def test_three_ways_are_measured_and_the_server_ends_with_the_run() -> None:
    affinity = os.sched_getaffinity(0)
    others = hop_floor_servers()
    ways = await measure(calls=20, idle_ms=1.0)
    assert [w.name.split(",")[0] for w in ways] == ["grpc.aio unary"] * 2 + ["raw TCP"]
    for w in ways:
        assert w.calls == 20
        assert 0 < w.p50_ms <= w.p90_ms
        assert w.server_switches_per_call > 0  # every call woke the server at least once
    assert os.sched_getaffinity(0) == affinity
    assert hop_floor_servers() <= others


def test_context_switches_count_every_thread() -> None:
    assert context_switches(os.getpid()) > 0
