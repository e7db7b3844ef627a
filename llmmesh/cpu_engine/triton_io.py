"""TensorRT-LLM backend tensor interface <-> CPU engine requests, as plain numpy (no Triton imports).

Shapes as in `llmmesh.emulator.triton_io` (the same `tensorrt_llm` model config): `input_ids`
[1, n] INT32, scalars [1]; responses carry `output_ids` [1, 1, tokens] INT32 and
`sequence_length` [1, 1]. Unlike the emulator, sampling inputs are honoured (`temperature`,
`runtime_top_k`, `runtime_top_p`, `seed`) and generation stops at `end_id`, which is not returned.
Inputs the engine cannot honour (stop/bad word lists, penalties, beams) are rejected when they
would change the output, never silently ignored.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from llmmesh.cpu_engine.sampling import SamplingParams
from llmmesh.cpu_engine.scheduler import CpuRequest, TokenOutput

Tensors = Mapping[str, npt.NDArray[np.generic]]

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


class InvalidRequestError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class ParsedRequest:
    request: CpuRequest
    streaming: bool
    return_perf_metrics: bool
    exclude_input_in_output: bool


def _scalar(inputs: Tensors, name: str) -> int | float | bool | None:
    arr = inputs.get(name)
    if arr is None:
        return None
    flat = np.asarray(arr).reshape(-1)
    if flat.size != 1:
        raise InvalidRequestError(
            f"{name} must hold exactly one value per request, got {flat.size}"
        )
    value = flat[0].item()
    if not isinstance(value, int | float | bool):
        raise InvalidRequestError(f"{name} must be a numeric or boolean tensor")
    return value


def _int(inputs: Tensors, name: str) -> int | None:
    v = _scalar(inputs, name)
    if v is None:
        return None
    if isinstance(v, float):
        raise InvalidRequestError(f"{name} must be an integer")
    return int(v)


def parse_request(
    inputs: Tensors, request_id: str, *, default_exclude_input: bool = True
) -> ParsedRequest:
    """Validate and convert one Triton request's tensors; raises `InvalidRequestError`."""
    ids = inputs.get("input_ids")
    if ids is None:
        raise InvalidRequestError("input_ids is required")
    ids = np.asarray(ids)
    if ids.ndim == 2:
        if ids.shape[0] != 1:
            raise InvalidRequestError(f"batch size must be 1 per request, got {ids.shape[0]}")
        ids = ids[0]
    if ids.ndim != 1:
        raise InvalidRequestError(f"input_ids must have shape [1, n], got {list(ids.shape)}")
    length = _int(inputs, "input_lengths")
    if length is not None:
        if not 0 <= length <= ids.size:
            raise InvalidRequestError(f"input_lengths {length} outside [0, {ids.size}]")
        ids = ids[:length]
    if ids.size == 0:
        raise InvalidRequestError("input_ids must hold at least one token")
    if int(ids.min()) < 0:
        raise InvalidRequestError("input_ids must be non-negative")
    output_len = _int(inputs, "request_output_len")
    if output_len is None:
        raise InvalidRequestError("request_output_len is required")
    if output_len <= 0:
        raise InvalidRequestError(f"request_output_len must be positive, got {output_len}")
    for name, neutral in _NEUTRAL.items():
        v = _scalar(inputs, name)
        if v is not None and not math.isclose(float(v), neutral):
            raise InvalidRequestError(
                f"{name}={v} is not supported by the CPU engine (only {neutral})"
            )
    for name in ("stop_words_list", "bad_words_list"):
        if name in inputs and np.asarray(inputs[name]).size:
            raise InvalidRequestError(f"{name} is not supported by the CPU engine")
    temperature = _scalar(inputs, "temperature")
    top_p = _scalar(inputs, "runtime_top_p")
    try:
        sampling = SamplingParams(
            temperature=0.0 if temperature is None else float(temperature),
            top_k=_int(inputs, "runtime_top_k") or 0,
            top_p=1.0 if top_p is None else float(top_p),
            seed=_int(inputs, "seed"),
        )
    except ValueError as exc:
        raise InvalidRequestError(str(exc)) from exc
    exclude = _scalar(inputs, "exclude_input_in_output")
    return ParsedRequest(
        request=CpuRequest(
            request_id=request_id,
            prompt_ids=tuple(int(t) for t in ids.tolist()),
            max_new_tokens=output_len,
            end_id=_int(inputs, "end_id"),
            sampling=sampling,
            return_log_probs=bool(_scalar(inputs, "return_log_probs") or False),
        ),
        streaming=bool(_scalar(inputs, "streaming") or False),
        return_perf_metrics=bool(_scalar(inputs, "return_perf_metrics") or False),
        exclude_input_in_output=default_exclude_input if exclude is None else bool(exclude),
    )


def _col(value: int, dtype: type[np.generic]) -> npt.NDArray[np.generic]:
    return np.array([[value]], dtype=dtype)


class TensorSink:
    """An engine `RequestSink` that turns tokens into response tensors.

    Streaming: one response per token; the response of the last token carries the final flag,
    and a sequence that ends on `end_id` gets an empty final response instead. Perf metrics
    (when asked for) ride on the first and the last token's responses. Non-streaming: one final
    response with every token. Errors and cancellation end the request with an error response /
    an empty final response. Transport callables come from the caller (the Triton model wraps
    `InferenceResponseSender`)."""

    def __init__(
        self,
        parsed: ParsedRequest,
        *,
        kv_block_tokens: int,
        send: Callable[[dict[str, npt.NDArray[np.generic]], bool], None],
        send_error: Callable[[str], None],
        send_final: Callable[[], None],
        is_cancelled: Callable[[], bool],
    ) -> None:
        self.parsed = parsed
        self._blocks = -(-parsed.request.reserved_tokens // kv_block_tokens)
        self._send = send
        self._send_error = send_error
        self._send_final = send_final
        self._is_cancelled = is_cancelled
        self._tokens: list[int] = []
        self._log_probs: list[float] = []
        self._cum_log_prob = 0.0

    def _tensors(
        self, tokens: list[int], log_probs: list[float], last: TokenOutput, perf: bool
    ) -> dict[str, npt.NDArray[np.generic]]:
        p = self.parsed
        ids = tokens
        if not p.streaming and not p.exclude_input_in_output:
            ids = [*p.request.prompt_ids, *tokens]
        out: dict[str, npt.NDArray[np.generic]] = {
            "output_ids": np.array([[ids]], dtype=np.int32),
            "sequence_length": _col(len(ids), np.int32),
        }
        if p.request.return_log_probs:
            out["cum_log_probs"] = np.array([[self._cum_log_prob]], dtype=np.float32)
            out["output_log_probs"] = np.array([[log_probs]], dtype=np.float32)
        if p.return_perf_metrics and perf:
            t = last.times
            out["kv_cache_alloc_new_blocks"] = _col(self._blocks, np.int32)
            out["kv_cache_reused_blocks"] = _col(0, np.int32)  # no prefix reuse on this engine
            out["kv_cache_alloc_total_blocks"] = _col(self._blocks, np.int32)
            out["arrival_time_ns"] = _col(t.arrival_ns, np.int64)
            out["first_scheduled_time_ns"] = _col(t.first_scheduled_ns, np.int64)
            out["first_token_time_ns"] = _col(t.first_token_ns, np.int64)
            out["last_token_time_ns"] = _col(t.last_token_ns, np.int64)
        return out

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

    def on_error(self, message: str) -> None:
        self._send_error(message)

    def on_cancelled(self) -> None:
        self._send_final()

    def is_cancelled(self) -> bool:
        return self._is_cancelled()
