"""The benchmarks' CPU split holds for a whole run."""

from __future__ import annotations

import os

import pytest

from bench.overhead import pinning


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
