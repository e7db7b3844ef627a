"""The orchestrator hashes prompts for its registry lookups from a protobuf repeated field by
its own fast path; the hashes must be the block hashes the engines publish."""

from __future__ import annotations

import random

import pytest

from llmmesh.generated.orchestrator.v1 import orchestrator_pb2 as pb
from llmmesh.kvblocks import BlockConfig, block_hashes, hashes_from_bytes
from services.orchestrator.prefix import token_bytes


@pytest.mark.parametrize("tokens", [0, 31, 32, 33, 1000, 4096 + 7])
def test_prompt_hashes_from_a_repeated_field_equal_the_block_hashes(tokens: int) -> None:
    rng = random.Random(tokens)
    ids = [rng.randrange(0, 2**32) for _ in range(tokens)]
    field = pb.AdmitRequest.FromString(
        pb.AdmitRequest(prompt_token_ids=ids).SerializeToString()
    ).prompt_token_ids
    config = BlockConfig(32, 7)
    assert hashes_from_bytes(token_bytes(field), config) == block_hashes(ids, config)
    assert token_bytes(ids) == token_bytes(field)
