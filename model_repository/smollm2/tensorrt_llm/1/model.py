"""Triton Python-backend adapter for the CPU engine serving SmolLM2-135M-Instruct (model
`tensorrt_llm`, decoupled).

Thin on purpose: tensors are parsed by `llmmesh.cpu_engine.triton_io`, the engine
(`llmmesh.cpu_engine.CpuEngine`, in-flight batching over `PaddedBatchModel`) runs in its own thread
and answers through the request's response sender. Configuration comes from the environment
(`LLMMESH_CPU_ENGINE_*`, `LLMMESH_KV_BLOCK_SIZE`). Exports `nv_trt_llm_request_metrics` and
`nv_trt_llm_kv_cache_block_metrics` like the TensorRT-LLM backend. Publishes no KV events: the
engine has no paged prefix cache, so there is nothing for kv_registry to index.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import sys
import threading
from typing import Any


def _honour_pythonpath() -> None:
    """The Python backend stub's interpreter ignores PYTHONPATH (its sys.path is the base
    interpreter's), so put the PYTHONPATH entries the launcher sets (repository root, the venv's
    site-packages) in front before importing anything from them."""
    entries = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    sys.path[:0] = [p for p in entries if p not in sys.path]


_honour_pythonpath()

import numpy as np  # noqa: E402
import numpy.typing as npt  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402

from llmmesh.common.settings import KvBlockSettings  # noqa: E402
from llmmesh.cpu_engine.batch_model import (  # noqa: E402
    PaddedBatchModel,
    default_gguf_path,
    load_causal_lm,
)
from llmmesh.cpu_engine.engine import CpuEngine  # noqa: E402
from llmmesh.cpu_engine.scheduler import RequestRejectedError  # noqa: E402
from llmmesh.cpu_engine.settings import CpuEngineSettings  # noqa: E402
from llmmesh.cpu_engine.triton_io import (  # noqa: E402
    READ_INPUTS,
    InvalidRequestError,
    ParsedRequest,
    TensorSink,
    parse_request,
)

log = logging.getLogger("llmmesh.cpu_engine.model")

REQUEST_TYPES = ("active", "max", "scheduled", "context", "waiting")
KV_BLOCK_TYPES = ("max", "free", "used", "tokens_per", "reused", "fraction")


def _error_response(message: str) -> Any:
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message))


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        logging.basicConfig(
            level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        )
        config = json.loads(args["model_config"])
        if not pb_utils.using_decoupled_model_transaction_policy(config):
            raise pb_utils.TritonModelException("tensorrt_llm CPU engine must be decoupled")
        params = config.get("parameters", {})
        exclude = params.get("exclude_input_in_output", {}).get("string_value", "true")
        self.default_exclude_input = exclude.strip().lower() in ("1", "true", "yes")

        self.settings = CpuEngineSettings()
        self.kv_block_tokens = KvBlockSettings().block_size
        gguf = self.settings.gguf_path or default_gguf_path()
        model, load_s = load_causal_lm(
            gguf, num_threads=self.settings.num_threads, cache_dir=self.settings.cache_dir
        )
        self.engine = CpuEngine(
            self.settings, PaddedBatchModel(model), kv_block_tokens=self.kv_block_tokens
        )
        self.engine.start()

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
        self._stop_metrics = threading.Event()
        self._update_metrics()
        self._metrics_thread = threading.Thread(
            target=self._metrics_loop, name="cpu-engine-metrics", daemon=True
        )
        self._metrics_thread.start()
        self._ids = itertools.count()
        log.info(
            "CPU engine ready: model=%s loaded in %.1fs, max_batch=%d, queue=%d, "
            "kv_token_budget=%d, torch threads=%d, numpy %s",
            gguf.name,
            load_s,
            self.settings.max_batch_size,
            self.settings.max_queue_size,
            self.settings.kv_token_budget,
            _torch_threads(),
            np.__version__,
        )

    def _update_metrics(self) -> None:
        m = self.engine.metrics()
        for name, value in m.request_metrics().items():
            self._request_gauges[name].set(value)
        for name, value in m.kv_cache_block_metrics().items():
            self._kv_gauges[name].set(value)

    def _metrics_loop(self) -> None:
        period = self.settings.metrics_interval_ms / 1000
        while not self._stop_metrics.wait(period):
            try:
                self._update_metrics()
            except Exception:
                log.exception("updating nv_trt_llm_* metrics failed")

    def execute(self, requests: list[Any]) -> None:
        for request in requests:
            sender = request.get_response_sender()
            request_id = f"{request.request_id() or 'req'}#{next(self._ids)}"
            try:
                inputs: dict[str, npt.NDArray[np.generic]] = {}
                for name in READ_INPUTS:
                    tensor = pb_utils.get_input_tensor_by_name(request, name)
                    if tensor is not None:
                        inputs[name] = tensor.as_numpy()
                parsed = parse_request(
                    inputs, request_id, default_exclude_input=self.default_exclude_input
                )
                self.engine.submit(parsed.request, self._sink(parsed, sender))
            except (InvalidRequestError, RequestRejectedError) as exc:
                sender.send(
                    _error_response(str(exc)), flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
                )
            except Exception as exc:
                log.exception("request %s failed", request_id)
                sender.send(
                    _error_response(f"internal error: {exc}"),
                    flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL,
                )
        return None

    def _sink(self, parsed: ParsedRequest, sender: Any) -> TensorSink:
        final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL

        def send(tensors: dict[str, npt.NDArray[np.generic]], last: bool) -> None:
            response = pb_utils.InferenceResponse(
                output_tensors=[pb_utils.Tensor(k, v) for k, v in tensors.items()]
            )
            sender.send(response, flags=final if last else 0)

        return TensorSink(
            parsed,
            kv_block_tokens=self.kv_block_tokens,
            send=send,
            send_error=lambda message: sender.send(_error_response(message), flags=final),
            send_final=lambda: sender.send(flags=final),
            is_cancelled=sender.is_cancelled,
        )

    def finalize(self) -> None:
        self._stop_metrics.set()
        self.engine.stop()
        self._metrics_thread.join(timeout=2.0)


def _torch_threads() -> int:
    import torch

    return int(torch.get_num_threads())
