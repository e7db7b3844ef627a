"""In-flight batching logic of the CPU engine, on a weightless deterministic model."""

from __future__ import annotations

import pytest

from llmmesh.cpu_engine.sampling import SamplingParams
from llmmesh.cpu_engine.scheduler import RequestRejectedError
from tests.cpu_engine.fakes import (
    END_ID,
    expected,
    make,
    req,
    run_to_completion,
    tokens_by_request,
)

PROMPTS = {
    "a": [5, 6, 7],
    "b": [11, 12, 13, 14, 15, 16, 17],
    "c": [40],
    "d": [8, 9, 10, 11, 12],
}


def test_a_request_alone_generates_its_tokens() -> None:
    s, model = make()
    s.submit(req("a", PROMPTS["a"], 6))
    steps = run_to_completion(s)
    assert tokens_by_request(steps)["a"] == expected(PROMPTS["a"], 6)
    outs = [o for st in steps for o in st.outputs]
    assert [o.index for o in outs] == list(range(6))
    assert [o.finished for o in outs] == [False] * 5 + [True]
    assert model.removed == ["a"]
    assert not s.has_work


def test_new_requests_join_the_running_batch_at_step_boundaries() -> None:
    s, model = make()
    s.submit(req("a", PROMPTS["a"], 8))
    first = s.step()
    assert (first.num_context, first.num_generation) == (1, 0)
    s.submit(req("b", PROMPTS["b"], 8))
    s.submit(req("c", PROMPTS["c"], 8))
    second = s.step()  # a decodes alone, b and c are prefilled and produce their first token
    assert (second.num_context, second.num_generation) == (2, 1)
    assert model.decode_calls == [["a"]]
    third = s.step()
    assert model.decode_calls[-1] == ["a", "b", "c"], "one batched forward for every sequence"
    steps = [first, second, third, *run_to_completion(s)]
    got = tokens_by_request(steps)
    for rid in ("a", "b", "c"):
        assert got[rid] == expected(PROMPTS[rid], 8), rid


def test_batched_sequences_equal_their_solo_runs_with_arrivals_and_departures() -> None:
    lengths = {"a": 3, "b": 9, "c": 5, "d": 12}
    s, model = make(batch=3)
    steps = []
    for rid in ("a", "b", "c", "d"):
        s.submit(req(rid, PROMPTS[rid], lengths[rid]))
        steps.append(s.step())
    steps += run_to_completion(s)
    got = tokens_by_request(steps)
    for rid, n in lengths.items():
        assert got[rid] == expected(PROMPTS[rid], n), rid
    assert max(len(c) for c in model.decode_calls) == 3
    assert all(len(c) <= 3 for c in model.decode_calls)


def test_max_batch_size_bounds_the_batch_and_admission_is_fcfs() -> None:
    s, model = make(batch=2)
    for i in range(5):
        s.submit(req(f"r{i}", [i + 20, i + 21], 3))
    steps = run_to_completion(s)
    assert model.prefill_calls == [f"r{i}" for i in range(5)]
    assert all(len(c) <= 2 for c in model.decode_calls)
    # Slots freed by this step's finished sequences are refilled in the same step.
    assert all(st.num_generation <= 2 and st.num_context <= 2 for st in steps)
    got = tokens_by_request(steps)
    assert all(got[f"r{i}"] == expected([i + 20, i + 21], 3) for i in range(5))


def test_end_id_stops_the_sequence_without_returning_it() -> None:
    s, model = make()
    prompt = [999, 1]  # the fake model answers END_ID once the history holds 4 tokens
    s.submit(req("e", prompt, 50))
    steps = run_to_completion(s)
    outs = [o for st in steps for o in st.outputs]
    assert [o.token_id for o in outs][-1] is None
    assert outs[-1].finished
    assert tokens_by_request(steps)["e"] == expected(prompt, 50)
    assert END_ID not in tokens_by_request(steps)["e"]
    assert model.removed == ["e"]


def test_without_end_id_generation_runs_to_request_output_len() -> None:
    s, _ = make()
    s.submit(req("e", [999, 1], 6, end_id=None))
    got = tokens_by_request(run_to_completion(s))["e"]
    assert len(got) == 6
    assert END_ID in got


def test_cancel_frees_the_slot_and_the_model_state() -> None:
    s, model = make(batch=1)
    s.submit(req("a", PROMPTS["a"], 50))
    s.submit(req("b", PROMPTS["b"], 2))
    s.step()
    assert s.num_running == 1
    assert s.num_waiting == 1
    assert s.cancel("a")
    assert model.removed == ["a"]
    steps = run_to_completion(s)
    assert "a" not in tokens_by_request(steps)
    assert tokens_by_request(steps)["b"] == expected(PROMPTS["b"], 2)
    assert not s.cancel("a")


def test_cancel_a_waiting_request() -> None:
    s, model = make(batch=1)
    s.submit(req("a", PROMPTS["a"], 2))
    s.submit(req("b", PROMPTS["b"], 2))
    assert s.cancel("b")
    steps = run_to_completion(s)
    assert set(tokens_by_request(steps)) == {"a"}
    assert "b" not in model.prefill_calls


def test_kv_budget_reserves_the_padded_worst_case() -> None:
    # 'long' may grow to 3 + 45 = 48 rows, so two sequences need 2 x 48 = 96 > 80 tokens.
    s, _ = make(kv_token_budget=80, max_seq_len=64, max_prefill_tokens=64)
    s.submit(req("long", [5, 6, 7], 45))
    s.submit(req("short", [8], 2))
    s.step()
    assert (s.num_running, s.num_waiting) == (1, 1)
    assert s.reserved_tokens() == 48
    steps = run_to_completion(s)
    assert tokens_by_request(steps)["short"] == expected([8], 2)


def test_prefill_budget_limits_admissions_per_step() -> None:
    s, model = make(max_prefill_tokens=8)
    s.submit(req("a", [1, 2, 3, 4, 5], 3))
    s.submit(req("b", [6, 7, 8, 9, 10], 3))
    first = s.step()
    assert first.num_context == 1
    assert model.prefill_calls == ["a"]
    second = s.step()
    assert second.num_context == 1
    assert model.prefill_calls == ["a", "b"]


@pytest.mark.parametrize(
    ("prompt", "n", "message"),
    [
        ([], 4, "at least one token"),
        ([1, 2], 0, "must be positive"),
        (list(range(300)), 1, "max_prefill_tokens"),
        (list(range(200)), 100, "max_seq_len"),
    ],
)
def test_requests_that_can_never_run_are_rejected(prompt: list[int], n: int, message: str) -> None:
    s, _ = make()
    with pytest.raises(RequestRejectedError, match=message):
        s.submit(req("x", prompt, n))
    assert not s.has_work


def test_duplicate_request_id_is_rejected() -> None:
    s, _ = make()
    s.submit(req("x", [1], 2))
    with pytest.raises(RequestRejectedError, match="already in flight"):
        s.submit(req("x", [1], 2))


def test_decode_failure_fails_the_batch_and_keeps_serving() -> None:
    s, model = make()
    s.submit(req("a", PROMPTS["a"], 5))
    s.submit(req("b", PROMPTS["b"], 5))
    s.step()
    model.fail_decode = True
    s.submit(req("c", PROMPTS["c"], 2))
    result = s.step()
    assert sorted(rid for rid, _ in result.failed) == ["a", "b"]
    assert all("decode failed: boom" in msg for _, msg in result.failed)
    model.fail_decode = False
    steps = [result, *run_to_completion(s)]
    assert tokens_by_request(steps)["c"] == expected(PROMPTS["c"], 2)


def test_a_sampling_failure_fails_only_that_request() -> None:
    s, model = make()
    s.submit(req("a", PROMPTS["a"], 5, sampling=SamplingParams(temperature=1.0, seed=1)))
    model.non_finite = True
    result = s.step()
    assert [rid for rid, _ in result.failed] == ["a"]
    assert "sampling failed" in result.failed[0][1]
    assert not s.has_work
    assert model.removed == ["a"]


def test_metrics_report_batch_queue_and_kv_reservation() -> None:
    s, _ = make(batch=2, kv_token_budget=4096, kv_block_tokens=16)
    m = s.metrics()
    assert (m.active, m.waiting, m.max_active, m.scheduled) == (0, 0, 2, 0)
    assert (m.kv_max_blocks, m.kv_used_blocks, m.kv_free_blocks) == (256, 0, 256)
    for i in range(3):
        s.submit(req(f"r{i}", [1, 2, 3], 29))  # 32 tokens reserved each
    s.step()
    m = s.metrics(extra_waiting=4)
    assert (m.active, m.waiting, m.context, m.scheduled) == (2, 5, 2, 2)
    assert m.kv_used_blocks == 4  # 2 sequences x 32 tokens / 16 per block
    assert m.kv_cache_block_metrics()["fraction"] == pytest.approx(4 / 256)
    assert m.kv_reused_blocks == 0
    run_to_completion(s)
    m = s.metrics()
    assert (m.active, m.waiting, m.scheduled, m.kv_used_blocks) == (0, 0, 0, 0)


def test_timestamps_are_ordered() -> None:
    s, _ = make()
    s.submit(req("a", PROMPTS["a"], 4))
    outs = [o for st in run_to_completion(s) for o in st.outputs]
    t = outs[-1].times
    assert 0 < t.arrival_ns <= t.first_scheduled_ns <= t.first_token_ns <= t.last_token_ns
    assert [o.times.first_token_ns for o in outs] == [outs[0].times.last_token_ns] * 4
