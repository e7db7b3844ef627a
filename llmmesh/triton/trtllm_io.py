"""The TensorRT-LLM backend's tensor interface, shared by every engine behind it (plain numpy, no
Triton imports): request tensor parsing, response tensors, perf-metric values and gauge values.

Shapes follow the `tensorrt_llm` model (max_batch_size > 0, so every tensor has a leading batch
dimension of 1 per request): `input_ids` [1, n] INT32, scalars such as `request_output_len` arrive
as [1] (config `reshape: { shape: [ ] }`). Responses carry `output_ids` [1, beam=1, tokens] INT32 and
`sequence_length` [1, beam=1] INT32; streaming responses hold only the new token(s), non-streaming
ones every generated token (preceded by the prompt unless `exclude_input_in_output`).

What an engine honours (sampling inputs, stop conditions) is the engine's own parser's business;
this module holds only what means the same for every engine.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Generic, Protocol, TypedDict, TypeVar

import numpy as np
import numpy.typing as npt

Tensors = Mapping[str, npt.NDArray[np.generic]]
OutputTensors = dict[str, npt.NDArray[np.generic]]


class InvalidRequestError(ValueError):
    pass


class _Request(Protocol):
    @property
    def prompt_ids(self) -> tuple[int, ...]: ...


R = TypeVar("R", bound=_Request)


@dataclass(frozen=True, slots=True)
class ParsedRequest(Generic[R]):
    """An engine request plus the response options read from the same tensors."""

    request: R
    streaming: bool
    return_perf_metrics: bool
    return_log_probs: bool
    exclude_input_in_output: bool


@dataclass(frozen=True, slots=True)
class RequestTimes:
    """Monotonic-clock timestamps in ns (TensorRT-LLM's `*_time_ns` perf metrics); 0 = not yet."""

    arrival_ns: int
    first_scheduled_ns: int
    first_token_ns: int
    last_token_ns: int


@dataclass(frozen=True, slots=True)
class PerfMetrics:
    """Values of the perf-metric outputs (`return_perf_metrics`) of one response."""

    new_blocks: int
    reused_blocks: int
    total_blocks: int
    times: RequestTimes


@dataclass(frozen=True, slots=True)
class EngineMetrics:
    """Values of the TensorRT-LLM backend gauges."""

    active: int
    max_active: int
    scheduled: int
    context: int
    waiting: int
    kv_max_blocks: int
    kv_free_blocks: int
    kv_used_blocks: int
    kv_tokens_per_block: int
    kv_reused_blocks: int

    def request_metrics(self) -> dict[str, float]:
        """`nv_trt_llm_request_metrics` by `request_type`."""
        return {
            "active": self.active,
            "max": self.max_active,
            "scheduled": self.scheduled,
            "context": self.context,
            "waiting": self.waiting,
        }

    def kv_cache_block_metrics(self) -> dict[str, float]:
        """`nv_trt_llm_kv_cache_block_metrics` by `kv_cache_block_type`."""
        return {
            "max": self.kv_max_blocks,
            "free": self.kv_free_blocks,
            "used": self.kv_used_blocks,
            "tokens_per": self.kv_tokens_per_block,
            "reused": self.kv_reused_blocks,
            "fraction": self.kv_used_blocks / self.kv_max_blocks,
        }


#: Label values of the two gauge families, as `EngineMetrics` names them.
REQUEST_TYPES = ("active", "max", "scheduled", "context", "waiting")
KV_BLOCK_TYPES = ("max", "free", "used", "tokens_per", "reused", "fraction")


# ----------------------------------------------------------------------------- request tensors
def scalar(inputs: Tensors, name: str) -> int | float | bool | None:
    """The single value of a per-request scalar input; None when absent."""
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


def int_scalar(inputs: Tensors, name: str) -> int | None:
    """`scalar` for integer (or boolean) inputs; a floating-point value is rejected."""
    value = scalar(inputs, name)
    if value is None:
        return None
    if isinstance(value, float):
        raise InvalidRequestError(f"{name} must be an integer or boolean tensor")
    return int(value)


def parse_prompt(inputs: Tensors) -> tuple[tuple[int, ...], int]:
    """`input_ids` trimmed to `input_lengths`, and `request_output_len`, validated: at least one
    non-negative token, a positive output length."""
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
    length = int_scalar(inputs, "input_lengths")
    if length is not None:
        if not 0 <= length <= ids.size:
            raise InvalidRequestError(f"input_lengths {length} outside [0, {ids.size}]")
        ids = ids[:length]
    if ids.size == 0:
        raise InvalidRequestError("input_ids must hold at least one token")
    if int(ids.min()) < 0:
        raise InvalidRequestError("input_ids must be non-negative")
    output_len = int_scalar(inputs, "request_output_len")
    if output_len is None:
        raise InvalidRequestError("request_output_len is required")
    if output_len <= 0:
        raise InvalidRequestError(f"request_output_len must be positive, got {output_len}")
    return tuple(int(t) for t in ids.tolist()), output_len


def reject_unless_neutral(inputs: Tensors, neutral: Mapping[str, float], engine: str) -> None:
    """Reject inputs the engine cannot honour unless they hold their neutral value."""
    for name, value in neutral.items():
        v = scalar(inputs, name)
        if v is not None and not math.isclose(float(v), value):
            raise InvalidRequestError(f"{name}={v} is not supported by {engine} (only {value})")


def parsed_request(
    inputs: Tensors, request: R, *, return_log_probs: bool, default_exclude_input: bool
) -> ParsedRequest[R]:
    """`request` with the response options read from `inputs`."""
    exclude = int_scalar(inputs, "exclude_input_in_output")
    return ParsedRequest(
        request=request,
        streaming=bool(int_scalar(inputs, "streaming") or False),
        return_perf_metrics=bool(int_scalar(inputs, "return_perf_metrics") or False),
        return_log_probs=return_log_probs,
        exclude_input_in_output=default_exclude_input if exclude is None else bool(exclude),
    )


# ----------------------------------------------------------------------------- response tensors
def _col(value: int, dtype: type[np.generic]) -> npt.NDArray[np.generic]:
    return np.array([[value]], dtype=dtype)


def output_tensors(
    parsed: ParsedRequest[R],
    tokens: Sequence[int],
    *,
    log_probs: tuple[float, Sequence[float]] | None = None,
    perf: PerfMetrics | None = None,
) -> OutputTensors:
    """Output tensors of one response carrying `tokens`; `log_probs` (cumulative, per token) when
    the request asked for them, `perf` when it asked for perf metrics."""
    ids = list(tokens)
    if not parsed.streaming and not parsed.exclude_input_in_output:
        ids = [*parsed.request.prompt_ids, *ids]
    out: OutputTensors = {
        "output_ids": np.array([[ids]], dtype=np.int32),
        "sequence_length": _col(len(ids), np.int32),
    }
    if parsed.return_log_probs and log_probs is not None:
        cum, per_token = log_probs
        out["cum_log_probs"] = np.array([[cum]], dtype=np.float32)
        out["output_log_probs"] = np.array([[list(per_token)]], dtype=np.float32)
    if parsed.return_perf_metrics and perf is not None:
        out["kv_cache_alloc_new_blocks"] = _col(perf.new_blocks, np.int32)
        out["kv_cache_reused_blocks"] = _col(perf.reused_blocks, np.int32)
        out["kv_cache_alloc_total_blocks"] = _col(perf.total_blocks, np.int32)
        out["arrival_time_ns"] = _col(perf.times.arrival_ns, np.int64)
        out["first_scheduled_time_ns"] = _col(perf.times.first_scheduled_ns, np.int64)
        out["first_token_time_ns"] = _col(perf.times.first_token_ns, np.int64)
        out["last_token_time_ns"] = _col(perf.times.last_token_ns, np.int64)
    return out


class SinkTransport(TypedDict):
    """How a sink answers its request (the Triton model wraps `InferenceResponseSender`)."""

    send: Callable[[OutputTensors, bool], None]  # (tensors, final)
    send_error: Callable[[str], None]  # an error response, final
    send_final: Callable[[], None]  # an empty final response
    is_cancelled: Callable[[], bool]


class TensorSinkBase(Generic[R]):
    """The transport side of an engine `RequestSink`: errors end the request with an error
    response, cancellation with an empty final response. Subclasses turn tokens into responses."""

    def __init__(
        self,
        parsed: ParsedRequest[R],
        *,
        send: Callable[[OutputTensors, bool], None],
        send_error: Callable[[str], None],
        send_final: Callable[[], None],
        is_cancelled: Callable[[], bool],
    ) -> None:
        self.parsed = parsed
        self._send = send
        self._send_error = send_error
        self._send_final = send_final
        self._is_cancelled = is_cancelled

    def on_error(self, message: str) -> None:
        self._send_error(message)

    def on_cancelled(self) -> None:
        self._send_final()

    def is_cancelled(self) -> bool:
        return self._is_cancelled()
