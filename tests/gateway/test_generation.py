"""request_digest (services/gateway/generation.py): a request body's identity for idempotency."""

from __future__ import annotations

import hashlib
import json
import struct

from services.gateway.generation import GenerationRequest, Sampling, request_digest


def body(temperature: float | None = None, top_p: float | None = None) -> GenerationRequest:
    return GenerationRequest(
        model="m",
        request_id="k",
        prompt_ids=[1, 2, 3],
        sampling=Sampling(temperature=temperature, top_p=top_p),
    )


def widened(x: float) -> float:
    """`x` as a gRPC float field carries it (FP32), read back as a Python float."""
    return float(struct.unpack("<f", struct.pack("<f", x))[0])


def test_the_same_sampling_over_both_fronts_is_one_body() -> None:
    """HTTP's JSON 0.7 and gRPC's FP32 0.699999988... are what the engine gets alike (an FP32
    tensor): a retry of one request over the other front is no conflict."""
    assert widened(0.7) != 0.7
    http = body(temperature=0.7, top_p=0.9)
    grpc = body(temperature=widened(0.7), top_p=widened(0.9))
    assert request_digest(http) == request_digest(grpc)
    assert request_digest(body(temperature=0.7)) != request_digest(body(temperature=0.8))
    assert request_digest(body(temperature=0.7)) != request_digest(body())


def test_a_value_beyond_fp32_is_digested_as_it_is() -> None:
    """Digested before validation refuses it: no OverflowError (an internal error)."""
    assert request_digest(body(temperature=1e300)) != request_digest(body(temperature=3e300))


def test_an_http_body_keeps_its_digest_from_before_the_normalisation() -> None:
    """A gateway of the previous version, sharing the Redis store in a rolling upgrade, digested
    HTTP's 0.7 as it is: the same body's retry on this version must not be a conflict."""
    legacy = body(temperature=0.7, top_p=0.95)
    canonical: dict[str, object] = {
        "model": "m",
        "prompt_text": None,
        "prompt_ids": [1, 2, 3],
        "messages": None,
        "sampling": [None, 0.7, 0.95, None, [], None],
    }
    data = json.dumps(canonical, ensure_ascii=False, separators=(",", ":"), sort_keys=True)
    assert request_digest(legacy) == hashlib.sha256(data.encode()).hexdigest()
