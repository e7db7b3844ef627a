from __future__ import annotations

import pytest

from llmmesh.emulator.settings import EmulatorSettings
from llmmesh.emulator.tokens import TokenStream, expected_output_ids, next_token

SETTINGS = EmulatorSettings(replica_id="test")


def test_defaults_avoid_smollm2_special_tokens() -> None:
    assert (SETTINGS.vocab_min, SETTINGS.vocab_max) == (100, 49152)


@pytest.mark.parametrize(
    ("seed", "prompt", "n"),
    [
        (0, [1, 2, 3], 1),
        (0, [1, 2, 3], 50),
        (1234, list(range(1000, 1040)), 24),
        (2**64 - 1, [0], 10),
    ],
)
def test_deterministic_and_in_range(seed: int, prompt: list[int], n: int) -> None:
    first = expected_output_ids(seed, prompt, n, SETTINGS)
    assert first == expected_output_ids(seed, prompt, n, SETTINGS)
    assert len(first) == n
    assert all(SETTINGS.vocab_min <= t < SETTINGS.vocab_max for t in first)
    # A prefix of a longer generation is the shorter generation.
    assert expected_output_ids(seed, prompt, n + 5, SETTINGS)[:n] == first


@pytest.mark.parametrize(
    ("seed_a", "prompt_a", "seed_b", "prompt_b"),
    [
        (0, [1, 2, 3], 1, [1, 2, 3]),  # seed matters
        (0, [1, 2, 3], 0, [1, 2, 4]),  # prompt matters
        (0, [1, 2, 3], 0, [1, 2]),  # prompt length matters
    ],
)
def test_inputs_change_the_stream(
    seed_a: int, prompt_a: list[int], seed_b: int, prompt_b: list[int]
) -> None:
    a = expected_output_ids(seed_a, prompt_a, 32, SETTINGS)
    assert a != expected_output_ids(seed_b, prompt_b, 32, SETTINGS)


def test_end_id_is_never_generated() -> None:
    prompt = [5, 6, 7]
    plain = expected_output_ids(7, prompt, 64, SETTINGS)
    end_id = plain[10]
    avoided = expected_output_ids(7, prompt, 64, SETTINGS, end_id=end_id)
    assert end_id not in avoided
    assert avoided[10] == end_id + 1
    # Identical up to the replaced token; after it the context differs (as a model's would).
    assert avoided[:10] == plain[:10]


def test_end_id_at_top_of_range_wraps() -> None:
    stream = TokenStream(seed=0, prompt_ids=[1], vocab_min=100, vocab_max=102)
    tokens = {stream.next() for _ in range(64)}
    assert tokens == {100, 101}
    wrapped = TokenStream(0, [1], 100, 102, end_id=101)
    assert {wrapped.next() for _ in range(64)} == {100}


@pytest.mark.parametrize("end_id", [None, 2])
def test_each_token_is_a_function_of_the_whole_context(end_id: int | None) -> None:
    """Like an autoregressive model: token k depends on (seed, prompt + tokens before k) only,
    so continuing from the prompt plus a prefix of the output yields the rest of the output."""
    seed, prompt, n = 99, [7, 8, 9, 10], 40
    out = expected_output_ids(seed, prompt, n, SETTINGS, end_id)
    for k in (0, 1, 17, n - 1):
        assert expected_output_ids(seed, prompt + out[:k], n - k, SETTINGS, end_id) == out[k:]
        assert next_token(seed, prompt + out[:k], SETTINGS, end_id) == out[k]


def test_not_a_function_of_position() -> None:
    # The same position after a different context gives (almost always) a different token.
    a = expected_output_ids(0, [1, 2, 3], 16, SETTINGS)
    b = expected_output_ids(0, [1, 2, 3, a[0]], 15, SETTINGS)
    assert a[1:] == b
    assert a[:15] != b


def test_rejects_bad_seed_and_range() -> None:
    with pytest.raises(ValueError, match="seed"):
        expected_output_ids(-1, [1], 1, SETTINGS)
    with pytest.raises(ValueError, match="vocab_min"):
        EmulatorSettings(replica_id="x", vocab_min=10, vocab_max=10)
