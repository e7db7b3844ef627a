"""Triton Python-backend adapter for the CPU engine serving SmolLM2-135M-Instruct (model
`tensorrt_llm`, decoupled).

Thin on purpose: the Triton side is `llmmesh.triton.python_model` (shared with the emulator's
model), tensors are parsed by `llmmesh.cpu_engine.triton_io`, the engine
(`llmmesh.cpu_engine.CpuEngine`, in-flight batching over `PaddedBatchModel`) runs in its own thread
and answers through the request's response sender. Configuration comes from the environment
(`LLMMESH_CPU_ENGINE_*`, `LLMMESH_KV_BLOCK_SIZE`). Exports `nv_trt_llm_request_metrics` and
`nv_trt_llm_kv_cache_block_metrics` like the TensorRT-LLM backend. Publishes no KV events: the
engine has no paged prefix cache, so there is nothing for kv_registry to index.
"""

from __future__ import annotations

import logging
import os
import sys


def _honour_pythonpath() -> None:
    """The Python backend stub's interpreter ignores PYTHONPATH (its sys.path is the base
    interpreter's), so put the PYTHONPATH entries the launcher sets (repository root, the venv's
    site-packages) in front before importing anything from them."""
    entries = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    sys.path[:0] = [p for p in entries if p not in sys.path]


_honour_pythonpath()

import numpy as np  # noqa: E402
import numpy.typing as npt  # noqa: E402

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
    ParsedRequest,
    TensorSink,
    parse_request,
)
from llmmesh.triton.python_model import TrtLlmPythonModel  # noqa: E402
from llmmesh.triton.trtllm_io import SinkTransport  # noqa: E402

log = logging.getLogger("llmmesh.cpu_engine.model")


class TritonPythonModel(TrtLlmPythonModel[ParsedRequest]):
    engine_name = "CPU engine"
    metrics_thread_name = "cpu-engine-metrics"
    read_inputs = READ_INPUTS
    rejected = (RequestRejectedError,)
    log = log
    settings: CpuEngineSettings
    engine: CpuEngine

    def start_engine(self) -> None:
        self.settings = CpuEngineSettings()
        self.kv_block_tokens = KvBlockSettings().block_size
        self.gguf = self.settings.gguf_path or default_gguf_path()
        model, self.load_s = load_causal_lm(
            self.gguf, num_threads=self.settings.num_threads, cache_dir=self.settings.cache_dir
        )
        self.engine = CpuEngine(
            self.settings, PaddedBatchModel(model), kv_block_tokens=self.kv_block_tokens
        )
        self.engine.start()

    def log_ready(self) -> None:
        log.info(
            "CPU engine ready: model=%s loaded in %.1fs, max_batch=%d, queue=%d, "
            "kv_token_budget=%d, torch threads=%d, numpy %s",
            self.gguf.name,
            self.load_s,
            self.settings.max_batch_size,
            self.settings.max_queue_size,
            self.settings.kv_token_budget,
            _torch_threads(),
            np.__version__,
        )

    def parse_request(
        self, inputs: dict[str, npt.NDArray[np.generic]], request_id: str
    ) -> ParsedRequest:
        return parse_request(inputs, request_id, default_exclude_input=self.default_exclude_input)

    def submit(self, parsed: ParsedRequest, transport: SinkTransport) -> None:
        sink = TensorSink(parsed, kv_block_tokens=self.kv_block_tokens, **transport)
        self.engine.submit(parsed.request, sink)

    def finalize(self) -> None:
        self.gauges.stop()
        self.engine.stop()
        self.gauges.join(timeout_s=2.0)


def _torch_threads() -> int:
    import torch

    return int(torch.get_num_threads())
