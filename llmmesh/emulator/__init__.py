"""TensorRT-LLM engine emulator: paged KV cache with prefix reuse, in-flight batching scheduler,
the step-time model of `llmmesh.accelerators`, deterministic tokens and a KV event stream. Pure Python; the
Triton adapter lives in model_repository/emulator/tensorrt_llm/1/model.py."""

from llmmesh.emulator.engine import Clock, Engine, RealClock, RequestSink, VirtualClock
from llmmesh.emulator.events import (
    AllBlocksCleared,
    BlocksRemoved,
    BlocksStored,
    KvEvent,
    StoredBlock,
)
from llmmesh.emulator.kv_cache import PagedKvCache, SequenceBlocks
from llmmesh.emulator.publisher import KvEventPublisher
from llmmesh.emulator.scheduler import (
    EngineMetrics,
    GenerationRequest,
    RequestRejectedError,
    Scheduler,
    SchedulerConfig,
    StepResult,
    TokenOutput,
)
from llmmesh.emulator.settings import EmulatorSettings
from llmmesh.emulator.tokens import TokenStream, expected_output_ids

__all__ = [
    "AllBlocksCleared",
    "BlocksRemoved",
    "BlocksStored",
    "Clock",
    "EmulatorSettings",
    "Engine",
    "EngineMetrics",
    "GenerationRequest",
    "KvEvent",
    "KvEventPublisher",
    "PagedKvCache",
    "RealClock",
    "RequestRejectedError",
    "RequestSink",
    "Scheduler",
    "SchedulerConfig",
    "SequenceBlocks",
    "StepResult",
    "StoredBlock",
    "TokenOutput",
    "TokenStream",
    "VirtualClock",
    "expected_output_ids",
]
