"""The engine's waiting-queue bound: production sets TensorRT-LLM's `max_queue_size` in its
config (`dynamic_batching.default_queue_policy`, which the TensorRT-LLM backend gives its
executor); the emulator bounds its own queue at the same value (its setting's default)."""

from __future__ import annotations

from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from llmmesh.emulator.settings import EmulatorSettings

ROOT = Path(__file__).resolve().parents[2] / "model_repository"


def _config(name: str) -> mc.ModelConfig:
    return text_format.Parse(
        (ROOT / name / "tensorrt_llm" / "config.pbtxt").read_text(), mc.ModelConfig()
    )


def test_production_and_emulator_bound_the_engine_queue_alike() -> None:
    production = _config("production").dynamic_batching.default_queue_policy.max_queue_size
    assert production > 0
    assert EmulatorSettings(replica_id="t").max_queue_size == production
    # Triton's own queue stays unbounded in front of the emulator (see its config.pbtxt)
    assert not _config("emulator").dynamic_batching.HasField("default_queue_policy")
