"""Workload sources: each turns a description or a trace into a list of `Request`s.

A `Request` carries its arrival time (seconds from the start of the run, before any replay time
scale), the prompt as token ids (token ids, not text, so prefix sharing is exact), the completion
length and free-form metadata. Token ids are synthesised deterministically:

- `block_tokens(namespace, key, n)`: `n` ids in [VOCAB_MIN, VOCAB_MAX) drawn from a PCG64 stream
  seeded with `(namespace, key)`. Equal `(namespace, key)` give identical blocks; different keys
  give independent draws (a collision of two 512-token blocks has probability ~ 49052^-512).
- Mooncake: hash id `h` (one per 512-token block) maps to `block_tokens(NS_MOONCAKE, h, 512)`;
  a prompt is the concatenation of its blocks cut to `input_length`, so two requests share
  exactly the leading blocks whose hash ids they share.
- Shared prefix (as llm-d's benchmark): G groups, each with a system prompt of S tokens; every
  request is its group's system prompt followed by a question of Q tokens of its own.
- Azure LLM inference trace (2023, conversation): no content, only lengths, so every prompt is
  unique (no sharing).
- Synthetic shapes for the routing matrix (`MATRIX`): unique prompts (no reuse), one hot prefix
  among unique prompts, bursty arrivals (on/off modulated Poisson), and multi-turn sessions whose
  turn k+1 prompt is turn k's prompt + the answer the emulator generates for it + a new user
  message (so an engine that keeps generated tokens' blocks can reuse them too).

Transforms (`time_window`, `scale_time`, `warp_load`) return new lists and never touch prompts.
"""

from __future__ import annotations

import csv
import gzip
import json
import math
import random
from array import array
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import xxhash

# SmolLM2 vocabulary without its special tokens (the emulator generates from the same range).
VOCAB_MIN = 100
VOCAB_MAX = 49152
MOONCAKE_BLOCK_TOKENS = 512

# Namespaces keep the sources' token streams apart.
NS_MOONCAKE = 1
NS_SHARED_PREFIX = 2
NS_AZURE = 3
NS_MIXED = 4
NS_UNIQUE = 5
NS_HOT = 6
NS_SESSION = 7

ROOT = Path(__file__).resolve().parents[1]
TRACES = ROOT.parent / "shared" / "traces"
MOONCAKE_TRACE = TRACES / "mooncake_synthetic_trace.jsonl.gz"
AZURE_TRACE = TRACES / "azure_llm_2023_conv.csv"

Meta = dict[str, str | int | float]


@dataclass(frozen=True, slots=True)
class Request:
    arrival_s: float
    prompt_token_ids: Sequence[int] = field(repr=False)
    max_tokens: int
    meta: Meta = field(default_factory=dict)

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)


# ------------------------------------------------------------------------------ token synthesis
@lru_cache(maxsize=65536)
def _block(namespace: int, key: int, n: int) -> bytes:
    rng = np.random.Generator(np.random.PCG64([namespace, key]))
    return rng.integers(VOCAB_MIN, VOCAB_MAX, size=n, dtype=np.uint32).astype("<u4").tobytes()


def block_tokens(namespace: int, key: int, n: int) -> array[int]:
    """`n` deterministic token ids for `(namespace, key)` (see the module docstring)."""
    if namespace < 0 or key < 0 or n < 0:
        raise ValueError("namespace, key and n must be non-negative")
    out = array("I")
    out.frombytes(_block(namespace, key, n))
    return out


def mooncake_prompt(hash_ids: Sequence[int], input_length: int) -> array[int]:
    """Blocks of `hash_ids` (512 tokens each) concatenated and cut to `input_length` tokens."""
    need = math.ceil(input_length / MOONCAKE_BLOCK_TOKENS)
    if need > len(hash_ids):
        raise ValueError(
            f"input_length {input_length} needs {need} blocks of {MOONCAKE_BLOCK_TOKENS} tokens, "
            f"the request has {len(hash_ids)} hash ids"
        )
    out = array("I")
    for h in hash_ids[:need]:
        out.extend(block_tokens(NS_MOONCAKE, h, MOONCAKE_BLOCK_TOKENS))
    del out[input_length:]
    return out


def unique_tokens(namespace: int, index: int, n: int) -> array[int]:
    """Tokens no other (namespace, index) shares, for prompts without reuse."""
    return block_tokens(NS_UNIQUE, namespace * 1_000_003 + index, n)


def _unit(seed: int, key: int) -> float:
    """Deterministic number in [0, 1) for sampling decisions."""
    return xxhash.xxh3_64_intdigest(f"{seed}:{key}".encode()) / 2.0**64


# ------------------------------------------------------------------------------ Mooncake
@dataclass(frozen=True, slots=True)
class MooncakeOptions:
    max_input_tokens: int | None = None  # longer prompts are truncated (or dropped, see below)
    drop_long: bool = False  # drop prompts above max_input_tokens instead of truncating them
    max_output_tokens: int | None = None  # completions are capped at this length
    sample_fraction: float = 1.0  # keep this share of the trace's time windows
    sample_window_s: float = 10.0  # trace seconds per sampling window
    sample_seed: int = 0
    start_s: float = 0.0  # trace-time window [start_s, start_s + duration_s)
    duration_s: float | None = None
    limit: int | None = None  # at most this many requests (after every other filter)


def read_mooncake(path: Path) -> Iterator[dict[str, Any]]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def mooncake(path: Path = MOONCAKE_TRACE, options: MooncakeOptions | None = None) -> list[Request]:
    """Mooncake trace: `timestamp` (ms), `input_length`, `output_length`, `hash_ids`.

    Sampling is by time window: the trace is cut into windows of `sample_window_s` seconds, a
    deterministic `sample_fraction` of them is kept and the kept windows are replayed back to
    back (the gaps of dropped windows removed). Inside a window every request is kept, so the
    trace's local arrival rate and its reuse between nearby requests (a shared system prompt, a
    conversation's turns) are intact whatever the prefixes look like; reuse between requests in
    windows far apart is what a sample loses. Truncation keeps a prompt's leading blocks, so
    sharing within the cap is intact. `meta["window"]` is the trace window a request came from.
    """
    o = options or MooncakeOptions()
    if not 0 < o.sample_fraction <= 1:
        raise ValueError("sample_fraction must be in (0, 1]")
    if o.sample_window_s <= 0:
        raise ValueError("sample_window_s must be positive")
    out: list[Request] = []
    t0: float | None = None
    counted = 0  # windows below this one are counted in `dropped`
    dropped = 0  # dropped windows between the first kept request's window and `counted`
    for row in read_mooncake(path):
        ts = float(row["timestamp"]) / 1000.0
        if ts < o.start_s or (o.duration_s is not None and ts >= o.start_s + o.duration_s):
            continue
        hash_ids = [int(h) for h in row["hash_ids"]]
        window = int((ts - o.start_s) // o.sample_window_s)
        if not _kept_window(o, window):
            continue
        input_length = int(row["input_length"])
        output_length = int(row["output_length"])
        truncated = 0
        if o.max_input_tokens is not None and input_length > o.max_input_tokens:
            if o.drop_long:
                continue
            truncated = input_length
            input_length = o.max_input_tokens
        max_tokens = output_length
        if o.max_output_tokens is not None:
            max_tokens = min(max_tokens, o.max_output_tokens)
        if t0 is None:
            t0, counted = ts, window
        for w in range(counted, window):
            dropped += not _kept_window(o, w)
        counted = max(counted, window)
        meta: Meta = {"window": window, "trace_output_length": output_length}
        if truncated:
            meta["trace_input_length"] = truncated
        out.append(
            Request(
                ts - t0 - dropped * o.sample_window_s,
                mooncake_prompt(hash_ids, input_length),
                max(1, max_tokens),
                meta,
            )
        )
        if o.limit is not None and len(out) >= o.limit:
            break
    return out


def _kept_window(o: MooncakeOptions, window: int) -> bool:
    return o.sample_fraction >= 1 or _unit(o.sample_seed, window) < o.sample_fraction


# ------------------------------------------------------------------------------ shared prefix
def poisson_arrivals(n: int, rate: float, rng: random.Random) -> list[float]:
    """`n` arrival times of a Poisson process of `rate` per second, the first at 0."""
    if rate <= 0:
        raise ValueError("rate must be positive")
    t, out = 0.0, []
    for i in range(n):
        if i:
            t += rng.expovariate(rate)
        out.append(t)
    return out


def shared_prefix(
    *,
    groups: int,
    prompts_per_group: int,
    system_tokens: int,
    question_tokens: int,
    output_tokens: int,
    rate: float,
    seed: int = 0,
) -> list[Request]:
    """G groups x prompts_per_group requests, shuffled, Poisson arrivals at `rate` per second.

    Prompt = the group's system prompt (S tokens, shared by the group) + a question (Q tokens of
    its own)."""
    if groups <= 0 or prompts_per_group <= 0 or system_tokens < 0 or question_tokens <= 0:
        raise ValueError("groups, prompts_per_group and question_tokens must be positive")
    rng = random.Random(seed)
    order = [(g, k) for g in range(groups) for k in range(prompts_per_group)]
    rng.shuffle(order)
    times = poisson_arrivals(len(order), rate, rng)
    out: list[Request] = []
    for i, ((g, k), t) in enumerate(zip(order, times, strict=True)):
        prompt = block_tokens(NS_SHARED_PREFIX, g, system_tokens)
        prompt.extend(unique_tokens(NS_SHARED_PREFIX, i, question_tokens))
        out.append(Request(t, prompt, output_tokens, {"group": g, "index_in_group": k}))
    return out


# ------------------------------------------------------------------------------ mixed long/short
@dataclass(frozen=True, slots=True)
class LengthClass:
    """Prompt and completion lengths drawn uniformly from inclusive ranges."""

    name: str
    prompt_tokens: tuple[int, int]
    output_tokens: tuple[int, int]

    def draw(self, rng: random.Random) -> tuple[int, int]:
        return rng.randint(*self.prompt_tokens), rng.randint(*self.output_tokens)


def mixed_lengths(
    *,
    requests: int,
    long_fraction: float,
    short: LengthClass,
    long: LengthClass,
    rate: float,
    seed: int = 0,
) -> list[Request]:
    """Unique prompts (no sharing); each request is of the long class with probability
    `long_fraction`, otherwise short; Poisson arrivals. `meta["class"]` names the class."""
    if not 0 <= long_fraction <= 1:
        raise ValueError("long_fraction must be in [0, 1]")
    rng = random.Random(seed)
    times = poisson_arrivals(requests, rate, rng)
    out: list[Request] = []
    for i, t in enumerate(times):
        cls = long if rng.random() < long_fraction else short
        n, m = cls.draw(rng)
        out.append(Request(t, unique_tokens(NS_MIXED, i, n), m, {"class": cls.name}))
    return out


# ------------------------------------------------------------------------------ no reuse, hot spot
def unique_prompts(
    *,
    requests: int,
    prompt_tokens: tuple[int, int],
    output_tokens: tuple[int, int],
    rate: float,
    seed: int = 0,
) -> list[Request]:
    """Uniform unique prompts (no two share a block); lengths uniform in the inclusive ranges."""
    rng = random.Random(seed)
    times = poisson_arrivals(requests, rate, rng)
    out: list[Request] = []
    for i, t in enumerate(times):
        n, m = rng.randint(*prompt_tokens), rng.randint(*output_tokens)
        out.append(Request(t, unique_tokens(NS_UNIQUE, seed * 1_000_003 + i, n), m, {}))
    return out


def hot_prefix(
    *,
    requests: int,
    hot_fraction: float,
    system_tokens: int,
    question_tokens: tuple[int, int],
    cold_prompt_tokens: tuple[int, int],
    output_tokens: tuple[int, int],
    rate: float,
    seed: int = 0,
) -> list[Request]:
    """One hot prefix: a share `hot_fraction` of requests is one system prompt (S tokens) + a
    question of their own; the rest are unique prompts. `meta["hot"]` is 1 for the hot ones."""
    if not 0 <= hot_fraction <= 1:
        raise ValueError("hot_fraction must be in [0, 1]")
    rng = random.Random(seed)
    times = poisson_arrivals(requests, rate, rng)
    out: list[Request] = []
    for i, t in enumerate(times):
        m = rng.randint(*output_tokens)
        if rng.random() < hot_fraction:
            prompt = block_tokens(NS_HOT, seed, system_tokens)
            prompt.extend(unique_tokens(NS_HOT, i, rng.randint(*question_tokens)))
            out.append(Request(t, prompt, m, {"hot": 1}))
        else:
            n = rng.randint(*cold_prompt_tokens)
            out.append(Request(t, unique_tokens(NS_HOT, 1_000_000 + i, n), m, {"hot": 0}))
    return out


# ------------------------------------------------------------------------------ arrivals
def bursty_arrivals(
    n: int, rate: float, rng: random.Random, *, burst: float = 4.0, period_s: float = 10.0
) -> list[float]:
    """`n` arrivals of an on/off modulated Poisson process whose mean rate is `rate`: in each
    period the first fifth runs at `burst` times the rate of the rest, so bursts hold
    burst / (burst + 4) of the arrivals. The first arrival is at 0."""
    if rate <= 0 or burst < 1 or period_s <= 0:
        raise ValueError("rate and period_s must be positive, burst >= 1")
    on = period_s / 5
    base = rate * period_s / (on * burst + (period_s - on))  # rate off-burst
    t, out = 0.0, []
    for i in range(n):
        if i:
            # Thinning-free: draw in the current phase, carry the leftover into the next.
            need = rng.expovariate(1.0)
            while True:
                phase = t % period_s
                r = base * (burst if phase < on else 1.0)
                left = (on - phase) if phase < on else (period_s - phase)
                if need <= r * left:
                    t += need / r
                    break
                need -= r * left
                t += left
        out.append(t)
    return out


def with_arrivals(requests: Sequence[Request], times: Sequence[float]) -> list[Request]:
    """The requests, in order, at new arrival times (same count)."""
    if len(times) != len(requests):
        raise ValueError(f"{len(times)} arrival times for {len(requests)} requests")
    return [replace(r, arrival_s=t) for r, t in zip(requests, times, strict=True)]


# ------------------------------------------------------------------------------ multi-turn
def multi_turn(
    *,
    sessions: int,
    turns: tuple[int, int],
    system_tokens: int,
    user_tokens: tuple[int, int],
    output_tokens: tuple[int, int],
    think_s: float,
    rate: float,
    seed: int = 0,
    max_prompt_tokens: int | None = None,
) -> list[Request]:
    """Conversations: sessions start as a Poisson process of `rate` per second; turn k+1
    arrives an exponential think time (mean `think_s`) after turn k's arrival (open loop: it does
    not wait for the answer). Turn 1's prompt is a system prompt (shared by every session) + a
    user message; turn k+1's prompt is turn k's prompt + the answer the emulator generates for
    it (`expected_output_ids`, seed 0) + a new user message, so it contains the previous turn
    whole. A session ends after its drawn number of turns or before a prompt would exceed
    `max_prompt_tokens`. `meta`: session, turn. Sorted by arrival."""
    from llmmesh.emulator.tokens import expected_output_ids

    if sessions <= 0 or think_s <= 0:
        raise ValueError("sessions and think_s must be positive")
    vocab = _Vocab()
    rng = random.Random(seed)
    starts = poisson_arrivals(sessions, rate, rng)
    out: list[Request] = []
    for s_idx, start in enumerate(starts):
        prompt = block_tokens(NS_SESSION, 0, system_tokens)
        t = start
        for k in range(rng.randint(*turns)):
            user = unique_tokens(NS_SESSION, s_idx * 1000 + k, rng.randint(*user_tokens))
            if max_prompt_tokens is not None and len(prompt) + len(user) > max_prompt_tokens:
                break
            prompt.extend(user)
            m = rng.randint(*output_tokens)
            out.append(Request(t, array("I", prompt), m, {"session": s_idx, "turn": k}))
            prompt.extend(expected_output_ids(0, prompt, m, vocab))
            t += rng.expovariate(1.0 / think_s)
    out.sort(key=lambda r: r.arrival_s)
    return out


@dataclass(frozen=True, slots=True)
class _Vocab:
    vocab_min: int = VOCAB_MIN
    vocab_max: int = VOCAB_MAX


def sample_sessions(requests: Sequence[Request], fraction: float, seed: int = 0) -> list[Request]:
    """Keep a deterministic `fraction` of sessions (`meta["session"]`), each whole; requests
    without a session are kept. Arrival times are unchanged."""
    if not 0 < fraction <= 1:
        raise ValueError("fraction must be in (0, 1]")
    return [
        r
        for r in requests
        if "session" not in r.meta or _unit(seed, int(r.meta["session"])) < fraction
    ]


# ------------------------------------------------------------------------------ Azure
@dataclass(frozen=True, slots=True)
class AzureOptions:
    max_input_tokens: int | None = None  # longer prompts are truncated
    max_output_tokens: int | None = None
    start_s: float = 0.0
    duration_s: float | None = None
    limit: int | None = None


def _parse_azure_time(text: str) -> float:
    # "2023-11-16 18:15:46.6805900": seven fractional digits, more than fromisoformat takes.
    head, _, frac = text.strip().partition(".")
    base = datetime.fromisoformat(head).replace(tzinfo=UTC).timestamp()
    return base + (float("0." + frac) if frac else 0.0)


def azure(path: Path = AZURE_TRACE, options: AzureOptions | None = None) -> list[Request]:
    """Azure LLM inference trace: TIMESTAMP, ContextTokens, GeneratedTokens (unique prompts)."""
    o = options or AzureOptions()
    out: list[Request] = []
    t0: float | None = None
    with path.open(newline="") as f:
        for i, row in enumerate(csv.DictReader(f)):
            ts = _parse_azure_time(row["TIMESTAMP"])
            if t0 is None:
                t0 = ts
            rel = ts - t0
            if rel < o.start_s or (o.duration_s is not None and rel >= o.start_s + o.duration_s):
                continue
            n = max(1, int(row["ContextTokens"]))
            m = max(1, int(row["GeneratedTokens"]))
            meta: Meta = {"trace_input_length": n, "trace_output_length": m}
            if o.max_input_tokens is not None:
                n = min(n, o.max_input_tokens)
            if o.max_output_tokens is not None:
                m = min(m, o.max_output_tokens)
            out.append(Request(rel, unique_tokens(NS_AZURE, i, n), m, meta))
            if o.limit is not None and len(out) >= o.limit:
                break
    if out:
        first = out[0].arrival_s
        out = [replace(r, arrival_s=r.arrival_s - first) for r in out]
    return out


def sample_windows(
    requests: Sequence[Request], fraction: float, window_s: float, seed: int = 0
) -> list[Request]:
    """Keep a deterministic `fraction` of the time windows of `window_s` seconds, whole, and
    replay the kept windows back to back (dropped windows' time removed); as `mooncake`'s
    sampler. Input sorted by arrival."""
    if not 0 < fraction <= 1 or window_s <= 0:
        raise ValueError("fraction must be in (0, 1] and window_s positive")
    if fraction >= 1 or not requests:
        return list(requests)
    t_start = requests[0].arrival_s
    out: list[Request] = []
    dropped, counted, first = 0, 0, True
    for r in requests:
        w = int((r.arrival_s - t_start) // window_s)
        if _unit(seed, w) >= fraction:
            continue
        if first:
            first, counted, t0 = False, w, r.arrival_s
        for x in range(counted, w):
            dropped += _unit(seed, x) >= fraction
        counted = max(counted, w)
        out.append(replace(r, arrival_s=r.arrival_s - t0 - dropped * window_s))
    return out


def stretch_like(
    requests: Sequence[Request],
    fraction: float,
    measure: Callable[[Sequence[Request]], float],
    rank: int = 0,
) -> list[Request]:
    """A contiguous stretch of `fraction` of the requests (arrival times from its first) whose
    `measure` is the `rank`-th nearest (0: nearest) to the whole list's, among stretches starting
    every half stretch. For a trace whose reuse spans its whole length, as Mooncake's: any sample
    of a few hundred requests keeps only the reuse inside it, and a sample of time windows keeps
    whatever its windows happen to hold (15% of Mooncake's 10-s windows: an infinite-cache hit
    rate of 0.25 against the trace's 0.62); this one keeps a stretch that reuses as the trace
    does. Input sorted by arrival."""
    if not 0 < fraction <= 1:
        raise ValueError("fraction must be in (0, 1]")
    if rank < 0:
        raise ValueError("rank must be non-negative")
    n = max(1, round(len(requests) * fraction))
    if n >= len(requests):
        return list(requests)
    target = measure(requests)
    step = max(1, n // 2)
    starts = list(range(0, len(requests) - n + 1, step))
    ranked = sorted(starts, key=lambda s: (abs(measure(requests[s : s + n]) - target), s))
    start = ranked[rank % len(ranked)]
    t0 = requests[start].arrival_s
    return [replace(r, arrival_s=r.arrival_s - t0) for r in requests[start : start + n]]


# ------------------------------------------------------------------------------ transforms
def scale_time(requests: Iterable[Request], factor: float) -> list[Request]:
    """Arrival times multiplied by `factor` (0.1 = replay ten times faster)."""
    if factor <= 0:
        raise ValueError("time scale factor must be positive")
    return [replace(r, arrival_s=r.arrival_s * factor) for r in requests]


LoadMultiplier = Callable[[float], float]


def warp_load(
    requests: Sequence[Request], multiplier: LoadMultiplier, *, step_s: float = 0.01
) -> list[Request]:
    """Time-warp arrivals so the arrival rate at replay time tau is `multiplier(tau)` times the
    rate the list had at the corresponding original time.

    Original time t and replay time tau are related by t = integral_0^tau m(u) du (m > 0), so a
    stretch where m = 2 holds twice as many arrivals per second. The request mix is unchanged.
    `step_s` is the integration step in replay seconds."""
    if not requests:
        return []
    out: list[Request] = []
    tau, covered = 0.0, 0.0  # covered = original time reached at replay time tau
    for r in sorted(requests, key=lambda x: x.arrival_s):
        while covered < r.arrival_s:
            m = multiplier(tau + step_s / 2)
            if m <= 0:
                raise ValueError(f"load multiplier must be positive, got {m} at {tau:.3f}s")
            advance = m * step_s
            if covered + advance >= r.arrival_s:
                tau += (r.arrival_s - covered) / m
                covered = r.arrival_s
                break
            covered += advance
            tau += step_s
        out.append(replace(r, arrival_s=tau))
    return out


def day_shape(period_s: float, trough: float, peak: float) -> LoadMultiplier:
    """A day-shaped multiplier: `trough` at tau = 0 (night), `peak` at period/2, raised cosine."""
    if period_s <= 0 or trough <= 0 or peak <= 0:
        raise ValueError("period, trough and peak must be positive")

    def m(tau: float) -> float:
        return trough + (peak - trough) * (1 - math.cos(2 * math.pi * tau / period_s)) / 2

    return m


def describe(requests: Sequence[Request]) -> dict[str, float]:
    """Counts and means for printing and for the results JSON."""
    if not requests:
        return {"requests": 0}
    span = requests[-1].arrival_s - requests[0].arrival_s
    prompt = sum(r.prompt_tokens for r in requests)
    output = sum(r.max_tokens for r in requests)
    return {
        "requests": len(requests),
        "span_s": span,
        "rate_per_s": (len(requests) - 1) / span if span > 0 else 0.0,
        "mean_prompt_tokens": prompt / len(requests),
        "mean_output_tokens": output / len(requests),
        "max_prompt_tokens": max(r.prompt_tokens for r in requests),
        "offered_output_tokens_per_s": output / span if span > 0 else 0.0,
    }


# ------------------------------------------------------------------------------ the matrix
@dataclass(frozen=True, slots=True)
class WorkloadSpec:
    """One workload of the routing matrix. `build(sample, seed)` returns its requests with
    natural arrival times (benchmarks rescale them to a load); `sample` in (0, 1] keeps that
    share: traces by time window, sessions by session, synthetic shapes by request count."""

    name: str
    description: str
    prefix_heavy: bool  # the prefix-heavy targets apply
    build: Callable[[float, int], list[Request]]
    # Samples (live runs, rate bisections) are a stretch reusing as the whole does
    # (`stretch_like`), not `build`'s sample.
    stretch_sample: bool = False


TRACE_MAX_INPUT_TOKENS = 7936
TRACE_MAX_OUTPUT_TOKENS = 128


def _n(base: int, sample: float) -> int:
    if not 0 < sample <= 1:
        raise ValueError("sample must be in (0, 1]")
    return max(8, round(base * sample))


def _mooncake(sample: float, seed: int) -> list[Request]:
    return mooncake(
        MOONCAKE_TRACE,
        MooncakeOptions(
            max_input_tokens=TRACE_MAX_INPUT_TOKENS,
            max_output_tokens=TRACE_MAX_OUTPUT_TOKENS,
            sample_fraction=sample,
            sample_seed=seed,
        ),
    )


def _azure(sample: float, seed: int) -> list[Request]:
    # The first hour of the trace (19k requests); windows of 30 s.
    reqs = azure(
        AZURE_TRACE,
        AzureOptions(
            max_input_tokens=TRACE_MAX_INPUT_TOKENS, max_output_tokens=TRACE_MAX_OUTPUT_TOKENS
        ),
    )
    return sample_windows(reqs, sample, 30.0, seed)


def _shared(groups: int, per_group: int) -> Callable[[float, int], list[Request]]:
    def build(sample: float, seed: int) -> list[Request]:
        return shared_prefix(
            groups=groups,
            prompts_per_group=max(2, round(per_group * sample)),
            system_tokens=2048,
            question_tokens=128,
            output_tokens=64,
            rate=1.0,
            seed=seed,
        )

    return build


def _no_reuse(sample: float, seed: int) -> list[Request]:
    return unique_prompts(
        requests=_n(600, sample),
        prompt_tokens=(128, 3072),
        output_tokens=(16, 128),
        rate=1.0,
        seed=seed,
    )


def _hot_spot(sample: float, seed: int) -> list[Request]:
    return hot_prefix(
        requests=_n(600, sample),
        hot_fraction=0.6,
        system_tokens=3072,
        question_tokens=(64, 256),
        cold_prompt_tokens=(256, 2048),
        output_tokens=(16, 128),
        rate=1.0,
        seed=seed,
    )


def _bursty(sample: float, seed: int) -> list[Request]:
    reqs = unique_prompts(
        requests=_n(600, sample),
        prompt_tokens=(128, 3072),
        output_tokens=(16, 128),
        rate=1.0,
        seed=seed + 7,
    )
    return with_arrivals(
        reqs, bursty_arrivals(len(reqs), 1.0, random.Random(seed), burst=6.0, period_s=60.0)
    )


def _long_short(sample: float, seed: int) -> list[Request]:
    return mixed_lengths(
        requests=_n(600, sample),
        long_fraction=0.3,
        short=LengthClass("short", (32, 256), (16, 64)),
        long=LengthClass("long", (6144, 7936), (32, 128)),
        rate=1.0,
        seed=seed,
    )


def _multi_turn(sample: float, seed: int) -> list[Request]:
    reqs = multi_turn(
        sessions=120,
        turns=(2, 8),
        system_tokens=512,
        user_tokens=(64, 384),
        output_tokens=(32, 160),
        think_s=20.0,
        rate=0.5,
        seed=seed,
        max_prompt_tokens=TRACE_MAX_INPUT_TOKENS,
    )
    return sample_sessions(reqs, sample, seed)


MATRIX: dict[str, WorkloadSpec] = {
    w.name: w
    for w in (
        WorkloadSpec(
            "mooncake",
            "Mooncake trace, prompts <= 7936, outputs <= 128",
            True,
            _mooncake,
            stretch_sample=True,
        ),
        WorkloadSpec("azure", "Azure 2023 conversation trace (unique prompts)", False, _azure),
        WorkloadSpec(
            "shared-prefix-few", "4 groups x 2048-token system prompt", True, _shared(4, 120)
        ),
        WorkloadSpec(
            "shared-prefix-many", "64 groups x 2048-token system prompt", True, _shared(64, 8)
        ),
        WorkloadSpec("no-reuse", "unique prompts 128-3072 tokens", False, _no_reuse),
        WorkloadSpec("hot-spot", "60% share one 3072-token prefix", False, _hot_spot),
        WorkloadSpec("bursty", "unique prompts, 6x bursts 1/5 of each minute", False, _bursty),
        WorkloadSpec("long-short", "30% 6-8k-token prompts among 32-256", False, _long_short),
        WorkloadSpec("multi-turn", "120 sessions of 2-8 turns", False, _multi_turn),
    )
}
