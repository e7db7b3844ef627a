"""Discrete-event cluster simulator: llmmesh's own control plane on virtual time (README.md)."""

from llmmesh.sim.cluster import (
    Autoscale,
    ClusterSpec,
    GatewayLimits,
    KvMode,
    Latencies,
    PoolSpec,
    Sample,
    ScaleEvent,
    SimResult,
    Slo,
    simulate,
)

__all__ = [
    "Autoscale",
    "ClusterSpec",
    "GatewayLimits",
    "KvMode",
    "Latencies",
    "PoolSpec",
    "Sample",
    "ScaleEvent",
    "SimResult",
    "Slo",
    "simulate",
]
