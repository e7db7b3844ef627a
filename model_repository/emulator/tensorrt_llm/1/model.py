"""Triton Python-backend adapter for the llmmesh engine emulator (model `tensorrt_llm`, decoupled).

Thin on purpose: tensors are parsed by `llmmesh.emulator.triton_io`, the engine
(`llmmesh.emulator.Engine`) runs in its own thread and answers through the request's response
sender. Configuration comes from the environment (`LLMMESH_EMULATOR_*`, `LLMMESH_KV_*`).
Exports `nv_trt_llm_request_metrics` and `nv_trt_llm_kv_cache_block_metrics` like the TensorRT-LLM
backend, and publishes KV events to kv_registry when `LLMMESH_EMULATOR_KV_REGISTRY_ADDRESS` is set.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import sys
import threading
from collections.abc import Callable
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
from llmmesh.emulator.engine import Engine  # noqa: E402
from llmmesh.emulator.publisher import KvEventPublisher  # noqa: E402
from llmmesh.emulator.scheduler import RequestRejectedError  # noqa: E402
from llmmesh.emulator.settings import EmulatorSettings  # noqa: E402
from llmmesh.emulator.triton_io import (  # noqa: E402
    READ_INPUTS,
    InvalidRequestError,
    TensorSink,
    parse_request,
)

log = logging.getLogger("llmmesh.emulator.model")

REQUEST_TYPES = ("active", "max", "scheduled", "context", "waiting")
KV_BLOCK_TYPES = ("max", "free", "used", "tokens_per", "reused", "fraction")
# finalize(): at most STOP_TIMEOUT_S for the engine step in progress and for the metrics thread,
# FLUSH_TIMEOUT_S for the final KV-event flush; together well inside Triton's 30 s exit timeout.
STOP_TIMEOUT_S = 2.0
FLUSH_TIMEOUT_S = 2.0


def _error_response(message: str) -> Any:
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message))


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        logging.basicConfig(
            level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        )
        config = json.loads(args["model_config"])
        if not pb_utils.using_decoupled_model_transaction_policy(config):
            raise pb_utils.TritonModelException("tensorrt_llm emulator must be decoupled")
        params = config.get("parameters", {})
        exclude = params.get("exclude_input_in_output", {}).get("string_value", "true")
        self.default_exclude_input = exclude.strip().lower() in ("1", "true", "yes")

        self.settings = EmulatorSettings()
        block = KvBlockSettings().block_config()
        self.engine = Engine(self.settings, block)
        self.publisher: KvEventPublisher | None = None
        if self.settings.kv_registry_address:
            self.publisher = KvEventPublisher(
                self.settings.kv_registry_address,
                replica_id=self.settings.replica_id,
                epoch=self.engine.epoch,
                block_config=block,
                snapshot=self.engine.snapshot,
                max_batch=self.settings.publish_max_batch,
                interval_s=self.settings.publish_interval_ms / 1000,
                queue_size=self.settings.publish_queue_size,
                rpc_timeout_s=self.settings.publish_timeout_s,
            )
            self.engine.on_events = self.publisher.publish
            self.publisher.start()
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
            target=self._metrics_loop, name="emulator-metrics", daemon=True
        )
        self._metrics_thread.start()
        self._ids = itertools.count()
        log.info(
            "engine emulator ready: replica=%s epoch=%s profile=%s time_scale=%s kv_blocks=%d "
            "block_size=%d registry=%s",
            self.settings.replica_id,
            self.engine.epoch,
            self.settings.cost_profile,
            self.settings.time_scale,
            self.settings.num_kv_blocks,
            block.block_size,
            self.settings.kv_registry_address or "off",
        )

    def _update_metrics(self) -> None:
        m = self.engine.metrics()
        for name, value in m.request_metrics().items():
            self._request_gauges[name].set(value)
        for name, value in m.kv_cache_block_metrics().items():
            self._kv_gauges[name].set(value)

    def _metrics_loop(self) -> None:
        period = self.settings.metrics_interval_ms / 1000
        parent = os.getppid()  # tritonserver
        while not self._stop_metrics.wait(period):
            if os.getppid() != parent:
                # tritonserver is gone (it exited on its exit timeout without unloading us):
                # setting a gauge is a call to it that never returns, and a thread stuck in one
                # keeps the stub from shutting itself down, leaving an orphan process.
                log.warning("tritonserver exited; stopping the nv_trt_llm_* metrics thread")
                return
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

    @staticmethod
    def _sink(parsed: Any, sender: Any) -> TensorSink:
        final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL

        def send(tensors: dict[str, npt.NDArray[np.generic]], last: bool) -> None:
            response = pb_utils.InferenceResponse(
                output_tensors=[pb_utils.Tensor(k, v) for k, v in tensors.items()]
            )
            sender.send(response, flags=final if last else 0)

        return TensorSink(
            parsed,
            send=send,
            send_error=lambda message: sender.send(_error_response(message), flags=final),
            send_final=lambda: sender.send(flags=final),
            is_cancelled=sender.is_cancelled,
        )

    def finalize(self) -> None:
        """Stop the metrics thread, the engine and the publisher, each with a bounded wait (well
        inside Triton's exit timeout), so unloading never hangs on the model. Triton calls this
        only once nothing holds the model any more (every request's final response sent)."""
        self._stop_metrics.set()
        engine_ok = _bounded("engine", lambda: self.engine.stop(timeout_s=STOP_TIMEOUT_S))
        publisher_ok = True
        if self.publisher is not None:
            publisher = self.publisher
            publisher_ok = _bounded(
                "KV event publisher", lambda: publisher.stop(timeout_s=FLUSH_TIMEOUT_S)
            )
        self._metrics_thread.join(timeout=STOP_TIMEOUT_S)
        metrics_ok = not self._metrics_thread.is_alive()
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
