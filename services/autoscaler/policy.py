"""Scaling policy: a pool's signals → desired replicas, with the reason (formulae: POLICY.md).

Pure: no I/O, no clock; `now` is passed in and all memory lives in `PoolState`, which the core
keeps per pool. Invariants:
- Unknown (missing, NaN, stale) inputs never lower the count: a decision with unknown inputs
  only holds or scales up when a known signal demands it.
- `min_replicas <= desired <= max_replicas`, except that a pool with `min_replicas == 0` reaches 0
  only after `scale_to_zero_idle_s` with no arrivals, nothing in flight and nothing queued.
- A pool at 0 with requests queued for it gets at least one replica at once (no window applies).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Literal, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

from llmmesh.accelerators import (
    DEFAULT_PROFILE,
    PROFILES,
    CostProfile,
    decode_batch_shape,
    get_profile,
    prefill_shape,
)
from services.autoscaler.signals import PoolSignals

# HPA's stabilization/rate memory and KPA's panic window need at most this many points per pool.
MAX_HISTORY = 4096


class CostConfig(BaseModel):
    """The engine's cost profile and the request shape assumed when the gateway has no data."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    profile: str = Field(
        default=DEFAULT_PROFILE,
        description=f"Step-time model (llmmesh.accelerators), one of: {', '.join(sorted(PROFILES))}.",
    )
    time_scale: float = Field(
        default=1.0,
        gt=0,
        description="Multiplier on modelled step time (the emulator's LLMMESH_EMULATOR_TIME_SCALE; 1 for real engines).",
    )
    max_batch_size: int = Field(
        default=64, gt=0, description="Engine max_batch_size (sequences decoded together)."
    )
    prompt_tokens: float = Field(
        default=512, gt=0, description="Mean prompt length when the observed one is unknown."
    )
    completion_tokens: float = Field(
        default=256, gt=0, description="Mean completion length when the observed one is unknown."
    )
    utilization: float = Field(
        default=0.8,
        gt=0,
        le=1,
        description="Fraction of the SLO-sustainable rate planned per replica (headroom).",
    )

    @model_validator(mode="after")
    def _known_profile(self) -> Self:
        get_profile(self.profile)
        return self


TargetSignal = Literal["requests_per_replica", "queue_per_replica", "kv_utilization"]


class PolicyConfig(BaseModel):
    """Scaling policy of one pool. Defaults: HPA (tolerance, windows, rate policies), Knative KPA
    (panic threshold and window), KEDA (cooldown before zero); see POLICY.md."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    min_replicas: int = Field(default=1, ge=0, description="Floor; 0 allows scale to zero.")
    max_replicas: int = Field(default=16, gt=0, description="Ceiling.")
    target_signal: TargetSignal = Field(
        default="requests_per_replica",
        description="Signal tracked per replica: engine active+waiting plus orchestrator queue, queued only, or KV use.",
    )
    target_value: float = Field(
        default=16.0, gt=0, description="Target of `target_signal` per replica (KV use: in (0, 1])."
    )
    tolerance: float = Field(
        default=0.1, ge=0, lt=1, description="No target-tracking change while |ratio - 1| <= this."
    )
    slo_ttft_s: float = Field(default=2.0, gt=0, description="Time-to-first-token SLO (p90).")
    slo_itl_s: float = Field(default=0.05, gt=0, description="Inter-token latency SLO (p90).")
    correction_min: float = Field(
        default=1.0, gt=0, description="Lower bound of the observed-latency/SLO correction."
    )
    correction_max: float = Field(
        default=2.0, gt=0, description="Upper bound of the observed-latency/SLO correction."
    )
    correction_half_life_s: float = Field(
        default=1800.0,
        ge=0,
        description=(
            "The correction a pool had decays toward correction_min with this half-life while "
            "the observed latency asks for less (0: none kept, each evaluation's own)."
        ),
    )
    scale_up_window_s: float = Field(
        default=0.0, ge=0, description="Scale-up stabilization: min of recommendations over it."
    )
    scale_down_window_s: float = Field(
        default=300.0, ge=0, description="Scale-down stabilization: max of recommendations over it."
    )
    scale_up_period_s: float = Field(
        default=15.0, gt=0, description="Period of the scale-up rate limit."
    )
    scale_up_max_pods: int = Field(
        default=4, ge=1, description="Replicas one period may add (or the percentage, if more)."
    )
    scale_up_max_percent: float = Field(
        default=100.0, ge=0, description="Percent of the period-start count one period may add."
    )
    scale_down_period_s: float = Field(
        default=15.0, gt=0, description="Period of the scale-down rate limit."
    )
    scale_down_max_percent: float = Field(
        default=100.0,
        gt=0,
        le=100,
        description="Percent of the period-start count one period may remove.",
    )
    panic_threshold: float = Field(
        default=2.0, gt=1, description="Panic when recommended / current >= this."
    )
    panic_window_s: float = Field(
        default=6.0, ge=0, description="In panic, desired = max of recommendations over it."
    )
    panic_hold_s: float = Field(
        default=60.0, ge=0, description="Panic ends this long after the last trigger."
    )
    scale_to_zero_idle_s: float = Field(
        default=300.0, ge=0, description="Idle time before a min-0 pool goes to zero."
    )
    not_reporting_hold_s: float = Field(
        default=1800.0,
        ge=0,
        description=(
            "How long replicas known but not reporting (starting) hold the pool's scale-down; "
            "past it (a pod crash-looping, an image that does not pull), the pool is decided "
            "from the replicas that report (a scale-down removes pods not ready first). "
            "Default: an engine's startup bound."
        ),
    )
    cooldown_s: float = Field(
        default=30.0, ge=0, description="No scale-down this soon after any change."
    )
    forecast: bool = Field(
        default=False, description="Plan capacity for Holt's forecast of the arrival rate."
    )
    forecast_alpha: float = Field(default=0.5, gt=0, le=1, description="Holt level smoothing.")
    forecast_beta: float = Field(default=0.3, gt=0, le=1, description="Holt trend smoothing.")
    forecast_horizon_s: float = Field(
        default=60.0, ge=0, description="Forecast horizon (about a replica's start time)."
    )
    cost: CostConfig = Field(default_factory=CostConfig, description="Capacity model inputs.")

    @model_validator(mode="after")
    def _bounds(self) -> Self:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"min_replicas ({self.min_replicas}) > max_replicas ({self.max_replicas})"
            )
        if self.correction_min > self.correction_max:
            raise ValueError("correction_min > correction_max")
        if self.target_signal == "kv_utilization" and self.target_value > 1:
            raise ValueError("target_value for kv_utilization must be in (0, 1]")
        return self


# --- capacity model -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReplicaCapacity:
    """What one replica sustains at the SLO for a request shape (derivation: POLICY.md)."""

    requests_per_s: float
    batch: int
    decode_step_s: float
    prefill_s: float
    meets_slo: bool


def replica_capacity(
    cost: CostConfig, slo_ttft_s: float, slo_itl_s: float, prompt: float, completion: float
) -> ReplicaCapacity:
    profile: CostProfile = get_profile(cost.profile)
    p, c = max(1, round(prompt)), max(1, round(completion))
    context = p + c // 2
    prefill_s = profile.step_time_s(prefill_shape(p, 0)) * cost.time_scale

    def decode_s(batch: int) -> float:
        return profile.step_time_s(decode_batch_shape(context, batch)) * cost.time_scale

    batch = 1
    for b in range(1, cost.max_batch_size + 1):
        if decode_s(b) > slo_itl_s:
            break
        batch = b
    step = decode_s(batch)
    meets = step <= slo_itl_s and prefill_s + step <= slo_ttft_s
    rate = 1.0 / (prefill_s + c * step / batch)
    return ReplicaCapacity(rate, batch, step, prefill_s, meets)


# --- state and decisions ------------------------------------------------------------------


@dataclass(slots=True)
class Holt:
    """Holt's double exponential smoothing with the trend per second (irregular intervals)."""

    level: float
    trend: float
    at: float

    def update(self, x: float, now: float, alpha: float, beta: float) -> None:
        dt = now - self.at
        if dt <= 0:
            return
        prev = self.level
        self.level = alpha * x + (1 - alpha) * (self.level + self.trend * dt)
        self.trend = beta * (self.level - prev) / dt + (1 - beta) * self.trend
        self.at = now

    def forecast(self, horizon_s: float) -> float:
        return max(0.0, self.level + self.trend * horizon_s)


@dataclass(slots=True)
class PoolState:
    """A pool's policy memory; the core keeps one per pool and passes it to every `decide`."""

    recommendations: deque[tuple[float, int]] = field(
        default_factory=lambda: deque(maxlen=MAX_HISTORY)
    )
    changes: deque[tuple[float, int, int]] = field(
        default_factory=lambda: deque(maxlen=MAX_HISTORY)
    )
    last_change_at: float | None = None
    panic_until: float | None = None
    panic_floor: int = 0
    idle_since: float | None = None
    # Since when some of the pool's known replicas do not report (None: all report).
    partial_since: float | None = None
    holt: Holt | None = None
    # The last decided count (None before the first decision): what a hold keeps, and what a
    # change is measured from (the observed count lags it while replicas start).
    desired: int | None = None
    # The first decision's time and observed count: the recommendations before it are unknown
    # (the process started), so until a whole down-window has passed that count stands for them.
    first: tuple[float, int] | None = None
    # The capacity correction kept (`_capacity`) and when it was last set.
    correction: float | None = None
    correction_at: float = 0.0
    # The capacity model's traffic inputs (`TRAFFIC_SIGNALS`) this pool has had known: once
    # known, one unknown while requests arrive means a source failing, not one not deployed.
    traffic_seen: set[str] = field(default_factory=set)

    def decided(self, current: int) -> int:
        """The last decided count; the observed `current` before any decision."""
        return current if self.desired is None else self.desired


Direction = Literal["up", "down", "hold"]  # a decision against the current count (a metric label)


class Cause(StrEnum):
    """Why the decision is what it is (bounded: a metric label)."""

    STEADY = "steady"
    SCALE_UP = "scale_up"
    SCALE_DOWN = "scale_down"
    STABILIZING = "stabilizing"
    COOLDOWN = "cooldown"
    RATE_LIMIT = "rate_limit"
    PANIC = "panic"
    FROM_ZERO = "from_zero"
    TO_ZERO = "to_zero"
    UNKNOWN_HOLD = "unknown_hold"
    STALE_HOLD = "stale_hold"
    ERROR_HOLD = "error_hold"


@dataclass(frozen=True, slots=True)
class Estimates:
    """Intermediate results of one evaluation (None: not computed, an input was unknown)."""

    capacity_replicas: float | None = None
    target_replicas: float | None = None
    correction: float | None = None
    forecast_arrival_rate: float | None = None


@dataclass(frozen=True, slots=True)
class ScaleDecision:
    """One pool's desired replica count and why (not the orchestrator's routing decision)."""

    current: int
    desired: int
    cause: Cause
    reason: str
    signals: PoolSignals
    estimates: Estimates = Estimates()
    panic: bool = False

    @property
    def direction(self) -> Direction:
        if self.desired > self.current:
            return "up"
        return "down" if self.desired < self.current else "hold"


def _window(points: deque[tuple[float, int]], since: float) -> list[int]:
    return [n for t, n in points if t >= since]


def _prune(state: PoolState, now: float, keep_s: float) -> None:
    while state.recommendations and state.recommendations[0][0] < now - keep_s:
        state.recommendations.popleft()
    while state.changes and state.changes[0][0] < now - keep_s:
        state.changes.popleft()


def _capacity(
    cfg: PolicyConfig, sig: PoolSignals, state: PoolState, now: float, notes: list[str]
) -> tuple[float | None, float | None, float | None]:
    """(replicas, correction, forecast rate) from the capacity model; replicas None if unknown."""
    rate = sig.arrival_rate
    if rate is None:
        return None, None, None
    forecast = None
    if cfg.forecast:
        if state.holt is None:
            state.holt = Holt(rate, 0.0, now)
        else:
            state.holt.update(rate, now, cfg.forecast_alpha, cfg.forecast_beta)
        forecast = state.holt.forecast(cfg.forecast_horizon_s)
    planned = max(rate, forecast or 0.0)
    prompt, completion = cfg.cost.prompt_tokens, cfg.cost.completion_tokens
    if rate > 0 and sig.prompt_tokens_rate is not None and sig.completion_tokens_rate is not None:
        prompt = sig.prompt_tokens_rate / rate or prompt
        completion = sig.completion_tokens_rate / rate or completion
    cap = replica_capacity(cfg.cost, cfg.slo_ttft_s, cfg.slo_itl_s, prompt, completion)
    ratios = [
        obs / slo
        for obs, slo in ((sig.ttft_p90_s, cfg.slo_ttft_s), (sig.itl_p90_s, cfg.slo_itl_s))
        if obs is not None
    ]
    correction = _correction(cfg, state, ratios, now)
    replicas = planned / (cap.requests_per_s * cfg.cost.utilization) * correction
    notes.append(
        f"capacity {planned:.3g} req/s / ({cap.requests_per_s:.3g} req/s/replica x "
        f"{cfg.cost.utilization:g}) x correction {correction:.2f} = {replicas:.2f}"
        + ("" if cap.meets_slo else " (SLO infeasible even at batch 1)")
    )
    return replicas, correction, forecast


def _correction(cfg: PolicyConfig, state: PoolState, ratios: list[float], now: float) -> float:
    """The worst observed/SLO latency ratio now, clamped, or the correction the pool had,
    whichever is larger; the one it had decays toward `correction_min` with
    `correction_half_life_s` only while the latency is further under the SLO than `tolerance`
    (near it, the replicas the correction keeps are the ones it needs). The
    replicas a correction added bring the latency under the SLO: without memory the next
    evaluation's ratio is low, the pool scales back down after the down-window, the latency
    climbs over the SLO and the correction adds them again (a model 1.6x optimistic flapped
    13 <-> 7 replicas every 7 minutes at constant load)."""
    lo, hi = cfg.correction_min, cfg.correction_max
    worst = max(ratios) if ratios else 0.0
    observed = min(max(worst, lo), hi)
    kept = state.correction
    if kept is not None and cfg.correction_half_life_s > 0:
        age = max(0.0, now - state.correction_at)
        if worst >= 1 - cfg.tolerance:
            age = 0.0
        decayed = lo + (kept - lo) * 0.5 ** (age / cfg.correction_half_life_s)
        observed = max(observed, min(decayed, hi))
    state.correction, state.correction_at = observed, now
    return observed


def _target(cfg: PolicyConfig, sig: PoolSignals, current: int, notes: list[str]) -> float | None:
    """HPA target tracking: replicas = current x metric / target (average metrics: total / target),
    None when an input is unknown; `current` within tolerance of the result is kept."""
    if cfg.target_signal == "kv_utilization":
        if sig.kv_utilization is None or current == 0:
            return None
        ratio = sig.kv_utilization / cfg.target_value
        metric = f"KV use {sig.kv_utilization:.2f}"
    else:
        parts = (
            (sig.queue_depth, sig.in_flight)
            if cfg.target_signal == "requests_per_replica"
            else (sig.queue_depth, sig.engine_waiting)
        )
        if all(p is None for p in parts):
            return None
        # An unknown part counts 0 here: a lower bound, enough to scale up (`_required` keeps
        # it from scaling down).
        total = sum(p or 0.0 for p in parts)
        if current == 0:
            raw = total / cfg.target_value
            notes.append(f"target {total:g} / {cfg.target_value:g} = {raw:.2f}")
            return raw
        ratio = total / current / cfg.target_value
        metric = f"{cfg.target_signal} {total / current:.3g}"
    if abs(ratio - 1) <= cfg.tolerance:
        notes.append(f"target: {metric} within tolerance of {cfg.target_value:g}")
        return float(current)
    raw = current * ratio
    notes.append(f"target {metric} vs {cfg.target_value:g}: {current} x {ratio:.2f} = {raw:.2f}")
    return raw


# The capacity model's inputs from the gateways (request shape and latency correction), by name.
TRAFFIC_SIGNALS: tuple[tuple[str, Callable[[PoolSignals], float | None]], ...] = (
    ("prompt token rate", lambda s: s.prompt_tokens_rate),
    ("completion token rate", lambda s: s.completion_tokens_rate),
    ("TTFT p90", lambda s: s.ttft_p90_s),
    ("ITL p90", lambda s: s.itl_p90_s),
)


def _required(
    cfg: PolicyConfig, sig: PoolSignals, current: int, state: PoolState
) -> list[tuple[str, float | None]]:
    """Inputs that must be known before the count may go down: arrival rate, orchestrator
    queue, the target signal, and, while requests arrive, each of the capacity model's traffic
    inputs the pool has had known (without them it plans for the configured request shape and
    no latency correction: losing a loaded gateway's metrics would read as less load)."""
    out: list[tuple[str, float | None]] = [
        ("arrival rate", sig.arrival_rate),
        ("orchestrator queue", sig.queue_depth),
    ]
    for name, read in TRAFFIC_SIGNALS:
        value = read(sig)
        if value is not None:
            state.traffic_seen.add(name)
        elif name in state.traffic_seen and sig.arrival_rate:
            out.append((name, None))
    if current > 0:
        if cfg.target_signal == "kv_utilization":
            out.append(("KV use", sig.kv_utilization))
        elif cfg.target_signal == "queue_per_replica":
            out.append(("engine waiting", sig.engine_waiting))
        else:
            out.append(("engine requests", sig.in_flight))
    return out


def hold(cfg: PolicyConfig, state: PoolState, current: int) -> int:
    """The count a hold keeps: the last decided count (the observed one before any decision),
    within [min_replicas, max_replicas]: replicas that died are replaced, not written off, and
    a scale-down not done yet is not put back."""
    kept = state.decided(current)
    return min(max(kept, cfg.min_replicas), cfg.max_replicas)


def decide(
    cfg: PolicyConfig,
    state: PoolState,
    sig: PoolSignals,
    current: int,
    now: float,
    max_age_s: float,
) -> ScaleDecision:
    """One evaluation of one pool (see POLICY.md for every step)."""
    _prune(
        state,
        now,
        max(
            cfg.scale_down_window_s,
            cfg.scale_up_window_s,
            cfg.panic_window_s,
            cfg.scale_up_period_s,
            cfg.scale_down_period_s,
        ),
    )
    in_panic = state.panic_until is not None and now < state.panic_until
    decided = state.decided(current)
    # What runs or is decided (pods starting, or replacing ones that died).
    running = max(current, decided)

    def done(
        desired: int, cause: Cause, reason: str, est: Estimates = Estimates()
    ) -> ScaleDecision:
        # A change is a new decided count: while replicas start, the observed count lags the
        # decided one, and the same pending change is not counted again every evaluation.
        if desired != decided:
            state.changes.append((now, decided, desired))
            state.last_change_at = now
        state.desired = desired
        return ScaleDecision(current, desired, cause, reason, sig, est, in_panic)

    # What a hold keeps: the decided count, not an observed count that fell because replicas
    # died (they are replaced), within the bounds.
    held = hold(cfg, state, current)
    if sig.age_s(now) > max_age_s:
        state.idle_since = None
        return done(
            held,
            Cause.STALE_HOLD,
            f"signals {sig.age_s(now):.0f}s old (> {max_age_s:g}s): holding {held}",
        )

    notes: list[str] = []
    cap_replicas, correction, forecast = _capacity(cfg, sig, state, now, notes)
    tgt_replicas = _target(cfg, sig, current, notes)
    extra = Estimates(cap_replicas, tgt_replicas, correction, forecast)
    unknown = [name for name, value in _required(cfg, sig, current, state) if value is None]
    unknown.extend(sig.unread)
    partial = sig.reporting_replicas is not None and sig.reporting_replicas < current
    if partial:
        since = state.partial_since = now if state.partial_since is None else state.partial_since
        missing = current - (sig.reporting_replicas or 0)
        if now - since <= cfg.not_reporting_hold_s:
            unknown.append(f"{missing} replica(s) not reporting")
        else:  # stuck, not starting: they hold nothing any more
            partial = False
            notes.append(
                f"{missing} replica(s) not reporting for {now - since:.0f}s "
                f"> {cfg.not_reporting_hold_s:g}s: decided from those reporting"
            )
    else:
        state.partial_since = None

    # From zero: queued requests wait in the orchestrator for a replica (activator); no window.
    queued = sig.queue_depth or 0.0
    if current == 0 and queued > 0:
        state.idle_since = None
        want = max(1, cfg.min_replicas, math.ceil(max(cap_replicas or 0.0, tgt_replicas or 0.0)))
        # Only ever up while none runs yet: pods still pending are not re-decided each round
        # from a queue that moves (10, 3, 6, 2 would each be a change).
        want = min(max(want, decided), cfg.max_replicas)
        state.recommendations.append((now, want))
        return done(want, Cause.FROM_ZERO, f"{queued:g} request(s) queued at 0 replicas", extra)

    known = [v for v in (cap_replicas, tgt_replicas) if v is not None]
    if not known:
        state.idle_since = None
        return done(
            held,
            Cause.UNKNOWN_HOLD,
            f"unknown: {', '.join(unknown)}; holding {held}",
            extra,
        )
    rec = min(max(math.ceil(max(known) - 1e-9), cfg.min_replicas), cfg.max_replicas)
    reason = "; ".join(notes)

    # Scale to zero only after a full idle period with every input known to be zero.
    idle = (
        sig.arrival_rate == 0
        and sig.queue_depth == 0
        and (sig.in_flight == 0 or (sig.in_flight is None and current == 0))
        and not partial
        and not sig.unread
    )
    if idle:
        state.idle_since = now if state.idle_since is None else state.idle_since
    else:
        state.idle_since = None
    if rec == 0 and cfg.min_replicas == 0:
        idle_for = now - state.idle_since if state.idle_since is not None else 0.0
        if idle_for < cfg.scale_to_zero_idle_s or not idle:
            rec = 1 if running > 0 else 0
            reason += f"; idle {idle_for:.0f}s < {cfg.scale_to_zero_idle_s:g}s: keeping {rec}"
        elif running > 0:
            state.recommendations.append((now, 0))
            return done(0, Cause.TO_ZERO, f"idle for {idle_for:.0f}s: scale to zero", extra)
    state.recommendations.append((now, rec))

    # Panic (KPA): a burst far above the current count scales up on the short window at once,
    # and nothing scales down until it has been calm for panic_hold_s.
    # Against what runs or is decided (pods starting, or replacing ones that died, are no burst).
    if running > 0 and rec >= cfg.panic_threshold * running:
        state.panic_until = now + cfg.panic_hold_s
        in_panic = True
    elif in_panic is False:
        state.panic_until = None
    if in_panic and state.panic_until is not None:
        recent = _window(state.recommendations, now - cfg.panic_window_s) or [rec]
        want = max(max(recent), running, state.panic_floor)
        want = min(want, cfg.max_replicas)
        state.panic_floor = want
        return done(
            want,
            Cause.PANIC,
            f"panic for {state.panic_until - now:.0f}s more (recommended {rec} >= "
            f"{cfg.panic_threshold:g} x {current} at trigger); {reason}",
            extra,
        )
    state.panic_floor = 0

    # Stabilization (HPA): up to the min over the up-window, down to the max over the down-window,
    # from the decided count (the observed one lags it both ways while pods start or drain).
    lower = min(_window(state.recommendations, now - cfg.scale_up_window_s) or [rec])
    upper = max(_window(state.recommendations, now - cfg.scale_down_window_s) or [rec])
    if state.first is None:
        state.first = (now, current)
    if state.first[0] > now - cfg.scale_down_window_s:
        # The window began before this process knew the pool: the count it found then is the
        # least its max was (a restarted autoscaler does not scale down at once), within the
        # bounds (one lowered since is honoured at once).
        upper = max(upper, min(state.first[1], cfg.max_replicas))
    desired = min(max(decided, lower), upper)
    cause = Cause.SCALE_UP if desired > decided else Cause.STEADY
    if desired < decided:
        cause = Cause.SCALE_DOWN
    if desired != rec:
        reason += (
            f"; stabilized {rec} -> {desired} (up-window min {lower}, down-window max {upper})"
        )
        if desired == decided:
            cause = Cause.STABILIZING

    # Unknown inputs never lower the count.
    if desired < decided and unknown:
        return done(
            held,
            Cause.UNKNOWN_HOLD,
            f"unknown: {', '.join(unknown)}; not scaling down; {reason}",
            extra,
        )
    if desired < decided and state.last_change_at is not None:
        since = now - state.last_change_at
        if since < cfg.cooldown_s:
            return done(
                decided,
                Cause.COOLDOWN,
                f"cooldown: last change {since:.0f}s ago < {cfg.cooldown_s:g}s; {reason}",
                extra,
            )

    # Rate limits (HPA policies), relative to the count at the start of the period: the decided
    # count then, or the observed one where more are still running (a scale-down not yet done).
    if desired > decided:
        added = sum(
            b - a for t, a, b in state.changes if t >= now - cfg.scale_up_period_s and b > a
        )
        base = max(0, running - added)
        limit = max(
            math.ceil(base * (1 + cfg.scale_up_max_percent / 100)), base + cfg.scale_up_max_pods
        )
        if desired > limit:
            reason += f"; rate limit: at most {limit} in {cfg.scale_up_period_s:g}s"
            desired, cause = max(decided, limit), Cause.RATE_LIMIT
    elif desired < decided:
        removed = sum(
            a - b for t, a, b in state.changes if t >= now - cfg.scale_down_period_s and a > b
        )
        base = decided + removed
        limit = math.floor(base * (1 - cfg.scale_down_max_percent / 100))
        if desired < limit:
            reason += f"; rate limit: at least {limit} in {cfg.scale_down_period_s:g}s"
            desired, cause = min(decided, limit), Cause.RATE_LIMIT
    if desired > decided and unknown:
        reason += f"; unknown: {', '.join(unknown)}"
    return done(desired, cause, reason, extra)
