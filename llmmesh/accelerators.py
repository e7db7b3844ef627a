"""Accelerator cost profiles: a model on an accelerator, and the step-time model of one
in-flight-batching iteration on it, derived from first principles.

Shared by the engine emulator (how long a step takes), the estimated-wait scheduling plugin (a
replica's predicted time to first token) and the autoscaler's capacity model (what one replica
sustains at the SLO); none of them owns it.

An iteration runs every scheduled token through the model once: the prompt tokens of newly admitted
requests (prefill / context phase) and one token per decoding sequence (generation phase), fused in
one batch as TensorRT-LLM's inflight_fused_batching does. It is bounded by whichever of HBM traffic
or tensor-core math takes longer, plus a fixed per-iteration overhead:

    bytes   = weight_bytes + kv_bytes_per_token * kv_tokens
    flops   = 2 * params * new_tokens + 4 * n_layers * n_heads * head_dim * attention_pairs
    t_step  = overhead + max(bytes / (hbm_bandwidth * hbm_efficiency), flops / (peak_flops * mfu))

- `new_tokens`: tokens run through the weights this step (prefill tokens + decoding sequences).
  `2 * params` FLOPs per token is the usual dense-transformer estimate (a multiply-add per weight).
- `attention_pairs`: (query, key) pairs scored this step; a decode token at context c scores c keys,
  a prefill of t new tokens after r cached ones scores t*r + t*(t+1)/2 (causal). QK^T and PV cost
  2 * head_dim FLOPs per pair per head each, hence 4 * n_layers * n_heads * head_dim.
- `kv_tokens`: tokens whose K/V are read (decode: the whole context) or written (prefill).
- Weights are streamed from HBM once per iteration whatever the batch size, which is what makes
  small-batch decode memory-bound (~6 ms/step for 16 GB of BF16 weights) and large prefills
  compute-bound (~2 * 8e9 * tokens / (989e12 * 0.5)).

Profile `llama-3.1-8b-h100-bf16`, every constant and where it comes from:

| constant            | value        | source |
|---------------------|--------------|--------|
| params              | 8.03e9       | Llama-3.1-8B model card (8,030,261,248 parameters) |
| n_layers            | 32           | Llama-3.1-8B config.json `num_hidden_layers` |
| n_heads             | 32           | config.json `num_attention_heads` |
| n_kv_heads          | 8            | config.json `num_key_value_heads` (GQA) |
| head_dim            | 128          | config.json `hidden_size / num_attention_heads` = 4096 / 32 |
| bytes_per_param     | 2            | BF16 weights and KV cache |
| kv_bytes_per_token  | 131072       | 2 (K and V) * 32 layers * 8 KV heads * 128 * 2 B |
| hbm_bandwidth       | 3.35e12 B/s  | NVIDIA H100 SXM datasheet: HBM3, 3.35 TB/s |
| peak_flops          | 989e12 FLOP/s| NVIDIA H100 SXM datasheet: BF16 Tensor Core 1,979 TFLOPS *with sparsity*, i.e. 989 dense |
| hbm_efficiency      | 0.80         | assumption: fraction of peak HBM bandwidth large streaming reads reach in practice |
| mfu                 | 0.50         | assumption: model-FLOPs utilisation of large prefill GEMMs / FlashAttention, mid-range of the 40-60% commonly reported for transformer inference on H100 |
| overhead_s          | 0.5e-3 s     | assumption: per-iteration scheduling, sampling and kernel-launch cost with CUDA graphs |

Resulting figures (a plausibility check, not a calibration against measurements): batch-1 decode
= 16.06e9 B / 2.68e12 B/s + 0.5 ms ~= 6.5 ms/token (~150 tokens/s); batch-64 decode at 1k context
~= 9.7 ms; a 1,000-token prefill ~= 33.5 ms.

Accelerators (`ACCELERATORS`): per device, dense BF16 tensor throughput (datasheets quote twice
that "with sparsity"), memory bandwidth and capacity, and an hourly price.

| accelerator | HBM/GDDR bandwidth | BF16 dense | memory | source |
|-------------|--------------------|------------|--------|--------|
| H100 SXM    | 3.35e12 B/s (HBM3) | 989e12     | 80 GB  | NVIDIA H100 datasheet (1,979 TFLOPS BF16 with sparsity) |
| H200 SXM    | 4.8e12 B/s (HBM3e) | 989e12     | 141 GB | NVIDIA H200 datasheet: same GH100 compute as H100 (1,979 with sparsity), 141 GB HBM3e at 4.8 TB/s |
| A100 80GB SXM | 2.039e12 B/s (HBM2e) | 312e12 | 80 GB  | NVIDIA A100 datasheet (80GB SXM: 2,039 GB/s; BF16 312 TFLOPS, 624 with sparsity) |
| L40S        | 0.864e12 B/s (GDDR6) | 362e12   | 48 GB  | NVIDIA L40S datasheet (BF16 362.05 TFLOPS, 733 with sparsity; 864 GB/s) |

Achievable fractions (assumptions, not measurements): `hbm_efficiency` 0.80 on HBM parts (as
for the H100 profile) and 0.75 on the L40S's GDDR6 (a narrower bus with more refresh/turnaround
loss); `mfu` 0.50 on Hopper, 0.55 on the A100 (a lower peak is easier to approach: published
A100 inference MFU is typically 50-60%), 0.45 on the L40S (PCIe card at 350 W, clocks throttle
under sustained tensor load). `overhead_s` 0.5 ms everywhere (CUDA graphs, sampling, scheduling).

Prices (`Accelerator.usd_per_hour`, one consistent source): RunPod Serverless "active worker"
per-second rates x 3600 (docs.runpod.io/serverless/pricing, read 2026-12-04): L40S $0.00037/s
= $1.332/h; A100 80GB $0.00060/s = $2.16/h; H100 (PRO) $0.00093/s = $3.348/h; H200 (PRO)
$0.00124/s = $4.464/h. Cross-check: a May 2026 survey of on-demand rates across providers
(mercatus-ai.com/blog/cloud-gpu-pricing) puts specialty clouds at A100 80GB $1.10-1.50,
H100 SXM $2.50-3.50, H200 $3.50-4.50 per hour; hyperscalers are 1.5-2x higher. A replica of a
profile costs `devices` x its accelerator's price.

Llama-3.1-70B (`llama-3.1-70b-h100x4-tp4-bf16`): 70.6e9 params, 80 layers, 64 heads, 8 KV heads,
head_dim 128 (config.json of meta-llama/Llama-3.1-70B), BF16, tensor parallel over 4 H100 SXM on
NVLink. With TP the weights and KV heads are split, so an iteration streams 1/4 of the bytes
per device in parallel: modelled as one device of 4x the bandwidth and 4x the FLOPs. Tensor
parallelism adds two all-reduces per layer; at decode sizes they are latency-bound, ~8 us each
on NVLink 4 (assumption), 160 x 8 us = 1.3 ms, added to the 0.5 ms per-iteration overhead
(1.8 ms); their bandwidth term at prefill (~5% of the GEMM time for 1k tokens) is folded into an
`mfu` of 0.45.

KV capacity (`kv_blocks`): (devices x memory x 0.9 - weights) / (KV bytes per token x block
size): 90% of memory for weights + KV (TensorRT-LLM's `kv_cache_free_gpu_mem_fraction` default
0.9 applies to what the weights leave; activations and workspace are ignored here).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt


@dataclass(frozen=True, slots=True)
class StepShape:
    """What one iteration processes (see module docstring for the meaning of each count)."""

    new_tokens: int = 0
    attention_pairs: int = 0
    kv_tokens: int = 0

    def __add__(self, other: StepShape) -> StepShape:
        return StepShape(
            self.new_tokens + other.new_tokens,
            self.attention_pairs + other.attention_pairs,
            self.kv_tokens + other.kv_tokens,
        )


def prefill_shape(new_tokens: int, cached_tokens: int) -> StepShape:
    """Prefill of `new_tokens` prompt tokens after `cached_tokens` reused from the KV cache."""
    t, r = new_tokens, cached_tokens
    return StepShape(new_tokens=t, attention_pairs=t * r + t * (t + 1) // 2, kv_tokens=r + t)


def decode_shape(context_tokens: int) -> StepShape:
    """One decode token of a sequence that holds `context_tokens` tokens (including the new one)."""
    return StepShape(new_tokens=1, attention_pairs=context_tokens, kv_tokens=context_tokens)


def decode_batch_shape(context_tokens: int, batch: int) -> StepShape:
    """One decode token of each of `batch` sequences that all hold `context_tokens` tokens."""
    return StepShape(
        new_tokens=batch,
        attention_pairs=context_tokens * batch,
        kv_tokens=context_tokens * batch,
    )


@dataclass(frozen=True, slots=True)
class Accelerator:
    """One device: datasheet bandwidth (B/s), dense BF16 FLOP/s, memory (bytes), hourly price."""

    name: str
    hbm_bandwidth: float
    peak_flops: float
    memory_bytes: float
    usd_per_hour: float


H100_SXM = Accelerator("h100-sxm", 3.35e12, 989e12, 80e9, 0.00093 * 3600)
H200_SXM = Accelerator("h200-sxm", 4.8e12, 989e12, 141e9, 0.00124 * 3600)
A100_80GB_SXM = Accelerator("a100-80gb-sxm", 2.039e12, 312e12, 80e9, 0.00060 * 3600)
L40S = Accelerator("l40s", 0.864e12, 362e12, 48e9, 0.00037 * 3600)
ACCELERATORS: dict[str, Accelerator] = {
    a.name: a for a in (H100_SXM, H200_SXM, A100_80GB_SXM, L40S)
}


@dataclass(frozen=True, slots=True)
class CostProfile:
    """A model on an accelerator. All quantities in SI units (bytes, FLOP, seconds).
    `hbm_bandwidth` and `peak_flops` are the replica's (devices x one device's under tensor
    parallelism)."""

    name: str
    params: float
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    bytes_per_param: int
    hbm_bandwidth: float
    peak_flops: float
    hbm_efficiency: float
    mfu: float
    overhead_s: float
    accelerator: str = H100_SXM.name
    devices: int = 1
    # Passes over the weights per iteration: 1 for an engine; R for R replicas modelled as one
    # pooled engine (R times the bandwidth and FLOP/s, each replica still reading its copy).
    weight_reads: int = 1

    @property
    def usd_per_hour(self) -> float:
        """Price of one replica: `devices` of its accelerator."""
        return ACCELERATORS[self.accelerator].usd_per_hour * self.devices

    def kv_blocks(self, block_size: int, memory_fraction: float = 0.9) -> int:
        """KV-cache blocks one replica holds (module docstring)."""
        memory = ACCELERATORS[self.accelerator].memory_bytes * self.devices * memory_fraction
        free = memory - self.weight_bytes
        return max(0, int(free // (self.kv_bytes_per_token * block_size)))

    @property
    def weight_bytes(self) -> float:
        return self.params * self.bytes_per_param

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V, every layer, every KV head (GQA), at the cache dtype width."""
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * self.bytes_per_param

    def memory_time_s(self, shape: StepShape) -> float:
        traffic = self.weight_reads * self.weight_bytes + self.kv_bytes_per_token * shape.kv_tokens
        return traffic / (self.hbm_bandwidth * self.hbm_efficiency)

    def compute_time_s(self, shape: StepShape) -> float:
        flops = (
            2.0 * self.params * shape.new_tokens
            + 4.0 * self.n_layers * self.n_heads * self.head_dim * shape.attention_pairs
        )
        return flops / (self.peak_flops * self.mfu)

    def step_time_s(self, shape: StepShape) -> float:
        """Modelled wall time of one iteration; 0 for an empty one."""
        if shape.new_tokens <= 0:
            return 0.0
        return self.overhead_s + max(self.memory_time_s(shape), self.compute_time_s(shape))

    def step_times_s(
        self, shape: StepShape, growth: StepShape, steps: int
    ) -> npt.NDArray[np.float64]:
        """`step_time_s(shape + j * growth)` for j = 0 .. steps - 1, computed at once with the
        same arithmetic (a decode stretch: every context grows by one token per iteration)."""
        if shape.new_tokens <= 0 and growth.new_tokens <= 0:
            return np.zeros(steps)
        j = np.arange(steps, dtype=np.int64)
        new = shape.new_tokens + growth.new_tokens * j
        kv = shape.kv_tokens + growth.kv_tokens * j
        pairs = shape.attention_pairs + growth.attention_pairs * j
        memory = (self.weight_reads * self.weight_bytes + self.kv_bytes_per_token * kv) / (
            self.hbm_bandwidth * self.hbm_efficiency
        )
        flops = (
            2.0 * self.params * new + (4.0 * self.n_layers * self.n_heads * self.head_dim) * pairs
        )
        out: npt.NDArray[np.float64] = self.overhead_s + np.maximum(
            memory, flops / (self.peak_flops * self.mfu)
        )
        out[new <= 0] = 0.0
        return out


LLAMA_3_1_8B_H100_BF16 = CostProfile(
    name="llama-3.1-8b-h100-bf16",
    params=8.03e9,
    n_layers=32,
    n_heads=32,
    n_kv_heads=8,
    head_dim=128,
    bytes_per_param=2,
    hbm_bandwidth=3.35e12,
    peak_flops=989e12,
    hbm_efficiency=0.80,
    mfu=0.50,
    overhead_s=0.5e-3,
)

_LLAMA_8B = {
    "params": 8.03e9,
    "n_layers": 32,
    "n_heads": 32,
    "n_kv_heads": 8,
    "head_dim": 128,
    "bytes_per_param": 2,
    "overhead_s": 0.5e-3,
}


def _on(acc: Accelerator, hbm_efficiency: float, mfu: float) -> CostProfile:
    return CostProfile(
        name=f"llama-3.1-8b-{acc.name.split('-')[0]}-bf16",
        hbm_bandwidth=acc.hbm_bandwidth,
        peak_flops=acc.peak_flops,
        hbm_efficiency=hbm_efficiency,
        mfu=mfu,
        accelerator=acc.name,
        **_LLAMA_8B,  # type: ignore[arg-type]
    )


LLAMA_3_1_8B_H200_BF16 = _on(H200_SXM, 0.80, 0.50)
LLAMA_3_1_8B_A100_BF16 = _on(A100_80GB_SXM, 0.80, 0.55)
LLAMA_3_1_8B_L40S_BF16 = _on(L40S, 0.75, 0.45)
LLAMA_3_1_70B_H100X4_TP4_BF16 = CostProfile(
    name="llama-3.1-70b-h100x4-tp4-bf16",
    params=70.6e9,
    n_layers=80,
    n_heads=64,
    n_kv_heads=8,
    head_dim=128,
    bytes_per_param=2,
    hbm_bandwidth=4 * H100_SXM.hbm_bandwidth,
    peak_flops=4 * H100_SXM.peak_flops,
    hbm_efficiency=0.80,
    mfu=0.45,
    overhead_s=0.5e-3 + 160 * 8e-6,
    accelerator=H100_SXM.name,
    devices=4,
)

PROFILES: dict[str, CostProfile] = {
    p.name: p
    for p in (
        LLAMA_3_1_8B_H100_BF16,
        LLAMA_3_1_8B_H200_BF16,
        LLAMA_3_1_8B_A100_BF16,
        LLAMA_3_1_8B_L40S_BF16,
        LLAMA_3_1_70B_H100X4_TP4_BF16,
    )
}
#: The profile every consumer assumes unless configured otherwise.
DEFAULT_PROFILE: Final = LLAMA_3_1_8B_H100_BF16.name


def get_profile(name: str) -> CostProfile:
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(
            f"unknown cost profile {name!r}; known: {', '.join(sorted(PROFILES))}"
        ) from None
