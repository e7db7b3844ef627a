"""Every config.pbtxt parses as a Triton ModelConfig, and the emulator's `tensorrt_llm` is a
drop-in for the production one on the token-level interface."""

from __future__ import annotations

from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

REPOS = Path(__file__).resolve().parents[2] / "model_repository"
CONFIGS = sorted(REPOS.rglob("config.pbtxt"))

# What llmmesh clients (gateway, tests) exchange with a replica.
TOKEN_INPUTS = {
    "input_ids",
    "input_lengths",
    "request_output_len",
    "streaming",
    "end_id",
    "pad_id",
    "temperature",
    "runtime_top_k",
    "runtime_top_p",
    "seed",
    "beam_width",
    "return_perf_metrics",
    "exclude_input_in_output",
}
TOKEN_OUTPUTS = {
    "output_ids",
    "sequence_length",
    "kv_cache_reused_blocks",
    "kv_cache_alloc_new_blocks",
    "kv_cache_alloc_total_blocks",
}


def load(path: Path) -> mc.ModelConfig:
    return text_format.Parse(path.read_text(), mc.ModelConfig())


def tensor_spec(t: mc.ModelInput | mc.ModelOutput) -> tuple[object, ...]:
    reshape = tuple(t.reshape.shape) if t.HasField("reshape") else None
    return (mc.DataType.Name(t.data_type), tuple(t.dims), reshape)


def test_found_both_repositories() -> None:
    rel = {str(p.relative_to(REPOS)) for p in CONFIGS}
    assert {"emulator/tensorrt_llm/config.pbtxt", "production/tensorrt_llm/config.pbtxt"} <= rel


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(REPOS)))
def test_config_parses_and_is_complete(path: Path) -> None:
    text = path.read_text()
    assert "${" not in text, "template placeholder left"
    cfg = load(path)
    assert cfg.name == path.parent.name
    assert cfg.backend
    assert (path.parent / "1").is_dir(), "version directory 1/ missing"
    names = [t.name for t in cfg.input] + [t.name for t in cfg.output]
    assert len(set(t.name for t in cfg.input)) == len(cfg.input), "duplicate input"
    assert len(set(t.name for t in cfg.output)) == len(cfg.output), "duplicate output"
    assert names


def test_production_is_the_tensorrt_llm_backend() -> None:
    cfg = load(REPOS / "production/tensorrt_llm/config.pbtxt")
    params = {k: v.string_value for k, v in cfg.parameters.items()}
    assert cfg.backend == "tensorrtllm"
    assert cfg.model_transaction_policy.decoupled
    assert params["gpt_model_type"] == "inflight_fused_batching"
    assert params["enable_kv_cache_reuse"] == "true"
    assert params["batch_scheduler_policy"] in {"guaranteed_no_evict", "max_utilization"}
    assert 0 < float(params["kv_cache_free_gpu_mem_fraction"]) <= 1
    assert params["gpt_model_path"].startswith("/models/engines/")
    assert all(v for v in params.values())


def test_emulator_is_a_compatible_subset_of_production() -> None:
    prod = load(REPOS / "production/tensorrt_llm/config.pbtxt")
    emu = load(REPOS / "emulator/tensorrt_llm/config.pbtxt")
    assert emu.name == prod.name == "tensorrt_llm"
    assert emu.max_batch_size == prod.max_batch_size
    assert emu.model_transaction_policy.decoupled
    assert prod.model_transaction_policy.decoupled
    assert emu.backend == "python"

    prod_in = {t.name: t for t in prod.input}
    emu_in = {t.name: t for t in emu.input}
    prod_out = {t.name: t for t in prod.output}
    emu_out = {t.name: t for t in emu.output}
    assert emu_in.keys() & prod_in.keys() >= TOKEN_INPUTS
    assert emu_out.keys() & prod_out.keys() >= TOKEN_OUTPUTS

    # Every emulator tensor exists in production with the same type, dims and reshape.
    assert emu_in.keys() <= prod_in.keys(), "emulator accepts inputs production does not"
    assert emu_out.keys() <= prod_out.keys(), "emulator returns outputs production does not"
    for name, t in emu_in.items():
        assert tensor_spec(t) == tensor_spec(prod_in[name]), name
        # A client valid for production is valid for the emulator: nothing optional there is
        # required here, and vice versa.
        assert t.optional == prod_in[name].optional, name
        assert t.allow_ragged_batch == prod_in[name].allow_ragged_batch, name
    for name, t in emu_out.items():
        assert tensor_spec(t) == tensor_spec(prod_out[name]), name
    required_prod = {n for n, t in prod_in.items() if not t.optional}
    assert required_prod <= emu_in.keys()


def test_token_interface_matches_upstream_types() -> None:
    prod = load(REPOS / "production/tensorrt_llm/config.pbtxt")
    spec = {t.name: tensor_spec(t) for t in [*prod.input, *prod.output]}
    assert spec["input_ids"] == ("TYPE_INT32", (-1,), None)
    assert spec["input_lengths"] == ("TYPE_INT32", (1,), ())
    assert spec["request_output_len"] == ("TYPE_INT32", (1,), ())
    assert spec["seed"] == ("TYPE_UINT64", (1,), ())
    assert spec["streaming"] == ("TYPE_BOOL", (1,), ())
    assert spec["output_ids"] == ("TYPE_INT32", (-1, -1), None)
    assert spec["sequence_length"] == ("TYPE_INT32", (-1,), None)
    assert spec["kv_cache_reused_blocks"] == ("TYPE_INT32", (1,), None)
