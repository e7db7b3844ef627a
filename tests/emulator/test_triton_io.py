from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from llmmesh.emulator.kv_cache import SequenceBlocks
from llmmesh.emulator.scheduler import RequestTimes, TokenOutput
from llmmesh.emulator.triton_io import (
    InvalidRequestError,
    ParsedRequest,
    TensorSink,
    parse_request,
    response_tensors,
)

Tensors = dict[str, npt.NDArray[Any]]


def i32(*v: int) -> npt.NDArray[np.int32]:
    return np.array([list(v)], dtype=np.int32)


def base(**extra: npt.NDArray[Any]) -> Tensors:
    return {
        "input_ids": i32(5, 6, 7, 0),
        "input_lengths": np.array([3], dtype=np.int32),  # reshape: { shape: [ ] } -> [batch]
        "request_output_len": i32(4),
        **extra,
    }


def out(index: int, token: int, finished: bool) -> TokenOutput:
    return TokenOutput(
        "r", index, token, finished, SequenceBlocks(2, 1), RequestTimes(1, 2, 3, 4 + index)
    )


def test_parse_trims_to_input_lengths_and_reads_options() -> None:
    p = parse_request(
        base(
            seed=np.array([[2**63 + 5]], dtype=np.uint64),
            end_id=i32(2),
            streaming=np.array([[True]]),
            return_perf_metrics=np.array([[True]]),
        ),
        "r",
    )
    assert p.request.prompt_ids == (5, 6, 7)
    assert (p.request.max_new_tokens, p.request.seed, p.request.end_id) == (4, 2**63 + 5, 2)
    assert p.streaming
    assert p.return_perf_metrics
    assert p.exclude_input_in_output
    d = parse_request(base(), "r", default_exclude_input=False)
    assert (d.request.seed, d.request.end_id, d.streaming) == (0, None, False)
    assert not d.exclude_input_in_output


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ({"request_output_len": i32(4)}, "input_ids is required"),
        (base(input_ids=np.zeros((1, 0), np.int32), input_lengths=i32(0)), "at least one token"),
        (base(input_lengths=i32(9)), "outside"),
        (base(request_output_len=i32(0)), "must be positive"),
        (base(request_output_len=i32(-3)), "must be positive"),
        ({"input_ids": i32(1, 2)}, "request_output_len is required"),
        (base(input_ids=np.array([[1, 2], [3, 4]], np.int32)), "batch size must be 1"),
        (base(input_ids=i32(1, -2, 3)), "non-negative"),
        (base(beam_width=i32(2)), "beam_width=2"),
        (base(num_return_sequences=i32(3)), "num_return_sequences=3"),
        (base(request_output_len=np.array([[1.5]], np.float32)), "integer or boolean"),
    ],
)
def test_invalid_requests(inputs: Tensors, message: str) -> None:
    with pytest.raises(InvalidRequestError, match=message):
        parse_request(inputs, "r")


def test_response_shapes_follow_the_tensorrt_llm_backend() -> None:
    streaming = parse_request(base(streaming=np.array([[True]])), "r")
    t = response_tensors(streaming, [42], out(0, 42, False))
    assert t["output_ids"].shape == (1, 1, 1)
    assert t["output_ids"].dtype == np.int32
    assert t["sequence_length"].tolist() == [[1]]
    assert "kv_cache_reused_blocks" not in t
    full = parse_request(
        base(exclude_input_in_output=np.array([[False]]), return_perf_metrics=np.array([[True]])),
        "r",
    )
    t = response_tensors(full, [8, 9], out(1, 9, True))
    assert t["output_ids"].tolist() == [[[5, 6, 7, 8, 9]]]
    assert t["sequence_length"].tolist() == [[5]]
    assert t["kv_cache_reused_blocks"].tolist() == [[2]]
    assert t["kv_cache_alloc_new_blocks"].tolist() == [[1]]
    assert t["kv_cache_alloc_total_blocks"].tolist() == [[3]]
    assert t["kv_cache_reused_blocks"].dtype == np.int32
    assert t["last_token_time_ns"].dtype == np.int64
    assert t["last_token_time_ns"].tolist() == [[5]]


class Transport:
    def __init__(self) -> None:
        self.sent: list[tuple[Tensors, bool]] = []
        self.errors: list[str] = []
        self.finals = 0

    def sink(self, parsed: ParsedRequest) -> TensorSink:
        return TensorSink(
            parsed,
            send=lambda t, final: self.sent.append((t, final)),
            send_error=self.errors.append,
            send_final=self._final,
            is_cancelled=lambda: False,
        )

    def _final(self) -> None:
        self.finals += 1


@pytest.mark.parametrize("streaming", [True, False])
def test_sink_streams_or_collects(streaming: bool) -> None:
    parsed = parse_request(
        base(streaming=np.array([[streaming]]), return_perf_metrics=np.array([[True]])), "r"
    )
    tr = Transport()
    sink = tr.sink(parsed)
    for i, tok in enumerate([100, 101, 102]):
        sink.on_token(out(i, tok, i == 2))
    if streaming:
        assert [t["output_ids"].tolist() for t, _ in tr.sent] == [[[[100]]], [[[101]]], [[[102]]]]
        assert [final for _, final in tr.sent] == [False, False, True]
        # Perf metrics ride on the first and last response only.
        assert ["kv_cache_reused_blocks" in t for t, _ in tr.sent] == [True, False, True]
    else:
        assert len(tr.sent) == 1
        assert tr.sent[0][0]["output_ids"].tolist() == [[[100, 101, 102]]]
        assert tr.sent[0][1] is True
    sink.on_cancelled()
    sink.on_error("boom")
    assert (tr.finals, tr.errors) == (1, ["boom"])
