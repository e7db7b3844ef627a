"""The engine's waiting-queue bound lives in the model config, as TensorRT-LLM's backend reads it
(`dynamic_batching.default_queue_policy.max_queue_size`): production and the emulator set the
same bound, and the Python-backend scaffold reads it from the config Triton hands the model."""

from __future__ import annotations

import json
from pathlib import Path

from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2 as mc

from llmmesh.triton.trtllm_io import config_max_queue_size

ROOT = Path(__file__).resolve().parents[2] / "model_repository"


def _config(name: str) -> mc.ModelConfig:
    return text_format.Parse(
        (ROOT / name / "tensorrt_llm" / "config.pbtxt").read_text(), mc.ModelConfig()
    )


def test_production_and_emulator_bound_the_engine_queue_alike() -> None:
    bounds = {
        name: _config(name).dynamic_batching.default_queue_policy.max_queue_size
        for name in ("production", "emulator")
    }
    assert bounds["production"] > 0
    assert bounds["emulator"] == bounds["production"]


def test_the_bound_is_read_from_the_config_triton_passes() -> None:
    # Triton hands the model its config as JSON (the protobuf JSON mapping).
    as_json = json.loads(
        json_format.MessageToJson(_config("emulator"), preserving_proto_field_name=True)
    )
    assert config_max_queue_size(as_json) == 128
    assert config_max_queue_size({}) is None
    assert config_max_queue_size({"dynamic_batching": {}}) is None
