"""TensorRT-LLM backend tensor interface <-> CPU engine requests, as plain numpy (no Triton imports).

Shapes and the shared parsing and response tensors: `llmmesh.triton.trtllm_io`. Unlike the
emulator, sampling inputs are honoured (`temperature`, `runtime_top_k`, `runtime_top_p`, `seed`) and
generation stops at `end_id`, which is not returned. Inputs the engine cannot honour (stop/bad word
lists, penalties, beams) are rejected when they would change the output, never silently ignored.
"""

from __future__ import annotations

from typing import Unpack

import numpy as np

from llmmesh.cpu_engine.sampling import SamplingParams
from llmmesh.cpu_engine.scheduler import CpuRequest, TokenOutput
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
    scalar,
)
from llmmesh.triton.trtllm_io import ParsedRequest as _ParsedRequest

ParsedRequest = _ParsedRequest[CpuRequest]

READ_INPUTS = (
    "input_ids",
    "input_lengths",
    "request_output_len",
    "end_id",
    "seed",
    "temperature",
    "runtime_top_k",
    "runtime_top_p",
    "streaming",
    "return_perf_metrics",
    "return_log_probs",
    "exclude_input_in_output",
    "beam_width",
    "num_return_sequences",
    "stop_words_list",
    "bad_words_list",
    "len_penalty",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "min_tokens",
)

#: Inputs accepted only at their neutral value.
_NEUTRAL = {
    "repetition_penalty": 1.0,
    "len_penalty": 1.0,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "min_tokens": 0,
    "beam_width": 1,
    "num_return_sequences": 1,
}


def parse_request(
    inputs: Tensors, request_id: str, *, default_exclude_input: bool = True
) -> ParsedRequest:
    """Validate and convert one Triton request's tensors; raises `InvalidRequestError`."""
    prompt_ids, output_len = parse_prompt(inputs)
    reject_unless_neutral(inputs, _NEUTRAL, "the CPU engine")
    for name in ("stop_words_list", "bad_words_list"):
        if name in inputs and np.asarray(inputs[name]).size:
            raise InvalidRequestError(f"{name} is not supported by the CPU engine")
    temperature = scalar(inputs, "temperature")
    top_p = scalar(inputs, "runtime_top_p")
    try:
        sampling = SamplingParams(
            temperature=0.0 if temperature is None else float(temperature),
            top_k=int_scalar(inputs, "runtime_top_k") or 0,
            top_p=1.0 if top_p is None else float(top_p),
            seed=int_scalar(inputs, "seed"),
        )
    except ValueError as exc:
        raise InvalidRequestError(str(exc)) from exc
    return_log_probs = bool(int_scalar(inputs, "return_log_probs") or False)
    request = CpuRequest(
        request_id=request_id,
        prompt_ids=prompt_ids,
        max_new_tokens=output_len,
        end_id=int_scalar(inputs, "end_id"),
        sampling=sampling,
        return_log_probs=return_log_probs,
    )
    return parsed_request(
        inputs,
        request,
        return_log_probs=return_log_probs,
        default_exclude_input=default_exclude_input,
    )


class TensorSink(TensorSinkBase[CpuRequest]):
    """An engine `RequestSink` that turns tokens into response tensors.

    Streaming: one response per token; the response of the last token carries the final flag,
    and a sequence that ends on `end_id` gets an empty final response instead. Perf metrics
    (when asked for) ride on the first and the last token's responses. Non-streaming: one final
    response with every token. Errors and cancellation end the request with an error response /
    an empty final response."""

    def __init__(
        self, parsed: ParsedRequest, *, kv_block_tokens: int, **transport: Unpack[SinkTransport]
    ) -> None:
        super().__init__(parsed, **transport)
        self._blocks = -(-parsed.request.reserved_tokens // kv_block_tokens)
        self._tokens: list[int] = []
        self._log_probs: list[float] = []
        self._cum_log_prob = 0.0

    def _tensors(
        self, tokens: list[int], log_probs: list[float], last: TokenOutput, perf: bool
    ) -> OutputTensors:
        return output_tensors(
            self.parsed,
            tokens,
            log_probs=(self._cum_log_prob, log_probs),
            # no prefix reuse on this engine: every reserved block is newly allocated
            perf=PerfMetrics(self._blocks, 0, self._blocks, last.times) if perf else None,
        )

    def on_token(self, output: TokenOutput) -> None:
        if output.token_id is not None:
            if output.log_prob is not None:
                self._cum_log_prob += output.log_prob
            if not self.parsed.streaming:
                self._tokens.append(output.token_id)
                if output.log_prob is not None:
                    self._log_probs.append(output.log_prob)
            else:
                lp = [output.log_prob] if output.log_prob is not None else []
                perf = output.index == 0 or output.finished
                self._send(self._tensors([output.token_id], lp, output, perf), output.finished)
                return
        if not output.finished:
            return
        if self.parsed.streaming:  # ended on end_id: nothing left to carry
            self._send_final()
        else:
            self._send(self._tensors(self._tokens, self._log_probs, output, True), True)
