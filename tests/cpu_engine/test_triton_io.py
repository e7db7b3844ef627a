"""Tensor interface of the CPU engine model: request parsing and response tensors."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest

from llmmesh.cpu_engine.sampling import SamplingParams
from llmmesh.cpu_engine.scheduler import RequestTimes, TokenOutput
from llmmesh.cpu_engine.triton_io import (
    InvalidRequestError,
    ParsedRequest,
    TensorSink,
    parse_request,
)

Arrays = dict[str, npt.NDArray[np.generic]]


def inputs(**extra: npt.NDArray[np.generic]) -> Arrays:
    base: Arrays = {
        "input_ids": np.array([[5, 6, 7, 0]], dtype=np.int32),
        "input_lengths": np.array([3], dtype=np.int32),
        "request_output_len": np.array([4], dtype=np.int32),
    }
    return {**base, **extra}


def test_parses_the_gateway_request() -> None:
    p = parse_request(
        inputs(
            end_id=np.array([2], dtype=np.int32),
            pad_id=np.array([2], dtype=np.int32),
            temperature=np.array([0.7], dtype=np.float32),
            runtime_top_p=np.array([0.9], dtype=np.float32),
            runtime_top_k=np.array([40], dtype=np.int32),
            seed=np.array([2**64 - 1], dtype=np.uint64),
            streaming=np.array([True]),
            return_perf_metrics=np.array([True]),
        ),
        "r1",
    )
    r = p.request
    assert (r.request_id, r.prompt_ids, r.max_new_tokens, r.end_id) == ("r1", (5, 6, 7), 4, 2)
    assert r.sampling.top_k == 40
    assert r.sampling.seed == 2**64 - 1
    assert r.sampling.temperature == pytest.approx(0.7)
    assert r.sampling.top_p == pytest.approx(0.9)
    assert p.streaming
    assert p.return_perf_metrics
    assert p.exclude_input_in_output


def test_defaults_are_greedy_and_non_streaming() -> None:
    p = parse_request(inputs(), "r", default_exclude_input=False)
    assert p.request.sampling == SamplingParams()
    assert p.request.sampling.greedy
    assert not p.streaming
    assert not p.exclude_input_in_output
    assert p.request.end_id is None


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"input_lengths": np.array([0], dtype=np.int32)}, "at least one token"),
        ({"input_lengths": np.array([9], dtype=np.int32)}, "outside"),
        ({"input_ids": np.array([[1], [2]], dtype=np.int32)}, "batch size must be 1"),
        ({"input_ids": np.array([[-1, 2]], dtype=np.int32), "input_lengths": None}, "non-negative"),
        ({"request_output_len": np.array([0], dtype=np.int32)}, "must be positive"),
        ({"request_output_len": None}, "request_output_len is required"),
        ({"temperature": np.array([-0.5], dtype=np.float32)}, "temperature"),
        ({"runtime_top_p": np.array([0.0], dtype=np.float32)}, "runtime_top_p"),
        ({"beam_width": np.array([2], dtype=np.int32)}, "beam_width=2 is not supported"),
        ({"repetition_penalty": np.array([1.2], dtype=np.float32)}, "repetition_penalty"),
        ({"stop_words_list": np.array([[[5], [1]]], dtype=np.int32)}, "stop_words_list"),
        ({"seed": np.array([1, 2], dtype=np.uint64)}, "exactly one value"),
    ],
)
def test_invalid_requests_name_the_problem(extra: dict[str, object], message: str) -> None:
    arrays = inputs()
    for k, v in extra.items():
        if v is None:
            arrays.pop(k, None)
        else:
            arrays[k] = v  # type: ignore[assignment]
    with pytest.raises(InvalidRequestError, match=message):
        parse_request(arrays, "r")


def test_neutral_values_of_unsupported_inputs_are_accepted() -> None:
    parse_request(
        inputs(
            beam_width=np.array([1], dtype=np.int32),
            repetition_penalty=np.array([1.0], dtype=np.float32),
            presence_penalty=np.array([0.0], dtype=np.float32),
            stop_words_list=np.zeros((1, 2, 0), dtype=np.int32),
        ),
        "r",
    )


def out(
    index: int, token: int | None, finished: bool, log_prob: float | None = None
) -> TokenOutput:
    return TokenOutput("r", index, token, finished, log_prob, 7, RequestTimes(1, 2, 3, 4 + index))


class Transport:
    def __init__(self) -> None:
        self.sent: list[tuple[Arrays, bool]] = []
        self.finals = 0
        self.errors: list[str] = []

    def sink(self, parsed: ParsedRequest) -> TensorSink:
        return TensorSink(
            parsed,
            kv_block_tokens=4,
            send=lambda t, last: self.sent.append((t, last)),
            send_error=self.errors.append,
            send_final=self._final,
            is_cancelled=lambda: False,
        )

    def _final(self) -> None:
        self.finals += 1


def parsed(streaming: bool, **extra: npt.NDArray[np.generic]) -> ParsedRequest:
    return parse_request(
        inputs(streaming=np.array([streaming]), return_perf_metrics=np.array([True]), **extra),
        "r",
        default_exclude_input=False,
    )


def test_streaming_sends_one_response_per_token_and_perf_on_first_and_last() -> None:
    t = Transport()
    sink = t.sink(parsed(True))
    for i, tok in enumerate([11, 12, 13]):
        sink.on_token(out(i, tok, i == 2))
    assert [r["output_ids"].tolist() for r, _ in t.sent] == [[[[11]]], [[[12]]], [[[13]]]]
    assert [last for _, last in t.sent] == [False, False, True]
    assert ["kv_cache_reused_blocks" in r for r, _ in t.sent] == [True, False, True]
    first = t.sent[0][0]
    assert first["kv_cache_reused_blocks"].tolist() == [[0]]
    assert first["kv_cache_alloc_total_blocks"].tolist() == [[2]]  # 7 tokens / 4 per block
    assert t.sent[2][0]["last_token_time_ns"].tolist() == [[6]]


def test_streaming_end_id_ends_with_an_empty_final_response() -> None:
    t = Transport()
    sink = t.sink(parsed(True))
    sink.on_token(out(0, 11, False))
    sink.on_token(out(1, None, True))
    assert len(t.sent) == 1
    assert t.finals == 1


def test_non_streaming_sends_everything_once_with_the_prompt() -> None:
    t = Transport()
    sink = t.sink(parsed(False, return_log_probs=np.array([True])))
    sink.on_token(out(0, 11, False, -0.5))
    sink.on_token(out(1, 12, False, -0.25))
    sink.on_token(out(2, None, True))
    assert len(t.sent) == 1
    tensors, last = t.sent[0]
    assert last
    assert tensors["output_ids"].tolist() == [[[5, 6, 7, 11, 12]]]
    assert tensors["sequence_length"].tolist() == [[5]]
    assert tensors["cum_log_probs"].tolist() == [[-0.75]]
    assert tensors["output_log_probs"].tolist() == [[[-0.5, -0.25]]]


def test_errors_and_cancellation_end_the_request() -> None:
    t = Transport()
    sink = t.sink(parsed(True))
    sink.on_error("boom")
    sink.on_cancelled()
    assert t.errors == ["boom"]
    assert t.finals == 1
