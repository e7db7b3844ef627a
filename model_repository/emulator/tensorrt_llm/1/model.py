"""Triton Python-backend adapter for the llmmesh engine emulator (model `tensorrt_llm`, decoupled).

Thin on purpose: the Triton side is `llmmesh.triton.python_model` (shared with the CPU engine's
model), tensors are parsed by `llmmesh.emulator.triton_io`, the engine
(`llmmesh.emulator.Engine`) runs in its own thread and answers through the request's response
sender. Configuration comes from the environment (`LLMMESH_EMULATOR_*`, `LLMMESH_KV_*`).
Exports `nv_trt_llm_request_metrics` and `nv_trt_llm_kv_cache_block_metrics` like the TensorRT-LLM
backend, and publishes KV events to kv_registry when `LLMMESH_EMULATOR_KV_REGISTRY_ADDRESS` is set.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable


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
from llmmesh.emulator.engine import Engine  # noqa: E402
from llmmesh.emulator.publisher import RegistryFanout, registry_fanout  # noqa: E402
from llmmesh.emulator.scheduler import RequestRejectedError  # noqa: E402
from llmmesh.emulator.settings import EmulatorSettings  # noqa: E402
from llmmesh.emulator.triton_io import (  # noqa: E402
    READ_INPUTS,
    ParsedRequest,
    TensorSink,
    parse_request,
)
from llmmesh.triton.python_model import TrtLlmPythonModel  # noqa: E402
from llmmesh.triton.trtllm_io import SinkTransport  # noqa: E402

log = logging.getLogger("llmmesh.emulator.model")

# finalize(): at most STOP_TIMEOUT_S for the engine step in progress and for the metrics thread,
# FLUSH_TIMEOUT_S for the final KV-event flush; together well inside Triton's 30 s exit timeout.
STOP_TIMEOUT_S = 2.0
FLUSH_TIMEOUT_S = 2.0


class TritonPythonModel(TrtLlmPythonModel[ParsedRequest]):
    engine_name = "emulator"
    metrics_thread_name = "emulator-metrics"
    read_inputs = READ_INPUTS
    rejected = (RequestRejectedError,)
    log = log
    settings: EmulatorSettings
    engine: Engine

    def start_engine(self) -> None:
        self.settings = EmulatorSettings()
        self.block = KvBlockSettings().block_config()
        self.engine = Engine(self.settings, self.block)
        # One stream per kv_registry replica (addresses and/or the registry's headless Service).
        self.publisher: RegistryFanout | None = registry_fanout(
            self.settings,
            epoch=self.engine.epoch,
            block_config=self.block,
            snapshot=self.engine.snapshot,
        )
        if self.publisher is not None:
            self.engine.on_events = self.publisher.publish
            self.publisher.start()
        self.engine.start()

    def log_ready(self) -> None:
        log.info(
            "engine emulator ready: replica=%s epoch=%s profile=%s time_scale=%s kv_blocks=%d "
            "block_size=%d max_queue_size=%s registry=%s",
            self.settings.replica_id,
            self.engine.epoch,
            self.settings.cost_profile,
            self.settings.time_scale,
            self.settings.num_kv_blocks,
            self.block.block_size,
            self.settings.max_queue_size,
            self.settings.kv_registry_description(),
        )

    def parse_request(
        self, inputs: dict[str, npt.NDArray[np.generic]], request_id: str
    ) -> ParsedRequest:
        return parse_request(inputs, request_id, default_exclude_input=self.default_exclude_input)

    def submit(self, parsed: ParsedRequest, transport: SinkTransport) -> None:
        self.engine.submit(parsed.request, TensorSink(parsed, **transport))

    def finalize(self) -> None:
        """Stop the metrics thread, the engine and the publisher, each with a bounded wait (well
        inside Triton's exit timeout), so unloading never hangs on the model. Triton calls this
        only once nothing holds the model any more (every request's final response sent)."""
        self.gauges.stop()
        engine_ok = _bounded("engine", lambda: self.engine.stop(timeout_s=STOP_TIMEOUT_S))
        publisher_ok = True
        if self.publisher is not None:
            publisher = self.publisher
            publisher_ok = _bounded(
                "KV event publisher", lambda: publisher.stop(timeout_s=FLUSH_TIMEOUT_S)
            )
        metrics_ok = self.gauges.join(STOP_TIMEOUT_S)
        log.info(
            "engine emulator stopped: replica=%s engine=%s publisher=%s metrics=%s",
            self.settings.replica_id,
            "ok" if engine_ok else "NOT STOPPED",
            "ok" if publisher_ok else "NOT STOPPED",
            "ok" if metrics_ok else "NOT STOPPED",
        )


def _bounded(what: str, stop: Callable[[], bool]) -> bool:
    """Run one bounded stop step; a failure is logged, never raised (the next steps still run)."""
    try:
        return stop()
    except Exception:
        log.exception("stopping the %s failed", what)
        return False
