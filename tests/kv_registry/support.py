"""Shared by the kv_registry tests: a manual clock and the registry built as the service builds
it, on that clock."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from llmmesh.kvblocks import BlockConfig
from services.kv_registry.bitmask import BitmaskIndex, Slot
from services.kv_registry.core import KvRegistry
from services.kv_registry.metrics import NO_METRICS, RegistryMetrics
from services.kv_registry.settings import KvRegistrySettings

R = TypeVar("R", bound=Slot)


class ManualClock:
    """Seconds that pass only when a test moves `now`."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make_registry(
    config: BlockConfig,
    settings: KvRegistrySettings,
    *,
    clock: Callable[[], float] | None = None,
    metrics: RegistryMetrics = NO_METRICS,
) -> KvRegistry:
    return KvRegistry(settings, config, clock=clock or ManualClock(), metrics=metrics)


def held_by(store: BitmaskIndex[R], rep: Slot) -> set[int]:
    """The block hashes `store` lists for `rep`."""
    return {h for h, mask in store.index.items() if mask & rep.held}
