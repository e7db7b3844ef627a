from __future__ import annotations

import gzip
import itertools
import json
import math
from collections.abc import Sequence
from pathlib import Path

import pytest

from bench import workloads as wl
from tests.helpers import shared_head


@pytest.mark.parametrize(
    ("a", "b", "equal"),
    [
        ((wl.NS_MOONCAKE, 7, 512), (wl.NS_MOONCAKE, 7, 512), True),
        ((wl.NS_MOONCAKE, 7, 512), (wl.NS_MOONCAKE, 8, 512), False),
        ((wl.NS_MOONCAKE, 0, 512), (wl.NS_MOONCAKE, 1, 512), False),
        ((wl.NS_MOONCAKE, 7, 512), (wl.NS_SHARED_PREFIX, 7, 512), False),
        ((wl.NS_AZURE, 123456789, 64), (wl.NS_AZURE, 123456789, 64), True),
    ],
)
def test_block_tokens_equal_keys_give_identical_blocks(
    a: tuple[int, int, int], b: tuple[int, int, int], equal: bool
) -> None:
    x, y = wl.block_tokens(*a), wl.block_tokens(*b)
    assert (list(x) == list(y)) is equal
    assert len(x) == a[2]
    assert all(wl.VOCAB_MIN <= t < wl.VOCAB_MAX for t in x)


def test_block_tokens_is_a_prefix_stream() -> None:
    # A shorter draw of the same key is the head of the longer one (partial trailing blocks).
    assert list(wl.block_tokens(1, 5, 100)) == list(wl.block_tokens(1, 5, 512))[:100]


@pytest.mark.parametrize(
    ("ids_a", "len_a", "ids_b", "len_b", "shared_tokens"),
    [
        ([1, 2, 3], 1536, [1, 2, 3], 1536, 1536),  # equal ids -> identical prompts
        ([1, 2, 3], 1536, [1, 2, 4], 1536, 1024),  # share exactly the first two blocks
        ([1, 2], 1000, [1, 2], 700, 700),  # partial last block is a prefix of the full one
        ([1, 2], 1024, [2, 1], 1024, 0),  # same blocks, other order: nothing shared at the head
        ([9], 10, [10], 10, 0),
    ],
)
def test_mooncake_prompt_shares_exactly_the_common_hash_ids(
    ids_a: list[int], len_a: int, ids_b: list[int], len_b: int, shared_tokens: int
) -> None:
    a, b = wl.mooncake_prompt(ids_a, len_a), wl.mooncake_prompt(ids_b, len_b)
    assert (len(a), len(b)) == (len_a, len_b)
    common = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        common += 1
    assert common == shared_tokens


def test_mooncake_prompt_needs_enough_hash_ids() -> None:
    with pytest.raises(ValueError, match="needs 3 blocks"):
        wl.mooncake_prompt([1, 2], 1025)


def _trace(tmp_path: Path, rows: list[dict[str, object]]) -> Path:
    path = tmp_path / "trace.jsonl.gz"
    with gzip.open(path, "wt") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return path


ROWS: list[dict[str, object]] = [
    {"timestamp": 1000, "input_length": 1024, "output_length": 10, "hash_ids": [1, 2]},
    {"timestamp": 1500, "input_length": 1500, "output_length": 300, "hash_ids": [1, 2, 3]},
    {"timestamp": 4000, "input_length": 600, "output_length": 5, "hash_ids": [7, 8]},
    {"timestamp": 9000, "input_length": 512, "output_length": 1, "hash_ids": [1]},
]


@pytest.mark.parametrize(
    ("options", "arrivals", "lengths", "max_tokens"),
    [
        (wl.MooncakeOptions(), [0.0, 0.5, 3.0, 8.0], [1024, 1500, 600, 512], [10, 300, 5, 1]),
        (
            wl.MooncakeOptions(max_input_tokens=1024, max_output_tokens=20),
            [0.0, 0.5, 3.0, 8.0],
            [1024, 1024, 600, 512],
            [10, 20, 5, 1],
        ),
        (
            wl.MooncakeOptions(max_input_tokens=1024, drop_long=True),
            [0.0, 3.0, 8.0],
            [1024, 600, 512],
            [10, 5, 1],
        ),
        (wl.MooncakeOptions(start_s=1.2, duration_s=3.0), [0.0, 2.5], [1500, 600], [300, 5]),
        (wl.MooncakeOptions(limit=2), [0.0, 0.5], [1024, 1500], [10, 300]),
    ],
)
def test_mooncake_source(
    tmp_path: Path,
    options: wl.MooncakeOptions,
    arrivals: list[float],
    lengths: list[int],
    max_tokens: list[int],
) -> None:
    reqs = wl.mooncake(_trace(tmp_path, ROWS), options)
    assert [r.arrival_s for r in reqs] == pytest.approx(arrivals)
    assert [r.prompt_tokens for r in reqs] == lengths
    assert [r.max_tokens for r in reqs] == max_tokens


def test_mooncake_truncation_is_recorded_and_keeps_the_prefix(tmp_path: Path) -> None:
    full = wl.mooncake(_trace(tmp_path, ROWS))
    cut = wl.mooncake(_trace(tmp_path, ROWS), wl.MooncakeOptions(max_input_tokens=1024))
    assert cut[1].meta["trace_input_length"] == 1500
    assert "trace_input_length" not in cut[0].meta
    assert list(cut[1].prompt_token_ids) == list(full[1].prompt_token_ids)[:1024]


def test_mooncake_sampling_keeps_time_windows_whole_even_when_every_prompt_shares_its_head(
    tmp_path: Path,
) -> None:
    # Every request shares its first block (one system prompt): a first-block sampler could only
    # keep all or nothing; windows of 10 s (10 requests each) sample it.
    rows = [
        {"timestamp": i * 1000, "input_length": 1024, "output_length": 1, "hash_ids": [0, i]}
        for i in range(200)
    ]
    path = _trace(tmp_path, rows)
    opts = wl.MooncakeOptions(sample_fraction=0.3, sample_window_s=10.0, sample_seed=4)
    kept = wl.mooncake(path, opts)
    windows = sorted({int(r.meta["window"]) for r in kept})
    assert 0 < len(windows) < 20
    assert len(kept) == 10 * len(windows)  # every request of a kept window
    # Kept windows are replayed back to back: arrivals 1 s apart, no gap.
    gaps = [b.arrival_s - a.arrival_s for a, b in itertools.pairwise(kept)]
    assert gaps == pytest.approx([1.0] * (len(kept) - 1))
    assert kept[0].arrival_s == 0.0
    again = wl.mooncake(path, opts)
    assert [r.meta for r in again] == [r.meta for r in kept]


def test_sample_windows_matches_the_mooncake_sampler(tmp_path: Path) -> None:
    rows = [
        {"timestamp": i * 700, "input_length": 512, "output_length": 1, "hash_ids": [i]}
        for i in range(100)
    ]
    path = _trace(tmp_path, rows)
    full = wl.mooncake(path)
    by_reader = wl.mooncake(path, wl.MooncakeOptions(sample_fraction=0.5, sample_window_s=5.0))
    by_transform = wl.sample_windows(full, 0.5, 5.0)
    assert [r.arrival_s for r in by_transform] == pytest.approx([r.arrival_s for r in by_reader])
    assert [list(r.prompt_token_ids) for r in by_transform] == [
        list(r.prompt_token_ids) for r in by_reader
    ]


def _reuse_share(reqs: Sequence[wl.Request]) -> float:
    # Share of requests whose prompt (its single block id) appeared earlier in the list.
    seen: set[int] = set()
    hits = 0
    for r in reqs:
        key = r.prompt_token_ids[0]
        hits += key in seen
        seen.add(key)
    return hits / len(reqs)


def test_stretch_like_keeps_the_contiguous_stretch_nearest_the_whole() -> None:
    # 40 requests: the first 20 all distinct, the last 20 two alternating prompts. Whole: reuse
    # 18/40 = 0.45; a 10-request stretch reuses 0 (first half), 0.8 (second half) or between.
    ids = list(range(20)) + [100, 101] * 10
    reqs = [wl.Request(float(i), wl.unique_tokens(wl.NS_AZURE, k, 4), 1) for i, k in enumerate(ids)]
    got = wl.stretch_like(reqs, 0.25, _reuse_share)
    assert len(got) == 10
    assert got[0].arrival_s == 0.0
    starts = [int(r.arrival_s) for r in got]
    assert starts == list(range(10))  # contiguous, times from the stretch's first
    # Candidates start every 5: 0, 5, ..., 30; nearest 0.45 is the one at 15 (0.3; 20 and 25: 0.8).
    first = reqs.index(next(r for r in reqs if r.prompt_token_ids == got[0].prompt_token_ids))
    assert first == 15
    assert _reuse_share(got) == pytest.approx(0.3)
    second = wl.stretch_like(reqs, 0.25, _reuse_share, rank=1)
    assert second[0].prompt_token_ids != got[0].prompt_token_ids
    assert wl.stretch_like(reqs, 1.0, _reuse_share) == reqs
    with pytest.raises(ValueError, match="fraction"):
        wl.stretch_like(reqs, 0.0, _reuse_share)


def test_shared_prefix_groups_share_the_system_prompt_only() -> None:
    reqs = wl.shared_prefix(
        groups=3,
        prompts_per_group=4,
        system_tokens=64,
        question_tokens=16,
        output_tokens=8,
        rate=5.0,
        seed=3,
    )
    assert len(reqs) == 12
    assert all(r.prompt_tokens == 80 and r.max_tokens == 8 for r in reqs)
    by_group: dict[object, list[wl.Request]] = {}
    for r in reqs:
        by_group.setdefault(r.meta["group"], []).append(r)
    assert sorted(len(v) for v in by_group.values()) == [4, 4, 4]
    heads = {tuple(v[0].prompt_token_ids[:64]) for v in by_group.values()}
    assert len(heads) == 3
    for v in by_group.values():
        assert {tuple(r.prompt_token_ids[:64]) for r in v} == {tuple(v[0].prompt_token_ids[:64])}
    questions = {tuple(r.prompt_token_ids[64:]) for r in reqs}
    assert len(questions) == 12
    times = [r.arrival_s for r in reqs]
    assert times[0] == 0.0
    assert times == sorted(times)


def test_poisson_arrivals_mean_rate() -> None:
    import random

    times = wl.poisson_arrivals(20001, 4.0, random.Random(0))
    assert (len(times) - 1) / times[-1] == pytest.approx(4.0, rel=0.03)


def test_mixed_lengths_classes() -> None:
    short = wl.LengthClass("short", (10, 20), (1, 2))
    long = wl.LengthClass("long", (100, 120), (5, 6))
    reqs = wl.mixed_lengths(
        requests=400, long_fraction=0.25, short=short, long=long, rate=1.0, seed=2
    )
    longs = [r for r in reqs if r.meta["class"] == "long"]
    shorts = [r for r in reqs if r.meta["class"] == "short"]
    assert 60 < len(longs) < 140
    assert all(100 <= r.prompt_tokens <= 120 and 5 <= r.max_tokens <= 6 for r in longs)
    assert all(10 <= r.prompt_tokens <= 20 and 1 <= r.max_tokens <= 2 for r in shorts)
    assert len({tuple(r.prompt_token_ids) for r in reqs}) == 400


def test_azure_source(tmp_path: Path) -> None:
    path = tmp_path / "azure.csv"
    path.write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        "2023-11-16 18:15:46.6805900,374,44\n"
        "2023-11-16 18:15:50.9951690,396,109\n"
        "2023-11-16 18:15:51.2224670,9000,55\n"
    )
    reqs = wl.azure(path)
    assert [r.arrival_s for r in reqs] == pytest.approx([0.0, 4.314579, 4.541877])
    assert [r.prompt_tokens for r in reqs] == [374, 396, 9000]
    assert [r.max_tokens for r in reqs] == [44, 109, 55]
    assert len({tuple(r.prompt_token_ids[:32]) for r in reqs}) == 3
    capped = wl.azure(path, wl.AzureOptions(max_input_tokens=1000, max_output_tokens=50, start_s=1))
    assert [r.arrival_s for r in capped] == pytest.approx([0.0, 0.227298])
    assert [(r.prompt_tokens, r.max_tokens) for r in capped] == [(396, 50), (1000, 50)]
    assert capped[1].meta["trace_input_length"] == 9000


def _at(times: list[float]) -> list[wl.Request]:
    return [wl.Request(t, [1, 2, 3], 1) for t in times]


def test_scale_time() -> None:
    assert [r.arrival_s for r in wl.scale_time(_at([0, 1, 3]), 0.5)] == [0, 0.5, 1.5]
    with pytest.raises(ValueError, match="positive"):
        wl.scale_time(_at([0]), 0)


@pytest.mark.parametrize(
    ("multiplier", "times", "expected"),
    [
        (lambda t: 1.0, [0, 1, 2.5], [0, 1, 2.5]),
        (lambda t: 2.0, [0, 1, 2.5], [0, 0.5, 1.25]),  # twice the rate: half the gaps
        (lambda t: 0.5, [0, 1, 2], [0, 2, 4]),
        # Rate 1 for the first replay second, then 4: original t=3 is reached at 1 + 2/4.
        (lambda t: 1.0 if t < 1 else 4.0, [0, 0.5, 1, 3], [0, 0.5, 1, 1.5]),
    ],
)
def test_warp_load(
    multiplier: wl.LoadMultiplier, times: list[float], expected: list[float]
) -> None:
    out = wl.warp_load(_at(times), multiplier, step_s=0.001)
    assert [r.arrival_s for r in out] == pytest.approx(expected, abs=2e-3)


def test_day_shape() -> None:
    m = wl.day_shape(100.0, 0.2, 1.0)
    assert m(0) == pytest.approx(0.2)
    assert m(50) == pytest.approx(1.0)
    assert m(25) == pytest.approx(0.6)
    assert m(100) == pytest.approx(0.2)


def test_describe() -> None:
    d = wl.describe([wl.Request(0, [1] * 10, 4), wl.Request(2, [1] * 30, 6)])
    assert d["requests"] == 2
    assert d["mean_prompt_tokens"] == 20
    assert d["offered_output_tokens_per_s"] == 5
    assert d["rate_per_s"] == 0.5
    assert math.isclose(d["span_s"], 2)


def test_unique_prompts_share_nothing() -> None:
    reqs = wl.unique_prompts(
        requests=50, prompt_tokens=(40, 80), output_tokens=(1, 4), rate=2.0, seed=3
    )
    assert len(reqs) == 50
    assert all(40 <= r.prompt_tokens <= 80 and 1 <= r.max_tokens <= 4 for r in reqs)
    heads = {tuple(r.prompt_token_ids[:8]) for r in reqs}
    assert len(heads) == 50


def test_hot_prefix_shares_one_head_among_the_hot_share() -> None:
    reqs = wl.hot_prefix(
        requests=400,
        hot_fraction=0.5,
        system_tokens=64,
        question_tokens=(8, 16),
        cold_prompt_tokens=(64, 80),
        output_tokens=(1, 2),
        rate=1.0,
        seed=2,
    )
    hot = [r for r in reqs if r.meta["hot"] == 1]
    cold = [r for r in reqs if r.meta["hot"] == 0]
    assert 150 < len(hot) < 250
    assert len({tuple(r.prompt_token_ids[:64]) for r in hot}) == 1
    assert len({tuple(r.prompt_token_ids[64:]) for r in hot}) == len(hot)
    assert len({tuple(r.prompt_token_ids[:64]) for r in cold}) == len(cold)


def test_bursty_arrivals_keep_the_mean_rate_and_crowd_the_bursts() -> None:
    import random

    times = wl.bursty_arrivals(20001, 5.0, random.Random(1), burst=6.0, period_s=10.0)
    assert times[0] == 0.0
    assert times == sorted(times)
    assert (len(times) - 1) / times[-1] == pytest.approx(5.0, rel=0.05)
    in_burst = sum(1 for t in times if t % 10.0 < 2.0) / len(times)
    assert in_burst == pytest.approx(6.0 / 10.0, abs=0.02)  # burst / (burst + 4)


def test_multi_turn_next_prompt_contains_previous_prompt_and_its_generated_answer() -> None:
    from llmmesh.emulator.tokens import expected_output_ids

    reqs = wl.multi_turn(
        sessions=6,
        turns=(3, 3),
        system_tokens=32,
        user_tokens=(8, 16),
        output_tokens=(4, 6),
        think_s=1.0,
        rate=1.0,
        seed=5,
    )
    assert len(reqs) == 18
    assert [r.arrival_s for r in reqs] == sorted(r.arrival_s for r in reqs)
    by_session: dict[object, list[wl.Request]] = {}
    for r in reqs:
        by_session.setdefault(r.meta["session"], []).append(r)
    vocab = wl._Vocab()
    for turns in by_session.values():
        turns.sort(key=lambda r: int(r.meta["turn"]))
        for prev, nxt in itertools.pairwise(turns):
            head = list(prev.prompt_token_ids) + expected_output_ids(
                0, prev.prompt_token_ids, prev.max_tokens, vocab
            )
            assert list(nxt.prompt_token_ids[: len(head)]) == head
            assert nxt.prompt_tokens > len(head)
    # Sessions share the system prompt and nothing more.
    firsts = [v[0] for v in by_session.values()]
    assert shared_head(firsts[0].prompt_token_ids, firsts[1].prompt_token_ids) == 32
    kept = wl.sample_sessions(reqs, 0.5, seed=1)
    assert {r.meta["session"] for r in kept} < set(by_session)
    assert all(
        len([r for r in kept if r.meta["session"] == s]) == 3
        for s in {r.meta["session"] for r in kept}
    )


@pytest.mark.parametrize("name", sorted(wl.MATRIX))
def test_matrix_workloads_build_small_samples(name: str) -> None:
    spec = wl.MATRIX[name]
    if name in ("mooncake", "azure") and not wl.MOONCAKE_TRACE.exists():
        pytest.skip("shared traces not present")
    reqs = spec.build(0.05 if name not in ("mooncake", "azure") else 0.02, 0)
    assert len(reqs) >= 2
    assert reqs[0].arrival_s == 0.0
    assert all(b.arrival_s >= a.arrival_s for a, b in itertools.pairwise(reqs))
    assert all(r.prompt_tokens <= wl.TRACE_MAX_INPUT_TOKENS for r in reqs)


@pytest.mark.parametrize(
    ("blocks_per_replica", "replicas", "expected"),
    [
        # Room for every group's prefix: the bound reaches the infinite-cache oracle.
        (10_000, 2, "oracle"),
        # One replica holds one prompt (8 prefix blocks + 1 question block): the groups alternate
        # and evict each other, nothing is reused.
        (9, 1, "below"),
        # Two replicas of that size: perfect placement gives each group its own replica.
        (9, 2, "oracle"),
    ],
)
def test_capacity_limited_bound_against_the_oracle(
    blocks_per_replica: int, replicas: int, expected: str
) -> None:
    from bench.report import capacity_limited_hit_rate, oracle_hit_rate

    reqs = wl.shared_prefix(
        groups=2,
        prompts_per_group=10,
        system_tokens=256,
        question_tokens=32,
        output_tokens=1,
        rate=1.0,
        seed=0,
    )
    reqs = [
        wl.Request(float(i), r.prompt_token_ids, 1, r.meta)
        for i, r in enumerate(
            sorted(reqs, key=lambda r: (int(r.meta["index_in_group"]), int(r.meta["group"])))
        )
    ]  # groups alternate
    oracle = oracle_hit_rate(reqs, 32)
    bound = capacity_limited_hit_rate(reqs, 32, replicas, blocks_per_replica)
    assert 0 <= bound <= oracle
    if expected == "oracle":
        assert bound == pytest.approx(oracle)
    else:
        assert bound < 0.5 * oracle
