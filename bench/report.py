"""Statistics over replay results, the infinite-cache oracle, tables and JSON output.

Definitions (used in every table and JSON file):
- TTFT: from the request's scheduled arrival to its first token at the client (includes any lag of
  the load generator, so a late send is never hidden).
- ITL: (last token time - first token time) / (tokens - 1) per request, then averaged.
- Throughput: output tokens of successful requests / (last completion - first scheduled arrival).
- Hit rate (engine-observed): sum of `usage.cached_prompt_tokens` / sum of prompt tokens, over
  successful requests.
- Oracle hit rate (infinite cache): replay the prompts in arrival order through a cache that never
  evicts and sees every earlier prompt regardless of timing or replica; a request reuses its
  leading full blocks (LLMMESH_KV_BLOCK_SIZE tokens, chained hashes as the engine computes them)
  that any earlier prompt had, at most (prompt_len - 1) // block_size of them as the engine
  allows; oracle = reused tokens / prompt tokens. No router or cache size can beat it.
- Capacity-limited bound: the same replay through R per-replica LRU caches of the cluster's real
  KV capacity (blocks per replica), each request placed on the replica holding its longest cached
  prefix (perfect placement, load ignored; ties to the replica used least recently, so prompts
  that match nowhere spread), its blocks then inserted there as most recently used.
  The best hit rate reachable with that much KV memory (up to the greedy placement and blocks of
  running sequences, which it does not pin); a hit-rate target is stated against it.
"""

from __future__ import annotations

import json
import math
import sys
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

from bench.replay import Result
from bench.workloads import Request
from llmmesh.common.settings import KvBlockSettings
from llmmesh.kvblocks import BlockConfig, block_hashes

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "bench-results"


def block_size_from_env() -> int:
    """The KV block size the engines of a mesh started from this process use."""
    return KvBlockSettings().block_size


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default), `q` in [0, 100]; NaN when empty."""
    if not 0 <= q <= 100:
        raise ValueError("q must be in [0, 100]")
    if not values:
        return math.nan
    s = sorted(values)
    pos = (len(s) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    if pos == lo or s[hi] == s[lo]:
        return s[lo]  # also where both are infinite (inf - inf, or inf x 0, is NaN)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def oracle_reuse(prompts: Iterable[Sequence[int]], block_size: int) -> list[int]:
    """Reusable prompt tokens per prompt under the infinite cache (see module docstring)."""
    seen: set[int] = set()
    config = BlockConfig(block_size)
    out: list[int] = []
    for prompt in prompts:
        hashes = block_hashes(prompt, config)
        limit = max(0, (len(prompt) - 1) // block_size)
        n = 0
        for h in hashes[:limit]:
            if h not in seen:
                break
            n += 1
        seen.update(hashes)
        out.append(n * block_size)
    return out


def oracle_hit_rate(requests: Sequence[Request], block_size: int) -> float:
    ordered = sorted(requests, key=lambda r: r.arrival_s)
    reuse = oracle_reuse((r.prompt_token_ids for r in ordered), block_size)
    total = sum(r.prompt_tokens for r in ordered)
    return sum(reuse) / total if total else math.nan


def capacity_limited_hit_rate(
    requests: Sequence[Request], block_size: int, replicas: int, blocks_per_replica: int
) -> float:
    """Hit rate of per-replica LRU caches with perfect placement (see the module docstring)."""
    from collections import OrderedDict

    if replicas <= 0 or blocks_per_replica <= 0:
        raise ValueError("replicas and blocks_per_replica must be positive")
    config = BlockConfig(block_size)
    caches: list[OrderedDict[int, None]] = [OrderedDict() for _ in range(replicas)]
    last_used = [-1] * replicas
    reused = total = 0
    for k, r in enumerate(sorted(requests, key=lambda x: x.arrival_s)):
        hashes = block_hashes(r.prompt_token_ids, config)
        limit = max(0, (r.prompt_tokens - 1) // block_size)
        best, best_n = 0, -1
        for i, cache in enumerate(caches):
            n = 0
            for h in hashes[:limit]:
                if h not in cache:
                    break
                n += 1
            if n > best_n or (n == best_n and last_used[i] < last_used[best]):
                best, best_n = i, n
        last_used[best] = k
        cache = caches[best]
        for h in hashes:
            if h in cache:
                cache.move_to_end(h)
            else:
                cache[h] = None
                if len(cache) > blocks_per_replica:
                    cache.popitem(last=False)
        reused += best_n * block_size
        total += r.prompt_tokens
    return reused / total if total else math.nan


@dataclass
class Dist:
    mean: float
    p50: float
    p90: float
    p99: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Dist:
        return cls(
            mean(values),
            percentile(values, 50),
            percentile(values, 90),
            percentile(values, 99),
        )


@dataclass
class Summary:
    arm: str
    requests: int
    ok: int
    errors: dict[str, int]
    ttft_s: Dist
    itl_s: Dist
    e2e_s: Dist
    output_tokens: int
    prompt_tokens: int
    cached_prompt_tokens: int
    duration_s: float
    throughput_tok_s: float
    hit_rate: float
    oracle_hit_rate: float
    max_send_lag_s: float
    replicas: dict[str, int]
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def hit_vs_oracle(self) -> float:
        if not self.oracle_hit_rate or math.isnan(self.oracle_hit_rate):
            return math.nan
        return self.hit_rate / self.oracle_hit_rate


def summarize(
    arm: str,
    results: Sequence[Result],
    *,
    oracle: float = math.nan,
    extra: Mapping[str, float] | None = None,
) -> Summary:
    ok = [r for r in results if r.ok]
    errors = Counter(r.outcome for r in results if not r.ok)
    ttfts = [r.ttft_s for r in ok if r.ttft_s is not None]
    itls = [r.itl_mean_s for r in ok if r.itl_mean_s is not None]
    e2e = [r.e2e_s for r in ok if r.e2e_s is not None]
    out_tokens = sum(r.output_tokens for r in ok)
    prompt_tokens = sum(r.prompt_tokens for r in ok)
    cached = sum(r.cached_prompt_tokens for r in ok)
    start = min((r.scheduled_s for r in results), default=0.0)
    end = max((r.scheduled_s + r.e2e_s for r in ok if r.e2e_s is not None), default=start)
    duration = end - start
    return Summary(
        arm=arm,
        requests=len(results),
        ok=len(ok),
        errors=dict(errors),
        ttft_s=Dist.of(ttfts),
        itl_s=Dist.of(itls),
        e2e_s=Dist.of(e2e),
        output_tokens=out_tokens,
        prompt_tokens=prompt_tokens,
        cached_prompt_tokens=cached,
        duration_s=duration,
        throughput_tok_s=out_tokens / duration if duration > 0 else math.nan,
        hit_rate=cached / prompt_tokens if prompt_tokens else math.nan,
        oracle_hit_rate=oracle,
        max_send_lag_s=max((r.send_lag_s for r in results), default=0.0),
        replicas=dict(sorted(Counter(r.replica_id for r in ok).items())),
        extra=dict(extra or {}),
    )


def ratio(a: float, b: float) -> float:
    if b == 0 or math.isnan(a) or math.isnan(b):
        return math.nan
    return a / b


# ------------------------------------------------------------------------------ tables
def _fmt(v: float, spec: str) -> str:
    return "-" if math.isnan(v) else format(v, spec)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = " | ".join(
        h.rjust(w) if i else h.ljust(w)
        for i, (h, w) in enumerate(zip(headers, widths, strict=True))
    )
    sep = "-+-".join("-" * w for w in widths)
    body = [
        " | ".join(
            c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in rows
    ]
    return "\n".join([line, sep, *body])


def summary_table(summaries: Sequence[Summary]) -> str:
    headers = [
        "arm",
        "ok/n",
        "TTFT mean s",
        "p50",
        "p90",
        "p99",
        "ITL ms",
        "out tok/s",
        "hit rate",
        "oracle",
        "hit/oracle",
    ]
    rows = [
        [
            s.arm,
            f"{s.ok}/{s.requests}",
            _fmt(s.ttft_s.mean, ".3f"),
            _fmt(s.ttft_s.p50, ".3f"),
            _fmt(s.ttft_s.p90, ".3f"),
            _fmt(s.ttft_s.p99, ".3f"),
            _fmt(s.itl_s.mean * 1000, ".1f"),
            _fmt(s.throughput_tok_s, ".1f"),
            _fmt(s.hit_rate, ".3f"),
            _fmt(s.oracle_hit_rate, ".3f"),
            _fmt(s.hit_vs_oracle, ".2f"),
        ]
        for s in summaries
    ]
    return format_table(headers, rows)


@dataclass
class Check:
    """One target of the spec: `value` compared with `bound` (`<=` or `>=`)."""

    name: str
    value: float
    op: str
    bound: float

    @property
    def passed(self) -> bool:
        if math.isnan(self.value):
            return False
        return self.value <= self.bound if self.op == "<=" else self.value >= self.bound


def checks_table(checks: Sequence[Check]) -> str:
    rows = [
        [c.name, _fmt(c.value, ".3f"), f"{c.op} {c.bound:g}", "met" if c.passed else "MISSED"]
        for c in checks
    ]
    return format_table(["target", "measured", "bound", ""], rows)


# ------------------------------------------------------------------------------ JSON
def _jsonable(obj: Any) -> Any:
    if isinstance(obj, float) and (math.isnan(obj) or math.isinf(obj)):
        return None
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    return obj


def summary_dict(s: Summary) -> dict[str, Any]:
    d = asdict(s)
    d["hit_vs_oracle"] = s.hit_vs_oracle
    return d


def write_json(name: str, payload: Mapping[str, Any], directory: Path = RESULTS_DIR) -> Path:
    """`payload` as `directory/name`, or at `name` itself when it names a directory too
    (`bench-results/x.json`, `/tmp/x.json`): a run of many minutes is not lost at its end to a
    path the directory would double."""
    path = Path(name) if Path(name).parent != Path() else directory / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_jsonable(dict(payload)), indent=2, allow_nan=False) + "\n")
    return path


def results_dicts(results: Sequence[Result]) -> list[dict[str, Any]]:
    return [asdict(r) for r in results]


def eprint(*parts: object, file: TextIO = sys.stderr) -> None:
    print(*parts, file=file, flush=True)
