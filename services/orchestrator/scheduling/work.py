"""The engine work model shared by the load ledger (`services/orchestrator/load.py`) and the
estimated-wait scorer: how many seconds of an engine a prefill or a decode step takes,
from the accelerator cost model (`llmmesh/accelerators.py`).

An in-flight-batching engine runs steps of at most `max_num_tokens` new tokens; each step
streams the weights once (a fixed cost: overhead + weight bytes / bandwidth) and does the
tokens' math. A prefill's *work* is its share of that: its compute (or its KV traffic, when
larger) plus the fixed step cost prorated by the share of a full step its tokens fill. Work adds
up: the prefills admitted to one replica finish, in order, after the sum of their work (the
engine batches them into full steps). A decoding batch slows prefill down: each step also reads
every decoding sequence's context, so prefill work is stretched by `decode_slowdown`.

Every time it returns is wall seconds: the profile's modelled seconds times `time_scale` (1 for
real engines; an emulator slowed by its TIME_SCALE runs that many wall seconds per modelled one).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from llmmesh.accelerators import (
    CostProfile,
    StepShape,
    decode_batch_shape,
    get_profile,
    prefill_shape,
)

_MEMO = 65_536  # remembered answers at most (a few MB)
# A pure computation of the model from two integers (a remembered answer's key names it).
_Compute = Callable[["WorkModel", int, int], float]


@dataclass(frozen=True, slots=True)
class WorkModel:
    profile: CostProfile
    max_num_tokens: int = 8192
    max_batch: int = 64
    time_scale: float = 1.0  # wall seconds per modelled second
    # Derived once from the fields above (the model is immutable).
    fixed_step_s: float = field(init=False, repr=False, compare=False)
    _full_shape: StepShape = field(init=False, repr=False, compare=False)
    _full_step_s: float = field(init=False, repr=False, compare=False)
    # Answers by their arguments: every method is a pure function of its integer arguments, and
    # a scheduling decision asks the same few of them per replica again and again (the cost
    # model's arithmetic builds shapes: ~4 us a call). Cleared when it holds `_MEMO` answers.
    _memo: dict[tuple[_Compute, int, int], float] = field(
        init=False, repr=False, compare=False, default_factory=dict
    )

    def __post_init__(self) -> None:
        p = self.profile
        if self.time_scale <= 0:
            raise ValueError(f"time_scale must be positive, got {self.time_scale}")
        # One step's cost independent of its tokens: overhead + one pass over the weights.
        fixed = p.overhead_s + p.memory_time_s(StepShape())
        object.__setattr__(self, "fixed_step_s", fixed * self.time_scale)
        full = prefill_shape(self.max_num_tokens, 0)
        object.__setattr__(self, "_full_shape", full)
        object.__setattr__(self, "_full_step_s", p.step_time_s(full))

    @classmethod
    def named(
        cls,
        profile: str,
        max_num_tokens: int = 8192,
        max_batch: int = 64,
        time_scale: float = 1.0,
    ) -> WorkModel:
        return cls(get_profile(profile), max_num_tokens, max_batch, time_scale)

    def prefill_work_s(self, uncached: int, cached: int) -> float:
        """Engine seconds a prefill of `uncached` tokens after `cached` reused ones adds."""
        if uncached <= 0:
            return 0.0
        return self._memoized(WorkModel._prefill_work_s, uncached, cached)

    def decode_step_s(self, seqs: int, context_tokens: int) -> float:
        """One step of `seqs` decoding sequences holding `context_tokens` tokens in all."""
        if seqs <= 0:
            return 0.0
        return self._memoized(WorkModel._decode_step_s, seqs, max(1, context_tokens // seqs))

    def decode_slowdown(self, seqs: int, context_tokens: int) -> float:
        """How much longer a full prefill step takes with this decoding batch riding along."""
        if seqs <= 0:
            return 1.0
        return self._memoized(WorkModel._decode_slowdown, seqs, max(1, context_tokens // seqs))

    def _memoized(self, compute: _Compute, a: int, b: int) -> float:
        """`compute(self, a, b)`, remembered (cleared when `_MEMO` answers are held)."""
        key = (compute, a, b)
        memo = self._memo
        value = memo.get(key)
        if value is None:
            if len(memo) >= _MEMO:
                memo.clear()
            value = memo[key] = compute(self, a, b)
        return value

    def _prefill_work_s(self, uncached: int, cached: int) -> float:
        shape = prefill_shape(uncached, cached)
        p = self.profile
        kv_s = p.kv_bytes_per_token * shape.kv_tokens / (p.hbm_bandwidth * p.hbm_efficiency)
        share = uncached / self.max_num_tokens
        return max(p.compute_time_s(shape), kv_s) * self.time_scale + self.fixed_step_s * share

    def _decode_step_s(self, seqs: int, ctx: int) -> float:
        return self.profile.step_time_s(decode_batch_shape(ctx, seqs)) * self.time_scale

    def _decode_slowdown(self, seqs: int, ctx: int) -> float:
        shape = self._full_shape + decode_batch_shape(ctx, seqs)
        return self.profile.step_time_s(shape) / self._full_step_s
