"""The serving topology's vocabulary, in one place: pools, model versions, the Triton model name,
priority classes and replica addresses. Every service and tool imports these; none re-declares
them.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final

DEFAULT_POOL: Final = "default"
DEFAULT_MODEL_VERSION: Final = "v1"
# The TensorRT-LLM model name every replica serves (Triton's tensorrt_llm backend model).
TRITON_MODEL: Final = "tensorrt_llm"
# Triton's standard ports (gRPC, HTTP, metrics).
TRITON_GRPC_PORT: Final = 8001
TRITON_HTTP_PORT: Final = 8000
TRITON_METRICS_PORT: Final = 8002


class Priority(enum.IntEnum):
    """Priority classes, most urgent first (lower value = served first)."""

    INTERACTIVE = 0
    STANDARD = 1
    BATCH = 2


@dataclass(frozen=True, slots=True, order=True)
class PoolKey:
    """A replica pool: the orchestrator pool name and the model version its replicas serve."""

    pool: str
    model_version: str


@dataclass(frozen=True, slots=True)
class ReplicaAddress:
    """Where and how to dial one Triton replica."""

    id: str
    grpc_address: str  # host:port of Triton's gRPC endpoint
    pool: str = DEFAULT_POOL
    model_version: str = DEFAULT_MODEL_VERSION
    # HTTP/2 :authority when dialing (the headless Service host:port in Kubernetes, so the mesh
    # applies that Service's mTLS); empty = the address itself.
    authority: str = ""
