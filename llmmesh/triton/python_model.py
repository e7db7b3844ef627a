"""Scaffold of the decoupled Triton Python-backend models behind the `tensorrt_llm` tensors
(`model_repository/emulator` and `model_repository/smollm2`, `tensorrt_llm/1/model.py`).

Importable only inside the Python-backend stub (it imports `triton_python_backend_utils`). The stub
ignores `PYTHONPATH`, so a model.py puts the `PYTHONPATH` entries on `sys.path` itself before it
imports this module.

`TrtLlmPythonModel` owns what does not depend on the engine: the model-config checks, reading the
request tensors, error responses, the response-sender transport of every request and the
`nv_trt_llm_*` gauges. A subclass (the model's `TritonPythonModel`) starts, feeds and stops its
engine.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar, Generic, Protocol, TypeVar

import numpy as np
import numpy.typing as npt
import triton_python_backend_utils as pb_utils

from llmmesh.triton.trtllm_io import (
    KV_BLOCK_TYPES,
    REQUEST_TYPES,
    EngineMetrics,
    InvalidRequestError,
    OutputTensors,
    SinkTransport,
)

P = TypeVar("P")


class EngineSettings(Protocol):
    @property
    def metrics_interval_ms(self) -> float: ...


class MeteredEngine(Protocol):
    def metrics(self) -> EngineMetrics: ...


def error_response(message: str) -> Any:
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message))


def sender_transport(sender: Any) -> SinkTransport:
    """A sink's transport over one request's `InferenceResponseSender`."""
    final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL

    def send(tensors: OutputTensors, last: bool) -> None:
        response = pb_utils.InferenceResponse(
            output_tensors=[pb_utils.Tensor(k, v) for k, v in tensors.items()]
        )
        sender.send(response, flags=final if last else 0)

    return SinkTransport(
        send=send,
        send_error=lambda message: sender.send(error_response(message), flags=final),
        send_final=lambda: sender.send(flags=final),
        is_cancelled=sender.is_cancelled,
    )


class TrtLlmGauges:
    """`nv_trt_llm_request_metrics` and `nv_trt_llm_kv_cache_block_metrics` of one model
    instance, set from `source()` now and then every `period_s` by a daemon thread until
    `stop()`."""

    def __init__(
        self,
        args: dict[str, str],
        source: Callable[[], EngineMetrics],
        *,
        period_s: float,
        thread_name: str,
        log: logging.Logger,
    ) -> None:
        self._source = source
        self._period_s = period_s
        self._log = log
        labels = {"model": args["model_name"], "version": args["model_version"]}
        self._request_family = pb_utils.MetricFamily(
            name="nv_trt_llm_request_metrics",
            description="TRT LLM request metrics",
            kind=pb_utils.MetricFamily.GAUGE,
        )
        self._kv_family = pb_utils.MetricFamily(
            name="nv_trt_llm_kv_cache_block_metrics",
            description="TRT LLM KV cache block metrics",
            kind=pb_utils.MetricFamily.GAUGE,
        )
        self._request_gauges = {
            t: self._request_family.Metric(labels={**labels, "request_type": t})
            for t in REQUEST_TYPES
        }
        self._kv_gauges = {
            t: self._kv_family.Metric(labels={**labels, "kv_cache_block_type": t})
            for t in KV_BLOCK_TYPES
        }
        self._stop = threading.Event()
        self.update()
        self._thread = threading.Thread(target=self._loop, name=thread_name, daemon=True)
        self._thread.start()

    def update(self) -> None:
        m = self._source()
        for name, value in m.request_metrics().items():
            self._request_gauges[name].set(value)
        for name, value in m.kv_cache_block_metrics().items():
            self._kv_gauges[name].set(value)

    def _loop(self) -> None:
        parent = os.getppid()  # tritonserver
        while not self._stop.wait(self._period_s):
            if os.getppid() != parent:
                # tritonserver is gone (it exited on its exit timeout without unloading us):
                # setting a gauge is a call to it that never returns, and a thread stuck in one
                # keeps the stub from shutting itself down, leaving an orphan process.
                self._log.warning("tritonserver exited; stopping the nv_trt_llm_* metrics thread")
                return
            try:
                self.update()
            except Exception:
                self._log.exception("updating nv_trt_llm_* metrics failed")

    def stop(self) -> None:
        """Ask the thread to end (it sets no gauge after this returns but one in progress)."""
        self._stop.set()

    def join(self, timeout_s: float) -> bool:
        """Wait at most `timeout_s` for the thread; True if it has ended."""
        self._thread.join(timeout=timeout_s)
        return not self._thread.is_alive()


class TrtLlmPythonModel(ABC, Generic[P]):
    """Base of a decoupled `TritonPythonModel` serving the `tensorrt_llm` tensors.

    `execute()` reads `read_inputs`, parses them (`parse_request`, which raises
    `InvalidRequestError`) and hands the request to the engine (`submit`) with a transport over
    its response sender; an invalid request or one the engine rejects (`rejected`) gets an error
    response with the message, any other failure an `internal error` response. Every request gets
    exactly one final response, here or from its sink."""

    #: Named in "tensorrt_llm <engine_name> must be decoupled".
    engine_name: ClassVar[str]
    metrics_thread_name: ClassVar[str]
    read_inputs: ClassVar[tuple[str, ...]]
    rejected: ClassVar[tuple[type[Exception], ...]]
    log: ClassVar[logging.Logger]

    settings: EngineSettings
    engine: MeteredEngine
    gauges: TrtLlmGauges
    default_exclude_input: bool

    # ----------------------------------------------------------------- engine hooks
    @abstractmethod
    def start_engine(self) -> None:
        """Set `settings` (from the environment) and `engine`, and start the engine."""

    @abstractmethod
    def log_ready(self) -> None: ...

    @abstractmethod
    def parse_request(self, inputs: dict[str, npt.NDArray[np.generic]], request_id: str) -> P:
        """The engine's request; `self.default_exclude_input` is the model parameter."""

    @abstractmethod
    def submit(self, parsed: P, transport: SinkTransport) -> None:
        """Queue the request on the engine with a sink answering through `transport`."""

    # ----------------------------------------------------------------- Triton entry points
    def initialize(self, args: dict[str, str]) -> None:
        logging.basicConfig(
            level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        )
        config = json.loads(args["model_config"])
        if not pb_utils.using_decoupled_model_transaction_policy(config):
            raise pb_utils.TritonModelException(
                f"tensorrt_llm {self.engine_name} must be decoupled"
            )
        params = config.get("parameters", {})
        exclude = params.get("exclude_input_in_output", {}).get("string_value", "true")
        self.default_exclude_input = exclude.strip().lower() in ("1", "true", "yes")
        self.start_engine()
        self.gauges = TrtLlmGauges(
            args,
            self.engine.metrics,
            period_s=self.settings.metrics_interval_ms / 1000,
            thread_name=self.metrics_thread_name,
            log=self.log,
        )
        self._ids = itertools.count()
        self.log_ready()

    def execute(self, requests: list[Any]) -> None:
        answered: tuple[type[Exception], ...] = (InvalidRequestError, *self.rejected)
        for request in requests:
            sender = request.get_response_sender()
            request_id = f"{request.request_id() or 'req'}#{next(self._ids)}"
            try:
                inputs: dict[str, npt.NDArray[np.generic]] = {}
                for name in self.read_inputs:
                    tensor = pb_utils.get_input_tensor_by_name(request, name)
                    if tensor is not None:
                        inputs[name] = tensor.as_numpy()
                parsed = self.parse_request(inputs, request_id)
                self.submit(parsed, sender_transport(sender))
            except answered as exc:
                sender.send(
                    error_response(str(exc)), flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
                )
            except Exception as exc:
                self.log.exception("request %s failed", request_id)
                sender.send(
                    error_response(f"internal error: {exc}"),
                    flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL,
                )
        return None
