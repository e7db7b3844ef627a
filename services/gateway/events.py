"""What a generation produces, as every front and the resume store see it: zero or more
`Delta`s, then exactly one `Completion` (or an error)."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class FinishReason(enum.Enum):
    STOP = "stop"
    LENGTH = "length"


@dataclass(frozen=True, slots=True)
class Delta:
    text: str
    token_ids: list[int]
    # Completion offset of the first token of this delta; `end` is the offset after it.
    offset: int
    finish_reason: FinishReason | None = None

    @property
    def end(self) -> int:
        return self.offset + len(self.token_ids)


@dataclass(frozen=True, slots=True)
class Completion:
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int
    queue_ms: float
    ttft_ms: float
    total_ms: float
    mean_itl_ms: float
    replica_id: str


Event = Delta | Completion
