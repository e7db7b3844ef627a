"""Gateway core: validate → tokenize → admit (orchestrator) → stream from the replica → detokenize.

One core serves every front (gRPC and OpenAI HTTP); fronts only convert types.

Invariants:
- Every granted lease is completed exactly once, whatever happens to the stream (a background
  task reports it, so client cancellation cannot skip it).
- Closing the event iterator of a request without a client request id (client cancel, deadline,
  stop string) cancels the Triton request at once. With a client request id the generation
  belongs to the idempotency store (`resume.py`): it outlives its last client by the grace
  period, and is cancelled then unless a retry re-attached.
- Every generation ends in exactly one usage record (`usage.py`) and one
  `llmmesh_gateway_requests_total` increment; a request refused before a generation starts
  (authentication, id conflict, full store, unknown resume) gets one too.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import hashlib
import json
import logging
import math
import time
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import grpc
from opentelemetry import trace
from prometheus_client import Counter, Gauge, Histogram

from llmmesh.common.errors import (
    Cancelled,
    DeadlineExceeded,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    ServiceError,
    Unauthenticated,
    Unavailable,
    from_rpc_error,
)
from llmmesh.common.telemetry import inject_trace_metadata
from llmmesh.generated.orchestrator.v1 import orchestrator_pb2 as orch_pb
from llmmesh.generated.orchestrator.v1 import orchestrator_pb2_grpc as orch_grpc
from services.gateway.auth import Authenticator, PriorityClass, Tenant
from services.gateway.chat_template import ChatTemplateError
from services.gateway.errors import (
    ContextLengthExceeded,
    InvalidRequest,
    ModelNotFound,
    OrchestratorUnavailable,
    RateLimited,
    ReplicaFailed,
    RequestIdConflict,
)
from services.gateway.events import Completion, Delta, Event, FinishReason
from services.gateway.limits import TenantLimits
from services.gateway.models import IncrementalDecoder, ServedModel
from services.gateway.resume import Key, ResumeStore
from services.gateway.settings import GatewaySettings
from services.gateway.triton_stream import EngineClient, EngineRequest, TritonStreamError
from services.gateway.usage import UsageRecord

__all__ = [
    "CHAT_ROLES",
    "ChatMessage",
    "Completion",
    "Delta",
    "Event",
    "FinishReason",
    "GatewayCore",
    "GenerationRequest",
    "Priority",
    "Sampling",
    "StopMatcher",
    "UsageSink",
    "outcome_label",
    "request_digest",
]

log = logging.getLogger(__name__)
_tracer = trace.get_tracer("llmmesh.gateway")

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 2.5, 5, 10, 30)
_TTFT = Histogram(
    "llmmesh_gateway_time_to_first_token_seconds",
    "Time to first token.",
    ["model"],
    buckets=_LATENCY_BUCKETS,
)
_ITL = Histogram(
    "llmmesh_gateway_inter_token_latency_seconds",
    "Gap between tokens.",
    ["model"],
    buckets=_LATENCY_BUCKETS,
)
_DURATION = Histogram(
    "llmmesh_gateway_request_duration_seconds",
    "Whole request.",
    ["model"],
    buckets=_LATENCY_BUCKETS,
)
# tenant: the authenticated tenant (names from the tenants file: bounded), "" without
# authentication (never the client's `user` hint).
_REQUESTS = Counter(
    "llmmesh_gateway_requests_total", "Requests by outcome.", ["model", "outcome", "tenant"]
)
_TOKENS = Counter("llmmesh_gateway_tokens_total", "Tokens processed.", ["model", "kind"])
_IN_FLIGHT = Gauge("llmmesh_gateway_in_flight_requests", "Requests being served.", ["model"])
# Tenant labels come from the tenants file only (bounded); nothing when authentication is off.
_TENANT_TOKENS = Counter(
    "llmmesh_gateway_tenant_tokens_total", "Tokens per tenant.", ["tenant", "kind"]
)
_RATE_LIMITED = Counter(
    "llmmesh_gateway_rate_limited_total", "Requests refused by a tenant limit.", ["tenant", "limit"]
)


def outcome_label(err: ServiceError) -> str:
    """Bounded label set for `llmmesh_gateway_requests_total{outcome}` (dashboards and SLO rules
    count success, cancelled and invalid as good)."""
    if isinstance(err, InvalidArgument | NotFound | RequestIdConflict):
        return "invalid"
    if isinstance(err, Unauthenticated):
        return "unauthenticated"
    if isinstance(err, ResourceExhausted):
        return "rejected"
    if isinstance(err, ReplicaFailed):
        return "replica_error"
    if isinstance(err, DeadlineExceeded):
        return "deadline"
    if isinstance(err, Cancelled):
        return "cancelled"
    if isinstance(err, Unavailable):
        return "unavailable"
    return "error"


class Priority(enum.Enum):
    INTERACTIVE = orch_pb.PRIORITY_INTERACTIVE
    STANDARD = orch_pb.PRIORITY_STANDARD
    BATCH = orch_pb.PRIORITY_BATCH


_PRIORITY_OF_CLASS = {
    PriorityClass.INTERACTIVE: Priority.INTERACTIVE,
    PriorityClass.STANDARD: Priority.STANDARD,
    PriorityClass.BATCH: Priority.BATCH,
}


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


def request_digest(req: GenerationRequest) -> str:
    """Identity of a request body for idempotency: what decides the generated tokens (model,
    prompt, sampling), not how they are delivered (stream, priority, deadline)."""
    sp = req.sampling
    canonical = {
        "model": req.model,
        "prompt_text": req.prompt_text,
        "prompt_ids": None if req.prompt_ids is None else list(req.prompt_ids),
        "messages": None if req.messages is None else [[m.role, m.content] for m in req.messages],
        "sampling": [sp.max_tokens, sp.temperature, sp.top_p, sp.top_k, list(sp.stop), sp.seed],
    }
    data = json.dumps(canonical, ensure_ascii=False, separators=(",", ":"), sort_keys=True)
    return hashlib.sha256(data.encode("utf-8", "surrogatepass")).hexdigest()


class UsageSink(Protocol):
    def submit(self, record: UsageRecord) -> None: ...


@dataclass(slots=True)
class _Progress:
    """What a generation got to, for its usage record whatever way it ends."""

    tenant: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0
    first_token_s: float | None = None
    replica: str = ""


@dataclass(frozen=True, slots=True)
class _Validated:
    model: ServedModel
    prompt_ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    stop: tuple[str, ...]
    seed: int | None


class StopMatcher:
    """Holds back just enough text that a stop string split across deltas is still caught."""

    def __init__(self, stops: tuple[str, ...]):
        self._stops = stops
        self._hold = max((len(s) for s in stops), default=1) - 1
        self._pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Text safe to emit now, and whether a stop string was reached."""
        self._pending += text
        if self._stops:
            cut = min(
                (i for i in (self._pending.find(s) for s in self._stops) if i >= 0), default=-1
            )
            if cut >= 0:
                out, self._pending = self._pending[:cut], ""
                return out, True
        if self._hold and len(self._pending) > self._hold:
            out, self._pending = self._pending[: -self._hold], self._pending[-self._hold :]
            return out, False
        if self._hold:
            return "", False
        out, self._pending = self._pending, ""
        return out, False

    def flush(self) -> str:
        out, self._pending = self._pending, ""
        return out


class GatewayCore:
    def __init__(
        self,
        settings: GatewaySettings,
        models: Sequence[ServedModel],
        orchestrator: orch_grpc.OrchestratorServiceAsyncStub,
        triton: EngineClient,
        block_size: int,
        auth: Authenticator | None = None,
        usage: UsageSink | None = None,
    ) -> None:
        self._settings = settings
        self._auth = auth
        self._usage = usage
        self._block_size = block_size
        self._models = {m.name: m for m in models}
        self._orch = orchestrator
        self._triton = triton
        self._background: set[asyncio.Task[None]] = set()
        self._resume = ResumeStore(
            retention_s=settings.resume_retention_s,
            grace_s=settings.resume_grace_s,
            max_entries=settings.resume_max_entries,
            max_tokens=settings.resume_max_tokens,
        )

    def models(self) -> list[ServedModel]:
        return list(self._models.values())

    def authenticate(self, api_key: str | None) -> Tenant | None:
        """The key's tenant; None when authentication is off (no tenants file). Raises
        Unauthenticated for a missing or unknown key."""
        return None if self._auth is None else self._auth.authenticate(api_key)

    # -- validation -------------------------------------------------------------------------
    def _check_request_id(self, request_id: str) -> None:
        limit = self._settings.max_request_id_chars
        if len(request_id) > limit:
            raise InvalidRequest(f"longer than {limit} characters", field="request_id")
        if not request_id.isprintable():
            raise InvalidRequest("must be printable characters", field="request_id")

    def validate(self, req: GenerationRequest) -> _Validated:
        s = self._settings
        self._check_request_id(req.request_id)
        model = self._models.get(req.model)
        if model is None:
            if not req.model:
                raise InvalidRequest("must be set", field="model")
            raise ModelNotFound(f"unknown model {req.model!r}", field="model")
        ms = model.settings
        prompt_field = "prompt"
        if req.prompt_ids is not None:
            ids = list(req.prompt_ids)
            bad = next((t for t in ids if t < 0 or t >= model.vocab_size), None)
            if bad is not None:
                raise InvalidRequest(
                    f"token id {bad} outside vocabulary [0, {model.vocab_size})",
                    field="prompt.token_ids",
                )
        elif req.prompt_text is not None:
            if len(req.prompt_text) > s.max_prompt_chars:
                raise InvalidRequest(
                    f"longer than {s.max_prompt_chars} characters", field="prompt.text"
                )
            ids = model.encode(req.prompt_text)
        elif req.messages is not None:
            prompt_field = "messages"
            ids = model.encode(self._render_chat(model, req.messages))
        else:
            raise InvalidRequest("text or token_ids is required", field="prompt")
        if not ids:
            raise InvalidRequest("must not be empty", field=prompt_field)
        if len(ids) >= ms.context_length:
            raise ContextLengthExceeded(
                f"{len(ids)} tokens; the model's context is {ms.context_length} tokens",
                field=prompt_field,
            )
        sp = req.sampling
        if sp.max_tokens is None:
            max_tokens = min(
                ms.default_max_tokens, ms.max_completion_tokens, ms.context_length - len(ids)
            )
        else:
            max_tokens = sp.max_tokens
        if max_tokens < 1:
            raise InvalidRequest("must be at least 1", field="sampling.max_tokens")
        if max_tokens > ms.max_completion_tokens:
            raise InvalidRequest(
                f"must be at most {ms.max_completion_tokens}", field="sampling.max_tokens"
            )
        if len(ids) + max_tokens > ms.context_length:
            raise ContextLengthExceeded(
                f"prompt ({len(ids)}) + max_tokens ({max_tokens}) exceeds the context of {ms.context_length} tokens",
                field="sampling.max_tokens",
            )
        temperature = 1.0 if sp.temperature is None else sp.temperature
        if not (math.isfinite(temperature) and 0.0 <= temperature <= 2.0):
            raise InvalidRequest("must be in [0, 2]", field="sampling.temperature")
        top_p = 1.0 if sp.top_p is None else sp.top_p
        if not (math.isfinite(top_p) and 0.0 < top_p <= 1.0):
            raise InvalidRequest("must be in (0, 1]", field="sampling.top_p")
        top_k = 0 if sp.top_k is None else sp.top_k
        if not 0 <= top_k <= model.vocab_size:
            raise InvalidRequest(f"must be in [0, {model.vocab_size}]", field="sampling.top_k")
        if len(sp.stop) > s.max_stop_strings:
            raise InvalidRequest(
                f"at most {s.max_stop_strings} stop strings", field="sampling.stop"
            )
        if any(not x for x in sp.stop):
            raise InvalidRequest("stop strings must be non-empty", field="sampling.stop")
        if sp.seed is not None and not 0 <= sp.seed < 2**64:
            raise InvalidRequest("must fit in 64 unsigned bits", field="sampling.seed")
        return _Validated(model, ids, max_tokens, temperature, top_p, top_k, sp.stop, sp.seed)

    def _render_chat(self, model: ServedModel, messages: Sequence[ChatMessage]) -> str:
        if model.chat_template is None:
            raise InvalidRequest(
                f"model {model.name!r} has no chat template; send a text prompt instead",
                field="messages",
            )
        if not messages:
            raise InvalidRequest("must not be empty", field="messages")
        chars = 0
        for i, m in enumerate(messages):
            if m.role not in CHAT_ROLES:
                raise InvalidRequest(
                    f"must be one of {', '.join(sorted(CHAT_ROLES))}", field=f"messages[{i}].role"
                )
            chars += len(m.content)
        if chars > self._settings.max_prompt_chars:
            raise InvalidRequest(
                f"longer than {self._settings.max_prompt_chars} characters in all",
                field="messages",
            )
        try:
            text = model.chat_template.render(
                [{"role": m.role, "content": m.content} for m in messages],
                add_generation_prompt=True,
            )
        except ChatTemplateError as err:
            raise InvalidRequest(
                f"rejected by the model's chat template: {err}", field="messages"
            ) from err
        return text

    # -- generation -------------------------------------------------------------------------
    async def generate(
        self, req: GenerationRequest, timeout_s: float | None
    ) -> AsyncGenerator[Event, None]:
        """The request's events. Keyed requests go through the idempotency store (attach to the
        generation under their id, or start it); others generate directly."""
        events = (
            self._generate_keyed(req, timeout_s)
            if req.keyed or req.resume_from is not None
            else self._generate_once(req, timeout_s)
        )
        async with contextlib.aclosing(events):
            async for ev in events:
                yield ev

    def _reserve(self, req: GenerationRequest) -> int:
        """Completion tokens a keyed generation may produce: its max_tokens bound."""
        model = self._models.get(req.model)
        if model is None:
            return 1  # fails validation before producing anything
        ms = model.settings
        wanted = req.sampling.max_tokens
        return max(
            1, min(ms.default_max_tokens if wanted is None else wanted, ms.max_completion_tokens)
        )

    async def _generate_keyed(
        self, req: GenerationRequest, timeout_s: float | None
    ) -> AsyncGenerator[Event, None]:
        start = time.perf_counter()
        progress = _Progress()
        try:
            if not req.keyed:
                raise InvalidRequest("needs a client-chosen request id", field="resume_from")
            self._check_request_id(req.request_id)
            tenant = self.authenticate(req.api_key)
            progress.tenant = "" if tenant is None else tenant.name
            gen, index = self._resume.open(
                Key(progress.tenant, req.request_id),
                request_digest(req),
                req.resume_from,
                self._reserve(req),
                lambda: self._generate_once(req, timeout_s),
            )
        except ServiceError as err:
            self._account(req, progress, outcome_label(err), start)
            raise
        async with contextlib.aclosing(gen.follow(index)) as events:
            async for ev in events:
                yield ev

    async def _generate_once(
        self, req: GenerationRequest, timeout_s: float | None
    ) -> AsyncGenerator[Event, None]:
        start = time.perf_counter()
        deadline = start + (
            timeout_s if timeout_s is not None else self._settings.request_timeout_s
        )
        outcome = "error"
        progress = _Progress()
        model_label = req.model if req.model in self._models else "unknown"
        _IN_FLIGHT.labels(model_label).inc()
        try:
            with _tracer.start_as_current_span("gateway.generate") as span:
                span.set_attribute("llmmesh.request_id", req.request_id)
                tenant = self.authenticate(req.api_key)
                if tenant is not None:
                    req = dataclasses.replace(
                        req, tenant=tenant.name, priority=_PRIORITY_OF_CLASS[tenant.priority]
                    )
                    progress.tenant = tenant.name
                    span.set_attribute("llmmesh.tenant", tenant.name)
                v = self.validate(req)
                progress.prompt_tokens = len(v.prompt_ids)
                limits = None if tenant is None else tenant.limits
                if limits is not None:
                    try:
                        limits.admit(len(v.prompt_ids))
                    except RateLimited as err:
                        _RATE_LIMITED.labels(limits.tenant, err.limit).inc()
                        raise
                    _TENANT_TOKENS.labels(limits.tenant, "prompt").inc(len(v.prompt_ids))
                _TOKENS.labels(v.model.name, "prompt").inc(len(v.prompt_ids))
                attempts = self._settings.retries_before_first_token + 1
                leased = False
                try:
                    for attempt in range(attempts):
                        lease = await self._admit(req, v, deadline)
                        leased = True
                        span.set_attribute("llmmesh.replica", lease.replica.id)
                        started = False
                        try:
                            async for ev in self._stream(
                                req, v, lease, start, deadline, progress, limits
                            ):
                                started = True
                                yield ev
                            break
                        except ReplicaFailed as err:
                            # Nothing reached the client yet: a new Admit picks another replica.
                            if started or attempt + 1 >= attempts:
                                raise
                            log.warning("retrying on another replica", extra={"error": str(err)})
                except ServiceError:
                    if limits is not None and not leased:
                        # Never served (queue full, no replica, ...): the tenant keeps its budget.
                        limits.refund(len(v.prompt_ids))
                    raise
                outcome = "success"
        except ServiceError as err:
            outcome = outcome_label(err)
            raise
        except (asyncio.CancelledError, GeneratorExit):
            outcome = "cancelled"
            raise
        finally:
            _IN_FLIGHT.labels(model_label).dec()
            self._account(req, progress, outcome, start)

    def _account(
        self, req: GenerationRequest, progress: _Progress, outcome: str, start: float
    ) -> None:
        """The request's metrics and usage record; once per request."""
        model_label = req.model if req.model in self._models else "unknown"
        duration_s = time.perf_counter() - start
        _REQUESTS.labels(model_label, outcome, progress.tenant).inc()
        _DURATION.labels(model_label).observe(duration_s)
        if self._usage is not None:
            self._usage.submit(
                UsageRecord(
                    time=time.time(),
                    request_id=req.request_id,
                    tenant=progress.tenant,
                    model=model_label,
                    outcome=outcome,
                    prompt_tokens=progress.prompt_tokens,
                    completion_tokens=progress.completion_tokens,
                    cached_prompt_tokens=progress.cached_prompt_tokens,
                    ttft_ms=None
                    if progress.first_token_s is None
                    else (progress.first_token_s - start) * 1000,
                    duration_ms=duration_s * 1000,
                    replica=progress.replica,
                )
            )

    async def _admit(
        self, req: GenerationRequest, v: _Validated, deadline: float
    ) -> orch_pb.AdmitResponse:
        metadata = tuple(inject_trace_metadata([]))
        try:
            return await self._orch.Admit(
                orch_pb.AdmitRequest(
                    request_id=req.request_id,
                    model=v.model.settings.triton_model,
                    prompt_token_ids=v.prompt_ids,
                    max_tokens=v.max_tokens,
                    priority=Priority.BATCH.value if self._settings.shadow else req.priority.value,
                    tenant=req.tenant,
                    model_version=self._settings.model_version,
                ),
                timeout=max(deadline - time.perf_counter(), 0.001),
                metadata=metadata,
            )
        except grpc.aio.AioRpcError as err:
            if err.code() == grpc.StatusCode.UNAVAILABLE and "replica" not in (err.details() or ""):
                raise OrchestratorUnavailable(f"orchestrator: {err.details()}") from err
            raise from_rpc_error(err, "admission") from err

    async def _stream(
        self,
        req: GenerationRequest,
        v: _Validated,
        lease: orch_pb.AdmitResponse,
        start: float,
        deadline: float,
        progress: _Progress,
        limits: TenantLimits | None = None,
    ) -> AsyncIterator[Event]:
        replica = lease.replica
        progress.replica = replica.id
        model = v.model
        decoder = IncrementalDecoder(model)
        stops = StopMatcher(v.stop)
        completion_tokens = 0
        cached_blocks = 0
        first_at: float | None = None
        last_at = start
        itl_sum = 0.0
        finish: FinishReason | None = None
        outcome = orch_pb.OUTCOME_REQUEST_ERROR
        error = ""
        engine_req = EngineRequest(
            request_id=req.request_id,
            model=model.settings.triton_model,
            input_ids=v.prompt_ids,
            max_tokens=v.max_tokens,
            end_id=model.end_id,
            temperature=v.temperature,
            top_p=v.top_p,
            top_k=v.top_k,
            seed=v.seed,
        )
        try:
            with _tracer.start_as_current_span("triton.stream") as span:
                span.set_attribute("llmmesh.replica", replica.id)
                metadata = inject_trace_metadata([])
                chunks = self._triton.stream(
                    replica.grpc_address,
                    replica.authority,
                    engine_req,
                    timeout_s=max(deadline - time.perf_counter(), 0.001),
                    metadata=metadata,
                )
                async with contextlib.aclosing(chunks):
                    async for chunk in chunks:
                        if chunk.kv_cache_reused_blocks is not None:
                            cached_blocks = chunk.kv_cache_reused_blocks
                        ids = chunk.token_ids
                        if model.end_id in ids:
                            ids = ids[: ids.index(model.end_id)]
                            finish = FinishReason.STOP
                        ids = ids[: v.max_tokens - completion_tokens]
                        if ids and limits is not None:
                            limits.charge(len(ids))
                            _TENANT_TOKENS.labels(limits.tenant, "completion").inc(len(ids))
                        if ids:
                            now = time.perf_counter()
                            if first_at is None:
                                first_at = progress.first_token_s = now
                                _TTFT.labels(model.name).observe(now - start)
                            else:
                                gap = (now - last_at) / len(ids)
                                for _ in ids:
                                    _ITL.labels(model.name).observe(gap)
                                itl_sum += now - last_at
                            last_at = now
                            offset = completion_tokens
                            completion_tokens += len(ids)
                            progress.completion_tokens = completion_tokens
                            text, stopped = stops.feed(decoder.push(ids))
                            if stopped:
                                finish = FinishReason.STOP
                            elif completion_tokens >= v.max_tokens:
                                finish = FinishReason.LENGTH
                            if finish is not None and not stopped:
                                text += stops.feed(decoder.flush())[0] + stops.flush()
                            yield Delta(text, ids, offset, finish)
                        if finish is not None or chunk.final:
                            break
                if finish is None:
                    finish = FinishReason.STOP
                    tail = stops.feed(decoder.flush())[0] + stops.flush()
                    if tail:
                        yield Delta(tail, [], completion_tokens, finish)
            outcome = orch_pb.OUTCOME_SUCCESS
        except TritonStreamError as err:
            error = str(err)
            outcome = (
                orch_pb.OUTCOME_REPLICA_ERROR
                if err.replica_fault
                else orch_pb.OUTCOME_REQUEST_ERROR
            )
            raise ReplicaFailed(f"replica {replica.id} failed: {err}") from err
        except grpc.aio.AioRpcError as err:
            outcome = orch_pb.OUTCOME_CANCELLED
            error = str(err.details())
            raise from_rpc_error(err, f"replica {replica.id}") from err
        except (asyncio.CancelledError, GeneratorExit):
            outcome = orch_pb.OUTCOME_CANCELLED
            raise
        finally:
            ttft_ms = (first_at - start) * 1000 if first_at is not None else None
            self._report(
                lease.lease_id,
                outcome,
                len(v.prompt_ids),
                completion_tokens,
                cached_blocks,
                ttft_ms,
                error,
            )
            _TOKENS.labels(model.name, "completion").inc(completion_tokens)
            progress.cached_prompt_tokens = min(cached_blocks * self._block_size, len(v.prompt_ids))
        yield Completion(
            finish_reason=finish,
            prompt_tokens=len(v.prompt_ids),
            completion_tokens=completion_tokens,
            cached_prompt_tokens=min(cached_blocks * self._block_size, len(v.prompt_ids)),
            queue_ms=lease.queue_ms,
            ttft_ms=(first_at - start) * 1000 if first_at is not None else 0.0,
            total_ms=(time.perf_counter() - start) * 1000,
            mean_itl_ms=(itl_sum / (completion_tokens - 1) * 1000)
            if completion_tokens > 1
            else 0.0,
            replica_id=replica.id,
        )

    def _report(
        self,
        lease_id: str,
        outcome: orch_pb.Outcome.ValueType,
        prompt_tokens: int,
        completion_tokens: int,
        reused_blocks: int,
        ttft_ms: float | None,
        error: str,
    ) -> None:
        req = orch_pb.CompleteRequest(
            lease_id=lease_id,
            outcome=outcome,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            kv_cache_reused_blocks=reused_blocks,
            error_message=error,
        )
        if ttft_ms is not None:
            req.time_to_first_token_ms = ttft_ms

        async def send() -> None:
            for attempt in range(3):
                try:
                    await self._orch.Complete(req, timeout=5.0)
                    return
                except grpc.aio.AioRpcError as err:
                    log.warning(
                        "complete failed",
                        extra={"lease_id": lease_id, "attempt": attempt, "error": err.code().name},
                    )
            # The orchestrator reclaims leases it never hears about after lease_timeout_s.

        task = asyncio.get_running_loop().create_task(send())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def drain_background(self) -> None:
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)

    async def close(self) -> None:
        """After the fronts drained: cancel keyed generations nobody follows any more (their
        grace periods), then wait for every lease report."""
        await self._resume.close()
        await self.drain_background()
