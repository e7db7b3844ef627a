"""Reading the TensorRT-LLM backend's Prometheus gauges (the emulator exports the same names)."""

from __future__ import annotations

import math
import urllib.request
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

from llmmesh.common.metric_names import TRTLLM_KV_CACHE_BLOCK_METRICS, TRTLLM_REQUEST_METRICS

_FAMILIES = (TRTLLM_REQUEST_METRICS, TRTLLM_KV_CACHE_BLOCK_METRICS)
# The lines of those families: their samples (with or without labels) and their HELP/TYPE.
_LINE_PREFIXES = tuple(
    prefix
    for fam in _FAMILIES
    for prefix in (f"{fam}{{", f"{fam} ", f"# HELP {fam} ", f"# TYPE {fam} ")
)


@dataclass(frozen=True, slots=True)
class EngineSample:
    """One scrape of one engine. Request counts and KV blocks as the backend reports them."""

    active: float
    waiting: float
    kv_used: float
    kv_max: float
    max_batch: float | None = None
    kv_free: float | None = None

    @property
    def kv_utilization(self) -> float | None:
        return self.kv_used / self.kv_max if self.kv_max > 0 else None


def _families_text(text: str) -> str:
    """The page's lines of `_FAMILIES` only: the library parser then reads 15 lines, not the
    whole page (a Triton page has dozens of other families; parsing it all cost ~0.5 ms per
    scrape, on every replica every `metrics_interval_s`)."""
    return "\n".join(line for line in text.splitlines() if line.startswith(_LINE_PREFIXES)) + "\n"


def parse_engine_metrics(text: str) -> EngineSample | None:
    """None when a required gauge is absent or not finite (never guess a signal)."""
    values: dict[tuple[str, str], float] = {}
    for fam in text_string_to_metric_families(_families_text(text)):
        if fam.name not in _FAMILIES:
            continue
        for s in fam.samples:
            label = s.labels.get("request_type") or s.labels.get("kv_cache_block_type") or ""
            values[(fam.name, label)] = values.get((fam.name, label), 0.0) + float(s.value)

    def get(family: str, label: str) -> float | None:
        v = values.get((family, label))
        return v if v is not None and math.isfinite(v) else None

    active = get(TRTLLM_REQUEST_METRICS, "active")
    waiting = get(TRTLLM_REQUEST_METRICS, "waiting")
    used = get(TRTLLM_KV_CACHE_BLOCK_METRICS, "used")
    total = get(TRTLLM_KV_CACHE_BLOCK_METRICS, "max")
    if active is None or waiting is None or used is None or total is None:
        return None
    return EngineSample(
        active,
        waiting,
        used,
        total,
        get(TRTLLM_REQUEST_METRICS, "max"),
        get(TRTLLM_KV_CACHE_BLOCK_METRICS, "free"),
    )


def fetch_metrics_text(url: str, host: str, timeout_s: float) -> str:
    """GET a Prometheus text page; `host` overrides the Host header (a headless Service's name
    when scraping a pod by IP through the mesh)."""
    request = urllib.request.Request(url, headers={"Host": host} if host else {})
    with urllib.request.urlopen(request, timeout=timeout_s) as resp:
        return str(resp.read().decode("utf-8", errors="replace"))
