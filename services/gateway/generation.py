"""A generation request as the fronts hand it to the core, and its idempotency digest."""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

from llmmesh.common.topology import Priority

__all__ = ["CHAT_ROLES", "ChatMessage", "GenerationRequest", "Sampling", "request_digest"]


@dataclass(frozen=True, slots=True)
class Sampling:
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None


CHAT_ROLES = frozenset({"system", "user", "assistant"})


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: str  # one of CHAT_ROLES
    content: str


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """One prompt: token ids, text, or chat messages (rendered with the model's chat template
    and `add_generation_prompt`), checked in that order."""

    model: str
    request_id: str
    prompt_text: str | None = None
    prompt_ids: Sequence[int] | None = None
    messages: Sequence[ChatMessage] | None = None
    sampling: Sampling = field(default_factory=Sampling)
    priority: Priority = Priority.STANDARD
    # Without authentication: a hint (OpenAI `user`). With it: replaced by the key's tenant.
    tenant: str = ""
    # Bearer token from the client (HTTP Authorization / gRPC `authorization` metadata).
    api_key: str | None = field(default=None, repr=False)
    # The client chose `request_id`: it is an idempotency key (resume.py).
    keyed: bool = False
    # Resume a keyed generation after this completion token offset (gRPC `resume_from`,
    # HTTP `Last-Event-ID` / `x-resume-from`).
    resume_from: int | None = None


def _fp32(value: float | None) -> float | None:
    """The shortest decimal the engine's FP32 of `value` reads back as (0.7 for both 0.7 and
    gRPC's 0.699999988...: a body digested before this normalisation keeps its digest when sent
    over HTTP with such a value); one beyond FP32's range as it is (validation refuses it)."""
    if value is None:
        return None
    try:
        fp32 = struct.pack("<f", value)
    except OverflowError:
        return value
    for digits in range(1, 10):  # 9 significant digits tell every FP32 apart
        shortest = float(f"{value:.{digits}g}")
        if struct.pack("<f", shortest) == fp32:
            return shortest
    return value  # not reached


def request_digest(req: GenerationRequest) -> str:
    """Identity of a request body for idempotency: what decides the generated tokens (model,
    prompt, sampling), not how they are delivered (stream, priority, deadline)."""
    sp = req.sampling
    canonical = {
        "model": req.model,
        "prompt_text": req.prompt_text,
        "prompt_ids": None if req.prompt_ids is None else list(req.prompt_ids),
        "messages": None if req.messages is None else [[m.role, m.content] for m in req.messages],
        # As the engine gets them (FP32 tensors): gRPC's float fields widen 0.7 to
        # 0.699999988..., HTTP's JSON keeps 0.7: one body over both fronts is one request.
        "sampling": [
            sp.max_tokens,
            _fp32(sp.temperature),
            _fp32(sp.top_p),
            sp.top_k,
            list(sp.stop),
            sp.seed,
        ],
    }
    data = json.dumps(canonical, ensure_ascii=False, separators=(",", ":"), sort_keys=True)
    return hashlib.sha256(data.encode("utf-8", "surrogatepass")).hexdigest()
