"""CPU engine benchmark, in process (no Triton): model load time, TTFT, single-stream decode
tokens/s, and aggregate tokens/s of N concurrent streams vs the same N requests one at a time
(the batching gain), measured in one run: baseline and concurrent runs alternate over
`--rounds`, and the gain is the median of the per-round ratios. Every request generates exactly
`--tokens` tokens (no end_id), greedy; the batched tokens are checked against the solo ones.

    python -m llmmesh.cpu_engine.bench [--streams 4] [--tokens 64]

Prints a table and writes bench-results/cpu_engine.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from llmmesh.cpu_engine.batch_model import PaddedBatchModel, default_gguf_path, load_causal_lm
from llmmesh.cpu_engine.engine import CpuEngine
from llmmesh.cpu_engine.scheduler import CpuRequest, TokenOutput
from llmmesh.cpu_engine.settings import CpuEngineSettings

ROOT = Path(__file__).resolve().parents[2]
TOKENIZER = ROOT / ".build" / "models" / "smollm2-135m-instruct" / "tokenizer.json"
QUESTIONS = [
    "What is the capital of France?",
    "Name three colours.",
    "What is 2+2?",
    "Write a haiku about the sea.",
    "Why is the sky blue?",
    "Give me a tip for learning Python.",
    "What do bees make?",
    "Describe a sunset in one sentence.",
]


class _Collect:
    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.first: float | None = None
        self.end = 0.0
        self.tokens: list[int] = []
        self.error: str | None = None
        self.done = threading.Event()

    def on_token(self, output: TokenOutput) -> None:
        now = time.perf_counter()
        if self.first is None:
            self.first = now
        if output.token_id is not None:
            self.tokens.append(output.token_id)
        if output.finished:
            self.end = now
            self.done.set()

    def on_error(self, message: str) -> None:
        self.error = message
        self.done.set()

    def on_cancelled(self) -> None:
        self.error = "cancelled"
        self.done.set()

    def is_cancelled(self) -> bool:
        return False


@dataclass(frozen=True)
class Run:
    streams: int
    wall_s: float
    tokens: int
    ttft_s: list[float]

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s


def _run(
    engine: CpuEngine, prompts: list[tuple[int, ...]], n: int, tag: str
) -> tuple[Run, list[list[int]]]:
    sinks = [_Collect() for _ in prompts]
    start = time.perf_counter()
    for i, (prompt, sink) in enumerate(zip(prompts, sinks, strict=True)):
        engine.submit(CpuRequest(f"{tag}-{i}", prompt, n), sink)
    for sink in sinks:
        if not sink.done.wait(600):
            raise TimeoutError("request did not finish within 600 s")
        if sink.error:
            raise RuntimeError(sink.error)
    wall = max(s.end for s in sinks) - start
    ttft = [(s.first or s.end) - s.start for s in sinks]
    return Run(len(prompts), wall, sum(len(s.tokens) for s in sinks), ttft), [
        s.tokens for s in sinks
    ]


@dataclass(frozen=True)
class Round:
    solo: list[Run]  # the baseline: the same requests, one at a time
    concurrent: Run
    same_tokens: bool

    @property
    def sequential_tokens_per_s(self) -> float:
        return sum(r.tokens for r in self.solo) / sum(r.wall_s for r in self.solo)

    @property
    def gain(self) -> float:
        return self.concurrent.tokens_per_s / self.sequential_tokens_per_s


def _round(engine: CpuEngine, prompts: list[tuple[int, ...]], n: int, tag: str) -> Round:
    solo_runs, solo_tokens = [], []
    for i, p in enumerate(prompts):
        run, (tokens,) = _run(engine, [p], n, f"{tag}-solo{i}")
        solo_runs.append(run)
        solo_tokens.append(tokens)
    concurrent, batched_tokens = _run(engine, prompts, n, f"{tag}-batch")
    return Round(solo_runs, concurrent, batched_tokens == solo_tokens)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=4, help="Concurrent streams (<= 8).")
    parser.add_argument("--tokens", type=int, default=64, help="Tokens generated per request.")
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="Baseline + concurrent pairs; the gain is the median of the per-round ratios.",
    )
    parser.add_argument("--out", default=str(ROOT / "bench-results" / "cpu_engine.json"))
    args = parser.parse_args()
    if not 1 <= args.streams <= len(QUESTIONS):
        parser.error(f"--streams must be in [1, {len(QUESTIONS)}]")
    if args.rounds < 1 or args.tokens < 1:
        parser.error("--rounds and --tokens must be positive")
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(TOKENIZER))
    prompts = [
        tuple(tok.encode(f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n").ids)
        for q in QUESTIONS[: args.streams]
    ]
    settings = CpuEngineSettings(max_batch_size=args.streams)
    model, load_s = load_causal_lm(settings.gguf_path or default_gguf_path())
    engine = CpuEngine(settings, PaddedBatchModel(model), kv_block_tokens=32)
    engine.start()
    try:
        _run(engine, prompts[:1], 8, "warmup")
        # Baseline and concurrent runs alternate, so a change in machine load hits both.
        rounds = [_round(engine, prompts, args.tokens, f"r{i}") for i in range(args.rounds)]
    finally:
        engine.stop()
    solo = [r for rd in rounds for r in rd.solo]
    single_tps = statistics.median(r.tokens_per_s for r in solo)
    single_ttft = statistics.median(r.ttft_s[0] for r in solo)
    sequential_tps = statistics.median(rd.sequential_tokens_per_s for rd in rounds)
    concurrent_tps = statistics.median(rd.concurrent.tokens_per_s for rd in rounds)
    concurrent_ttft = statistics.median(t for rd in rounds for t in rd.concurrent.ttft_s)
    gains = [rd.gain for rd in rounds]
    same = all(rd.same_tokens for rd in rounds)
    result = {
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count()},
        "settings": {"streams": args.streams, "tokens_per_request": args.tokens},
        "load_s": load_s,
        "single_stream": {"tokens_per_s": single_tps, "ttft_s": single_ttft},
        "sequential_tokens_per_s": sequential_tps,
        "concurrent": {"tokens_per_s": concurrent_tps, "ttft_s_median": concurrent_ttft},
        "batching_gain": {"median": statistics.median(gains), "per_round": gains},
        "batched_equals_solo": same,
        "rounds": [
            {"solo": [asdict(r) for r in rd.solo], "concurrent": asdict(rd.concurrent)}
            for rd in rounds
        ],
    }
    rows = [
        ("model load", f"{load_s:.1f} s"),
        ("TTFT, 1 stream (median)", f"{single_ttft * 1000:.0f} ms"),
        ("tokens/s, 1 stream (median)", f"{single_tps:.1f} tok/s"),
        (f"{args.streams} requests one at a time", f"{sequential_tps:.1f} tok/s"),
        (f"{args.streams} concurrent streams", f"{concurrent_tps:.1f} tok/s"),
        (f"TTFT, {args.streams} concurrent (median)", f"{concurrent_ttft * 1000:.0f} ms"),
        (
            "batching gain (concurrent / one at a time)",
            f"{statistics.median(gains):.2f}x (rounds: {', '.join(f'{g:.2f}' for g in gains)})",
        ),
        ("batched tokens == solo tokens", str(same)),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written to {out}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
