"""Plugin contracts. Every plugin module implements one of these Protocols, declares a `TYPE`
string and a pydantic `Params` model (all fields defaulted), and is registered once in
`registry.py`.

Invariants the framework enforces, so plugins need not:
- Filters return a subset of the replicas they were given (order kept).
- Scorers are pure: same inputs, same scores; one score per replica; the framework clamps each to
  [0, 1], multiplies by the profile's weight, sums, and times every call.
- A picker returns one of the candidates it was given, or None when given none.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Protocol, runtime_checkable

from pydantic import BaseModel


@dataclass(frozen=True, slots=True)
class ReplicaLoad:
    """The orchestrator's live accounting of a replica's work (`services/orchestrator/load.py`),
    corrected by the engine's gauges."""

    # Uncached prompt tokens of admitted requests not yet past their first token.
    prefill_tokens: int = 0
    # Modelled engine seconds until those prefills are done (the replica's prefill backlog).
    prefill_s: float = 0.0
    # Sequences past their first token and not completed, and their context tokens.
    decode_seqs: int = 0
    decode_tokens: int = 0
    # The replica's KV use now relative to at its last engine sample, by the tokens this
    # orchestrator has in flight there (grants and completions since the sample); 1 without one.
    kv_scale: float = 1.0
    # KV tokens a further request may reserve now: the engine's KV capacity less what the live
    # leases reserve (`services/orchestrator/load.py`: each its uncached prompt and max tokens,
    # the cached prefixes they pin once per prefix); None while the capacity is unknown (no
    # engine sample yet, or no KV block size given).
    kv_free_tokens: int | None = None
    # KV tokens the live leases give back per second: what they reserve over the replica's mean
    # lease duration (Little's law); None before a lease on it has ended.
    kv_return_per_s: float | None = None

    def kv_wait_s(self, tokens: int) -> float:
        """Seconds until a request reserving `tokens` more KV tokens fits: the engine admits a
        request only once its whole sequence fits (TensorRT-LLM's `guaranteed_no_evict`), so
        it waits for running sequences to give back what it lacks; 0 when it fits now or
        either figure is unknown."""
        free, rate = self.kv_free_tokens, self.kv_return_per_s
        if free is None or tokens <= free or not rate:
            return 0.0
        return (tokens - free) / rate


@dataclass(frozen=True, slots=True)
class ReplicaView:
    """What plugins may know about a replica: a snapshot, never the live state."""

    id: str
    pool: str
    model_version: str
    models: tuple[str, ...]
    ready: bool
    ejected: bool
    in_flight: int
    cap: int
    # Engine metrics (None when the replica reported none recently).
    engine_active: float | None = None
    engine_waiting: float | None = None
    kv_utilization: float | None = None
    # Requests that failed on the replica recently (policy `health.failure_window_s`): a replica
    # that answers errors fast holds few leases but is no idle replica; load scorers count these.
    recent_failures: int = 0
    # Live load accounting; None when the orchestrator keeps none (load scorers then fall back
    # to `in_flight` and the engine gauges).
    load: ReplicaLoad | None = None


@dataclass(frozen=True, slots=True)
class RequestView:
    model: str
    model_version: str
    prompt_tokens: int
    max_tokens: int
    # Leading prompt blocks each replica holds (exact or predicted), and the prompt's full blocks.
    prefix_blocks: Mapping[str, int] = field(default_factory=dict)
    prompt_blocks: int = 0
    # Pools that fit the prompt, smallest first; None when no pools are configured.
    pools: tuple[str, ...] | None = None
    # Pools the policy names (replicas in other pools take any prompt length).
    known_pools: frozenset[str] = frozenset()


class PluginParams(BaseModel):
    """Base of every plugin's parameters; unknown keys are errors."""

    model_config = {"extra": "forbid", "frozen": True}


@runtime_checkable
class Filter(Protocol):
    """Required of a filter (a property test holds every registered one to it): it judges a
    request by its model, model_version, pools and known_pools only. The director groups
    queued requests by these and their excluded replicas (`Orchestrator._kind`; known_pools
    is the same for all) and, per group, checks servability once and skips deciding after a
    decision found no room."""

    TYPE: ClassVar[str]

    def filter(
        self, request: RequestView, replicas: Sequence[ReplicaView]
    ) -> Sequence[ReplicaView]: ...


@runtime_checkable
class Scorer(Protocol):
    TYPE: ClassVar[str]

    def score(self, request: RequestView, replicas: Sequence[ReplicaView]) -> Sequence[float]: ...


@runtime_checkable
class Picker(Protocol):
    TYPE: ClassVar[str]

    def pick(
        self,
        request: RequestView,
        replicas: Sequence[ReplicaView],
        scores: Sequence[float],
        rng: random.Random,
    ) -> ReplicaView | None: ...
