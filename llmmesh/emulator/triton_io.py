"""TensorRT-LLM backend tensor interface <-> engine requests, as plain numpy (no Triton imports).

Shapes follow the `tensorrt_llm` model (max_batch_size > 0, so every tensor has a leading batch
dimension of 1 per request): `input_ids` [1, n] INT32, scalars such as `request_output_len` arrive
as [1] (config `reshape: { shape: [ ] }`). Responses carry `output_ids` [1, beam=1, tokens] INT32 and
`sequence_length` [1, beam=1] INT32; streaming responses hold only the new token, non-streaming
ones every generated token (preceded by the prompt unless `exclude_input_in_output`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from llmmesh.emulator.scheduler import GenerationRequest, TokenOutput

Tensors = Mapping[str, npt.NDArray[np.generic]]

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


class InvalidRequestError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class ParsedRequest:
    request: GenerationRequest
    streaming: bool
    return_perf_metrics: bool
    return_log_probs: bool
    exclude_input_in_output: bool


def _scalar(inputs: Tensors, name: str) -> int | bool | None:
    arr = inputs.get(name)
    if arr is None:
        return None
    flat = np.asarray(arr).reshape(-1)
    if flat.size != 1:
        raise InvalidRequestError(
            f"{name} must hold exactly one value per request, got {flat.size}"
        )
    value = flat[0].item()
    if not isinstance(value, int | bool):
        raise InvalidRequestError(f"{name} must be an integer or boolean tensor")
    return value


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
    length = _scalar(inputs, "input_lengths")
    if length is not None:
        if not 0 <= length <= ids.size:
            raise InvalidRequestError(f"input_lengths {length} outside [0, {ids.size}]")
        ids = ids[: int(length)]
    if ids.size == 0:
        raise InvalidRequestError("input_ids must hold at least one token")
    if int(ids.min()) < 0:
        raise InvalidRequestError("input_ids must be non-negative")
    output_len = _scalar(inputs, "request_output_len")
    if output_len is None:
        raise InvalidRequestError("request_output_len is required")
    if output_len <= 0:
        raise InvalidRequestError(f"request_output_len must be positive, got {output_len}")
    for name in ("beam_width", "num_return_sequences"):
        v = _scalar(inputs, name)
        if v is not None and v != 1:
            raise InvalidRequestError(f"{name}={v} is not supported by the emulator (only 1)")
    end_id = _scalar(inputs, "end_id")
    seed = _scalar(inputs, "seed")
    exclude = _scalar(inputs, "exclude_input_in_output")
    return ParsedRequest(
        request=GenerationRequest(
            request_id=request_id,
            prompt_ids=tuple(int(t) for t in ids.tolist()),
            max_new_tokens=int(output_len),
            seed=int(seed or 0),
            end_id=None if end_id is None else int(end_id),
        ),
        streaming=bool(_scalar(inputs, "streaming") or False),
        return_perf_metrics=bool(_scalar(inputs, "return_perf_metrics") or False),
        return_log_probs=bool(_scalar(inputs, "return_log_probs") or False),
        exclude_input_in_output=default_exclude_input if exclude is None else bool(exclude),
    )


def _col(value: int, dtype: type[np.generic]) -> npt.NDArray[np.generic]:
    return np.array([[value]], dtype=dtype)


def response_tensors(
    parsed: ParsedRequest, tokens: Sequence[int], last: TokenOutput, *, perf_metrics: bool = True
) -> dict[str, npt.NDArray[np.generic]]:
    """Output tensors of one response carrying `tokens` (the state as of `last`); perf metrics
    only if the request asked for them and `perf_metrics`."""
    ids = list(tokens)
    if not parsed.streaming and not parsed.exclude_input_in_output:
        ids = [*parsed.request.prompt_ids, *ids]
    out: dict[str, npt.NDArray[np.generic]] = {
        "output_ids": np.array([[ids]], dtype=np.int32),
        "sequence_length": _col(len(ids), np.int32),
    }
    if parsed.return_log_probs:  # the emulator's choice is certain: log p = 0
        out["cum_log_probs"] = np.zeros((1, 1), dtype=np.float32)
        out["output_log_probs"] = np.zeros((1, 1, len(tokens)), dtype=np.float32)
    if parsed.return_perf_metrics and perf_metrics:
        out["kv_cache_alloc_new_blocks"] = _col(last.blocks.new_blocks, np.int32)
        out["kv_cache_reused_blocks"] = _col(last.blocks.reused_blocks, np.int32)
        out["kv_cache_alloc_total_blocks"] = _col(last.blocks.total_blocks, np.int32)
        out["arrival_time_ns"] = _col(last.times.arrival_ns, np.int64)
        out["first_scheduled_time_ns"] = _col(last.times.first_scheduled_ns, np.int64)
        out["first_token_time_ns"] = _col(last.times.first_token_ns, np.int64)
        out["last_token_time_ns"] = _col(last.times.last_token_ns, np.int64)
    return out


class TensorSink:
    """An engine `RequestSink` that turns tokens into response tensors.

    Streaming: one response per token, the last one flagged final (like the TensorRT-LLM backend).
    Non-streaming: one final response with every token. Errors and cancellation end the request
    with an error response / an empty final response. Transport callables come from the caller
    (the Triton model wraps `InferenceResponseSender`)."""

    def __init__(
        self,
        parsed: ParsedRequest,
        *,
        send: Callable[[dict[str, npt.NDArray[np.generic]], bool], None],
        send_error: Callable[[str], None],
        send_final: Callable[[], None],
        is_cancelled: Callable[[], bool],
    ) -> None:
        self.parsed = parsed
        self._send = send
        self._send_error = send_error
        self._send_final = send_final
        self._is_cancelled = is_cancelled
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

    def on_error(self, message: str) -> None:
        self._send_error(message)

    def on_cancelled(self) -> None:
        self._send_final()

    def is_cancelled(self) -> bool:
        return self._is_cancelled()
