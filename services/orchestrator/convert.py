"""The orchestrator's one protobuf ↔ domain boundary: one function per message. The servicer
calls these and nothing else builds or reads an orchestrator protobuf message."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from pydantic import ValidationError

from llmmesh.common.errors import ServiceError, code_number
from llmmesh.common.server import MAX_MESSAGE_BYTES
from llmmesh.generated.orchestrator.v1 import orchestrator_pb2 as pb
from llmmesh.kvblocks import BlockConfig, PromptHashes, hashes_from_le64, tokens_from_bytes
from services.orchestrator.domain import AdmissionRequest, Lease, Outcome, Priority
from services.orchestrator.errors import BadAdmission, BadReplicaSpec
from services.orchestrator.replicas import ReplicaState
from services.orchestrator.settings import ReplicaSpec

_PRIORITY = {
    pb.PRIORITY_UNSPECIFIED: Priority.STANDARD,
    pb.PRIORITY_INTERACTIVE: Priority.INTERACTIVE,
    pb.PRIORITY_STANDARD: Priority.STANDARD,
    pb.PRIORITY_BATCH: Priority.BATCH,
}
_OUTCOME = {
    pb.OUTCOME_UNSPECIFIED: Outcome.REQUEST_ERROR,
    pb.OUTCOME_SUCCESS: Outcome.SUCCESS,
    pb.OUTCOME_CANCELLED: Outcome.CANCELLED,
    pb.OUTCOME_REPLICA_ERROR: Outcome.REPLICA_ERROR,
    pb.OUTCOME_REQUEST_ERROR: Outcome.REQUEST_ERROR,
}


def admission_from_pb(request: pb.AdmitRequest) -> AdmissionRequest:
    """BadAdmission when the prompt is set twice, its packed bytes are no whole tokens, or its
    block hashes do not fit its length."""
    prompt: Sequence[int] = request.prompt_token_ids
    packed = request.prompt_tokens_le32
    if packed:
        if prompt:
            raise BadAdmission(
                "set one of prompt_token_ids, prompt_tokens_le32", field="prompt_tokens_le32"
            )
        try:
            prompt = tokens_from_bytes(packed)
        except ValueError as err:
            raise BadAdmission(str(err), field="prompt_tokens_le32") from err
    hashes: PromptHashes | None = None
    length: int | None = None
    if request.prompt_block_hashes_le64 or request.prompt_tokens:
        if prompt:
            raise BadAdmission(
                "set the prompt or its length and block hashes, not both",
                field="prompt_block_hashes_le64"
                if request.prompt_block_hashes_le64
                else "prompt_tokens",
            )
        if request.prompt_tokens > MAX_PROMPT_TOKENS:
            raise BadAdmission(
                f"at most {MAX_PROMPT_TOKENS} (what a packed prompt can carry)",
                field="prompt_tokens",
            )
        hashes, length = _prompt_hashes(request), request.prompt_tokens
    return AdmissionRequest(
        request_id=request.request_id,
        model=request.model,
        prompt_token_ids=prompt,
        max_tokens=request.max_tokens,
        priority=_PRIORITY.get(request.priority, Priority.STANDARD),
        tenant=request.tenant,
        model_version=request.model_version,
        exclude_replicas=frozenset(request.exclude_replicas),
        prompt_hashes=hashes,
        prompt_length=length,
    )


# The longest prompt a length may claim: as many tokens as a packed prompt fits in a message.
MAX_PROMPT_TOKENS: Final = MAX_MESSAGE_BYTES // 4


def _prompt_hashes(request: pb.AdmitRequest) -> PromptHashes:
    try:
        hashes = hashes_from_le64(request.prompt_block_hashes_le64)
    except ValueError as err:
        raise BadAdmission(str(err), field="prompt_block_hashes_le64") from err
    if request.hash_block_size <= 0:
        raise BadAdmission("must be positive with block hashes", field="hash_block_size")
    full = request.prompt_tokens // request.hash_block_size
    if full != len(hashes):
        raise BadAdmission(
            f"{request.prompt_tokens} tokens make {full} full blocks of "
            f"{request.hash_block_size}, not {len(hashes)}",
            field="prompt_tokens",
        )
    return PromptHashes(BlockConfig(request.hash_block_size, request.hash_seed), hashes)


def replica_to_pb(spec: ReplicaSpec) -> pb.Replica:
    """Every field a client needs to dial the replica (the authority above all: without it a
    mesh sidecar sees a bare pod IP and the stream bypasses mTLS)."""
    return pb.Replica(
        id=spec.id,
        grpc_address=spec.grpc_address,
        pool=spec.pool,
        model_version=spec.model_version,
        authority=spec.authority,
    )


def lease_to_pb(lease: Lease) -> pb.AdmitResponse:
    return pb.AdmitResponse(
        lease_id=lease.lease_id,
        replica=replica_to_pb(lease.replica),
        queue_ms=lease.queue_s * 1000.0,
    )


def refusal_to_pb(err: ServiceError) -> pb.AdmitRefusal:
    """A refused Admit as an AdmitStream answer's fields: the status, typed reason and
    retry-after the unary call would have ended with."""
    refusal = pb.AdmitRefusal(
        code=code_number(err.code),
        message=str(err),
        reason=err.reason.value if err.reason is not None else "",
    )
    if err.retry_after_s is not None:
        refusal.retry_after_s = err.retry_after_s
    return refusal


def outcome_from_pb(request: pb.CompleteRequest) -> tuple[Outcome, int | None]:
    """The outcome, and the engine's reused KV blocks when the engine ran the prompt (success,
    or a first token was seen)."""
    outcome = _OUTCOME.get(request.outcome, Outcome.REQUEST_ERROR)
    ran_prompt = outcome is Outcome.SUCCESS or request.HasField("time_to_first_token_ms")
    return outcome, request.kv_cache_reused_blocks if ran_prompt else None


def status_to_pb(st: ReplicaState, now: float) -> pb.ReplicaStatus:
    status = pb.ReplicaStatus(
        replica=replica_to_pb(st.spec),
        healthy=st.healthy(now),
        in_flight=st.in_flight,
        completed=st.completed,
        failures=st.failures,
        consecutive_errors=st.consecutive_errors,
        draining=st.draining,
        registered=st.registered,
        models=st.spec.models,
    )
    if st.ejected(now):
        status.ejected_for_s = st.ejected_until - now
    return status


def spec_from_pb(replica: pb.ReplicaSpec) -> ReplicaSpec:
    """RegisterReplica's spec, validated as a static one is; errors name `replica.<field>`."""
    try:
        return ReplicaSpec(
            id=replica.id,
            grpc_address=replica.grpc_address,
            metrics_url=replica.metrics_url,
            pool=replica.pool,
            model_version=replica.model_version,
            models=list(replica.models),
            authority=replica.authority,
        )
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(x) for x in first["loc"] if isinstance(x, str))
        raise BadReplicaSpec(first["msg"], field=f"replica.{where}") from None
