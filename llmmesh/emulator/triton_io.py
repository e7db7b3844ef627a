"""TensorRT-LLM backend tensor interface <-> emulator requests, as plain numpy (no Triton imports).

Shapes and the shared parsing and response tensors: `llmmesh.triton.trtllm_io`. The emulator's
output is deterministic, so sampling inputs are accepted and ignored; it reads `seed` (part of the
token function) and `end_id`, and supports one beam and one return sequence only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Unpack

from llmmesh.emulator.scheduler import GenerationRequest, TokenOutput
from llmmesh.triton.trtllm_io import InvalidRequestError as InvalidRequestError
from llmmesh.triton.trtllm_io import (
    OutputTensors,
    PerfMetrics,
    SinkTransport,
    Tensors,
    TensorSinkBase,
    int_scalar,
    output_tensors,
    parse_prompt,
    parsed_request,
    reject_unless_neutral,
)
from llmmesh.triton.trtllm_io import ParsedRequest as _ParsedRequest

ParsedRequest = _ParsedRequest[GenerationRequest]

#: Inputs the emulator reads; any other input of the tensorrt_llm interface is accepted and ignored
#: (sampling parameters do not change the deterministic output).
READ_INPUTS = (
    "input_ids",
    "input_lengths",
    "request_output_len",
    "end_id",
    "seed",
    "streaming",
    "return_perf_metrics",
    "return_log_probs",
    "exclude_input_in_output",
    "beam_width",
    "num_return_sequences",
)

_NEUTRAL = {"beam_width": 1, "num_return_sequences": 1}


def parse_request(
    inputs: Tensors, request_id: str, *, default_exclude_input: bool = True
) -> ParsedRequest:
    """Validate and convert one Triton request's tensors; raises `InvalidRequestError`."""
    prompt_ids, output_len = parse_prompt(inputs)
    reject_unless_neutral(inputs, _NEUTRAL, "the emulator")
    end_id = int_scalar(inputs, "end_id")
    request = GenerationRequest(
        request_id=request_id,
        prompt_ids=prompt_ids,
        max_new_tokens=output_len,
        seed=int_scalar(inputs, "seed") or 0,
        end_id=end_id,
    )
    return parsed_request(
        inputs,
        request,
        return_log_probs=bool(int_scalar(inputs, "return_log_probs") or False),
        default_exclude_input=default_exclude_input,
    )


def response_tensors(
    parsed: ParsedRequest, tokens: Sequence[int], last: TokenOutput, *, perf_metrics: bool = True
) -> OutputTensors:
    """Output tensors of one response carrying `tokens` (the state as of `last`); perf metrics
    only if the request asked for them and `perf_metrics`."""
    blocks = last.blocks
    return output_tensors(
        parsed,
        tokens,
        # the emulator's choice is certain: log p = 0
        log_probs=(0.0, [0.0] * len(tokens)),
        perf=PerfMetrics(blocks.new_blocks, blocks.reused_blocks, blocks.total_blocks, last.times)
        if perf_metrics
        else None,
    )


class TensorSink(TensorSinkBase[GenerationRequest]):
    """An engine `RequestSink` that turns tokens into response tensors.

    Streaming: one response per token, the last one flagged final (like the TensorRT-LLM backend).
    Non-streaming: one final response with every token. Errors and cancellation end the request
    with an error response / an empty final response."""

    def __init__(self, parsed: ParsedRequest, **transport: Unpack[SinkTransport]) -> None:
        super().__init__(parsed, **transport)
        self._tokens: list[int] = []

    def on_token(self, output: TokenOutput) -> None:
        if self.parsed.streaming:
            # Perf metrics ride on the first and the final response only: every extra tensor
            # costs the Python backend ~0.2 ms per response, more than a modelled decode step.
            perf = output.index == 0 or output.finished
            self._send(
                response_tensors(self.parsed, [output.token_id], output, perf_metrics=perf),
                output.finished,
            )
            return
        self._tokens.append(output.token_id)
        if output.finished:
            self._send(response_tensors(self.parsed, self._tokens, output), True)
