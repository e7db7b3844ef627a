from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / ".build" / "models" / "smollm2-135m-instruct" / "tokenizer.json"


@pytest.fixture(scope="session")
def tokenizer_path() -> Path:
    if not TOKENIZER.is_file():
        pytest.fail(f"{TOKENIZER} missing: run `make setup` first")
    return TOKENIZER
