"""Per-request token choice: greedy at temperature 0, seeded and batch-independent otherwise."""

from __future__ import annotations

import math

import pytest
import torch

from llmmesh.cpu_engine.sampling import Sampler, SamplingParams, token_logprob

LOGITS = torch.tensor([0.0, 2.0, 1.0, 3.0, 2.5, -1.0])


def draws(params: SamplingParams, n: int = 200) -> list[int]:
    sampler = Sampler(params)
    return [sampler.choose(LOGITS) for _ in range(n)]


def test_temperature_zero_and_top_k_one_are_greedy() -> None:
    assert set(draws(SamplingParams(temperature=0.0))) == {3}
    assert set(draws(SamplingParams(temperature=5.0, top_k=1))) == {3}


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_nan_logits_raise_instead_of_choosing_a_token(temperature: float) -> None:
    logits = LOGITS.clone()
    logits[1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        Sampler(SamplingParams(temperature=temperature, seed=1)).choose(logits)


def test_seeded_sampling_is_reproducible_and_seed_dependent() -> None:
    a = draws(SamplingParams(temperature=1.0, seed=7))
    assert a == draws(SamplingParams(temperature=1.0, seed=7))
    assert a != draws(SamplingParams(temperature=1.0, seed=8))
    assert len(set(a)) > 2


def test_top_k_and_top_p_restrict_the_support() -> None:
    assert set(draws(SamplingParams(temperature=2.0, top_k=2, seed=1))) == {3, 4}
    # p(3), p(4) ~ 0.46, 0.28 at temperature 1: top_p 0.5 keeps both, 0.3 only the first.
    assert set(draws(SamplingParams(temperature=1.0, top_p=0.5, seed=1))) == {3, 4}
    assert set(draws(SamplingParams(temperature=1.0, top_p=0.3, seed=1))) == {3}


def test_full_uint64_seed_range_is_accepted() -> None:
    assert len(draws(SamplingParams(temperature=1.0, seed=2**64 - 1), n=5)) == 5


@pytest.mark.parametrize(
    "kwargs",
    [
        {"temperature": -1.0},
        {"temperature": math.nan},
        {"top_k": -1},
        {"top_p": 0.0},
        {"top_p": 1.5},
        {"seed": 2**64},
    ],
)
def test_invalid_parameters_raise(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="must be"):
        SamplingParams(**kwargs)  # type: ignore[arg-type]


def test_token_logprob_is_the_log_softmax() -> None:
    expected = float(torch.log_softmax(LOGITS, dim=-1)[4])
    assert token_logprob(LOGITS, 4) == pytest.approx(expected)
