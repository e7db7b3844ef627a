"""The SmolLM2 model repository is a drop-in for the emulator's: same tensors, same parameters."""

from __future__ import annotations

from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from llmmesh.common.topology import TRITON_MODEL

REPOS = Path(__file__).resolve().parents[2] / "model_repository"


def load(repo: str) -> mc.ModelConfig:
    path = REPOS / repo / TRITON_MODEL / "config.pbtxt"
    return text_format.Parse(path.read_text(), mc.ModelConfig())


def test_smollm2_has_the_emulators_interface() -> None:
    emulator, smollm2 = load("emulator"), load("smollm2")
    assert smollm2.name == emulator.name == TRITON_MODEL
    assert smollm2.backend == "python"
    assert smollm2.model_transaction_policy.decoupled
    assert list(smollm2.input) == list(emulator.input)
    assert list(smollm2.output) == list(emulator.output)
    assert dict(smollm2.parameters) == dict(emulator.parameters)
    assert smollm2.max_batch_size == emulator.max_batch_size
    assert (REPOS / "smollm2" / TRITON_MODEL / "1" / "model.py").is_file()
