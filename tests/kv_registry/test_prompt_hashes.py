"""The orchestrator hashes prompts for its registry lookups from a protobuf repeated field by
its own fast path; the hashes must be the block hashes the engines publish."""

from __future__ import annotations

import random

import pytest

from llmmesh.generated.orchestrator.v1 import orchestrator_pb2 as pb
from llmmesh.kvblocks import BlockConfig, block_hashes, hashes_from_bytes, tokens_from_bytes
from llmmesh.kvblocks import token_bytes as kv_token_bytes
from services.orchestrator.convert import admission_from_pb
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


@pytest.mark.parametrize("tokens", [0, 31, 32, 1000, 32768 + 5])
def test_prompt_hashes_from_a_packed_prompt_equal_the_block_hashes(tokens: int) -> None:
    # The gateway sends the prompt packed (AdmitRequest.prompt_tokens_le32); the orchestrator
    # views it as ids without a copy and hashes its bytes as they came.
    rng = random.Random(tokens)
    ids = [rng.randrange(0, 2**32) for _ in range(tokens)]
    packed = pb.AdmitRequest.FromString(
        pb.AdmitRequest(prompt_tokens_le32=kv_token_bytes(ids)).SerializeToString()
    ).prompt_tokens_le32
    admitted = admission_from_pb(pb.AdmitRequest(prompt_tokens_le32=packed))
    assert len(admitted.prompt_token_ids) == tokens
    assert list(admitted.prompt_token_ids) == ids
    config = BlockConfig(32, 7)
    assert hashes_from_bytes(token_bytes(admitted.prompt_token_ids), config) == block_hashes(
        ids, config
    )
    assert list(tokens_from_bytes(kv_token_bytes(ids))) == ids
