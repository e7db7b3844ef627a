"""Gateway core: validate → tokenize → admit (orchestrator) → stream from the replica → detokenize.

One core serves every front (gRPC and OpenAI HTTP); fronts only convert types.

Invariants:
- Every granted lease is completed exactly once, whatever happens to the stream (the report is
  handed to the admission client, which sends it in the background, so client cancellation
  cannot skip it).
- Closing the event iterator of a request without a client request id (client cancel, deadline,
  stop string) cancels the Triton request at once. With a client request id the generation
  belongs to the idempotency store (`resume.py`): it outlives its last client by the grace
  period, and is cancelled then unless a retry re-attached.
- A keyed request's creation time is its generation's, recorded once by the idempotency store
  when the key was first opened (`Opened`): retries and resumes, on any gateway, get the same.
- Every generation ends in exactly one usage record (`usage.py`) and one
  `llmmesh_gateway_requests_total` increment; a request refused before a generation starts
  (authentication, id conflict, full store, unknown resume) gets one too.

Request migration: when the replica fails a request (a `TritonStreamError`; after the first
token only a replica fault, or no token within `stall_timeout_s`), the core admits it again,
excluding every replica that failed it, and continues on the new lease with the prompt plus the
tokens generated so far as its input and the remaining max_tokens; the same `StreamState`
carries on, so the client's stream, token offsets, stop-string matching, detokenization and
usage continue as if nothing happened. Before the first token this is bounded by
`retries_before_first_token`, after it by `max_migrations`; each is counted
(`llmmesh_gateway_migrations_total{phase,outcome}`), logged with the request id and added to
the request's span as a `migration` event. A greedy continuation equals the uninterrupted
output (the engine's next token is a function of its context); at temperature > 0 it is a
continuation sampled given the context so far, not a replay (a seeded request is reproducible
only when no migration happened). Not retried anywhere: a refusal of the client's own prompt
for its size (INVALID_ARGUMENT, `faults.attempt_error`); a replica that was full or refused
otherwise is passed over for the next admission only.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import math
import time
from collections.abc import AsyncGenerator, Callable, Sequence
from typing import Protocol

from opentelemetry import trace
from opentelemetry.trace import SpanKind

from llmmesh.common.errors import DeadlineExceeded, ServiceError, Unavailable
from services.gateway import metrics
from services.gateway.admission import AdmissionClient
from services.gateway.attempts import Attempts, Tries, Validated
from services.gateway.auth import Authenticator, Tenant
from services.gateway.chat_template import ChatTemplate, ChatTemplateError
from services.gateway.errors import (
    ContextLengthExceeded,
    InvalidRequest,
    ModelNotFound,
    RateLimited,
    ResumeStoreFull,
)
from services.gateway.events import Completion, Delta, Event, FinishReason
from services.gateway.generation import (
    CHAT_ROLES,
    ChatMessage,
    GenerationRequest,
    Sampling,
    request_digest,
)
from services.gateway.limits import Slot, StreamLimits
from services.gateway.models import ServedModel
from services.gateway.readiness import Readiness, ReadinessCheck
from services.gateway.resume import Billing, Clock, Key, ResumeBackend, ResumeStore, Takeover
from services.gateway.resume_redis import RedisResumeStore
from services.gateway.settings import GatewaySettings
from services.gateway.stream_state import Progress, StreamState
from services.gateway.triton_stream import (
    EngineClient,
)
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
    "Opened",
    "Sampling",
    "UsageSink",
    "request_digest",
]

# A temperature or top-p below this samples the most likely token alone: greedy (vLLM's sampling
# epsilon); the engines would get 0 or an FP32 subnormal.
GREEDY_BELOW = 1e-5

log = logging.getLogger(__name__)
_tracer = trace.get_tracer("llmmesh.gateway")


class UsageSink(Protocol):
    def submit(self, record: UsageRecord) -> None: ...


def _beyond_context(tokens: int, context_length: int, field: str) -> ContextLengthExceeded:
    return ContextLengthExceeded(
        f"{tokens} tokens; the model's context is {context_length} tokens", field=field
    )


@dataclasses.dataclass(slots=True)
class Opened:
    """Set by `GatewayCore.generate` for a keyed request before its first event: the wall-clock
    time (Unix seconds) its generation was first opened, on whichever gateway. None for an
    unkeyed request, and for one refused before its generation was opened."""

    created: float | None = None


def produced(takeover: Takeover | None, progress: Progress) -> bool:
    """Tokens came for the request: here, or before a takeover at the gateway that began it."""
    if progress.first_token_s is not None:
        return True
    return takeover is not None and any(d.token_ids for d in takeover.prior)


def was_served(
    takeover: Takeover | None, progress: Progress, tries: Tries, *, failed: bool
) -> bool:
    """A replica served the request: tokens came (`produced`), or a replica took it and it did
    not fail (a caller that left after its lease used the replica's work; not one that left
    while the request waited to be admitted again after its replica failed). One that was not
    keeps its tenant's budget (refund) and bills no prompt."""
    return produced(takeover, progress) or (tries.serving and not failed)


class GatewayCore:
    def __init__(
        self,
        settings: GatewaySettings,
        models: Sequence[ServedModel],
        admission: AdmissionClient,
        triton: EngineClient,
        block_size: int,
        auth: Authenticator | None = None,
        usage: UsageSink | None = None,
        wall_clock: Clock = time.time,
    ) -> None:
        """`wall_clock`: Unix time, for keyed generations' creation and usage records."""
        self._settings = settings
        self._wall_clock = wall_clock
        self._auth = auth
        self._usage = usage
        self._block_size = block_size
        self._models = {m.name: m for m in models}
        self._admission = admission
        self._resume: ResumeBackend = (
            ResumeStore(
                retention_s=settings.resume_retention_s,
                grace_s=settings.resume_grace_s,
                max_entries=settings.resume_max_entries,
                max_tokens=settings.resume_max_tokens,
                wall_clock=wall_clock,
            )
            if settings.resume_redis_url is None
            else RedisResumeStore.from_settings(settings, wall_clock)
        )
        self._attempts = Attempts(settings, admission, triton)
        self._streams = StreamLimits(
            settings.max_concurrent_streams,
            retry_after_bounds=(
                settings.overload_retry_after_min_s,
                settings.overload_retry_after_max_s,
            ),
        )
        self._readiness = ReadinessCheck(
            admission, [m.name for m in models], settings.readiness_timeout_s
        )

    @property
    def resume(self) -> ResumeBackend:
        """The idempotency store: in process, or shared in Redis (`resume_redis_url`)."""
        return self._resume

    def models(self) -> list[ServedModel]:
        return list(self._models.values())

    async def readiness(self) -> Readiness:
        """Whether a request could be served now (readiness.py)."""
        return await self._readiness.check()

    def wall_time(self) -> float:
        """Unix time from the core's injected wall clock (what the fronts stamp responses with)."""
        return self._wall_clock()

    def authenticate(self, api_key: str | None) -> Tenant | None:
        """The key's tenant; None when authentication is off (no tenants file). Raises
        Unauthenticated for a missing or unknown key."""
        return None if self._auth is None else self._auth.authenticate(api_key)

    def refused(self, err: ServiceError, started: float, model: str = "") -> None:
        """A request a front refused before it reached `generate` (undecodable, malformed, over a
        size bound): counted in the request metrics once, as every request is, under its model
        when served (else "unknown") and no tenant (none is known yet). `started`: when the
        front took it (perf_counter). No usage record: nothing was served, to nobody known."""
        metrics.record_request(
            model if model in self._models else "unknown",
            metrics.outcome_label(err),
            "",
            time.perf_counter() - started,
        )

    # -- validation -------------------------------------------------------------------------
    def _check_request_id(self, request_id: str) -> None:
        limit = self._settings.max_request_id_chars
        if len(request_id) > limit:
            raise InvalidRequest(f"longer than {limit} characters", field="request_id")
        if not request_id.isprintable():
            raise InvalidRequest("must be printable characters", field="request_id")

    def check_sizes(
        self,
        model: str,
        *,
        messages: int | None = None,
        prompt_ids: int | None = None,
        api_key: str | None = None,
    ) -> None:
        """The bounds a prompt's item counts alone decide (chat messages, token ids against the
        model's context): a front checks them before it converts the items, each of which
        costs event-loop time, and `validate` again. An unknown model is `validate`'s to name.
        A caller refused here is authenticated first (UNAUTHENTICATED before anything about
        the model); one within the bounds is not (its request is, once)."""
        try:
            limit = self._settings.max_chat_messages
            if messages is not None and messages > limit:
                raise InvalidRequest(f"at most {limit} messages", field="messages")
            served = self._models.get(model)
            if prompt_ids is not None and served is not None:
                context = served.settings.context_length
                if prompt_ids >= context:
                    raise _beyond_context(prompt_ids, context, "prompt")
        except InvalidRequest:
            self.authenticate(api_key)
            raise

    def _check_sizes_of(self, req: GenerationRequest) -> None:
        self.check_sizes(
            req.model,
            messages=None if req.messages is None else len(req.messages),
            prompt_ids=None if req.prompt_ids is None else len(req.prompt_ids),
            api_key=req.api_key,
        )

    async def validate(self, req: GenerationRequest) -> Validated:
        """The request checked against its model and settings, its prompt as token ids (a long
        text is tokenized off the event loop: `ServedModel.encode_off_loop`)."""
        model = self._model_of(req)
        prompt_field = self._check_prompt(req, model)
        if req.prompt_ids is not None:
            ids = list(req.prompt_ids)
        elif req.prompt_text is not None:
            ids = model.with_text_prefix(await model.encode_off_loop(req.prompt_text))
        else:
            # Both checked (`_check_prompt`): a chat whose model has a template.
            assert req.messages is not None
            assert model.chat_template is not None
            text = self._render_chat(model.chat_template, req.messages)
            ids = await model.encode_off_loop(text)
        return self._sampled(req, model, ids, prompt_field)

    def check_untokenized(self, req: GenerationRequest) -> None:
        """`validate`'s checks that need no tokenizer (the model, the prompt short of its
        length in tokens, the sampling parameters): cheap enough for a request refused anyway,
        to tell it when it could never be served."""
        model = self._model_of(req)
        prompt_field = self._check_prompt(req, model)
        known = req.prompt_ids is not None
        ids = list(req.prompt_ids) if req.prompt_ids is not None else [0]
        self._sampled(req, model, ids, prompt_field, prompt_known=known)

    def _check_prompt(self, req: GenerationRequest, model: ServedModel) -> str:
        """The prompt's checks that need no tokenizer; the field it is in."""
        if req.prompt_ids is not None:
            ids = req.prompt_ids
            # min/max run in C; the offending id is searched for only when there is one.
            if ids and (min(ids) < 0 or max(ids) >= model.vocab_size):
                bad = next(t for t in ids if t < 0 or t >= model.vocab_size)
                raise InvalidRequest(
                    f"token id {bad} outside vocabulary [0, {model.vocab_size})",
                    field="prompt.token_ids",
                )
            return "prompt"
        if req.prompt_text is not None:
            limit = self._settings.max_prompt_chars
            if len(req.prompt_text) > limit:
                raise InvalidRequest(f"longer than {limit} characters", field="prompt.text")
            if not req.prompt_text:
                raise InvalidRequest("must not be empty", field="prompt")
            return "prompt"
        if req.messages is not None:
            self._check_messages(model, req.messages)
            return "messages"
        raise InvalidRequest("text, token_ids or messages is required", field="prompt")

    def _model_of(self, req: GenerationRequest) -> ServedModel:
        """The served model, after the request's id and sizes are checked."""
        self._check_request_id(req.request_id)
        model = self._models.get(req.model)
        if model is None:
            if not req.model:
                raise InvalidRequest("must be set", field="model")
            raise ModelNotFound(f"unknown model {req.model!r}", field="model")
        self._check_sizes_of(req)  # before any pass over the prompt's items
        return model

    def _sampled(
        self,
        req: GenerationRequest,
        model: ServedModel,
        ids: list[int],
        prompt_field: str,
        *,
        prompt_known: bool = True,
    ) -> Validated:
        """The prompt `ids` and the sampling parameters checked; `prompt_known` False: `ids`
        stand in for a prompt not tokenized, its length checks left out."""
        s = self._settings
        ms = model.settings
        if not ids:
            raise InvalidRequest("must not be empty", field=prompt_field)
        if prompt_known and len(ids) >= ms.context_length:
            raise _beyond_context(len(ids), ms.context_length, prompt_field)
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
        if prompt_known and len(ids) + max_tokens > ms.context_length:
            raise ContextLengthExceeded(
                f"prompt ({len(ids)}) + max_tokens ({max_tokens}) exceeds the context of {ms.context_length} tokens",
                field="sampling.max_tokens",
            )
        temperature = 1.0 if sp.temperature is None else sp.temperature
        if not (math.isfinite(temperature) and 0.0 <= temperature <= 2.0):
            raise InvalidRequest("must be in [0, 2]", field="sampling.temperature")
        top_p = 1.0 if sp.top_p is None else sp.top_p
        if not (math.isfinite(top_p) and 0.0 <= top_p <= 1.0):
            raise InvalidRequest("must be in [0, 1]", field="sampling.top_p")
        top_k = 0 if sp.top_k is None else sp.top_k
        if not 0 <= top_k <= model.vocab_size:
            raise InvalidRequest(f"must be in [0, {model.vocab_size}]", field="sampling.top_k")
        if temperature < GREEDY_BELOW:
            # Greedy. A smaller non-zero temperature reaches the engine as an FP32 that is 0
            # (not documented as greedy there) or subnormal (the logits over it overflow).
            temperature = 0.0
        if top_p < GREEDY_BELOW:
            # The smallest nucleus holds the most likely token alone (OpenAI accepts 0):
            # the engines' top-k of 1, which needs no top-p (a top-p that is 0 as an FP32 is
            # refused by the engines, which take it only in (0, 1]).
            top_p, top_k = 1.0, 1
        if len(sp.stop) > s.max_stop_strings:
            raise InvalidRequest(
                f"at most {s.max_stop_strings} stop strings", field="sampling.stop"
            )
        if any(not x for x in sp.stop):
            raise InvalidRequest("stop strings must be non-empty", field="sampling.stop")
        if any(len(x) > s.max_stop_chars for x in sp.stop):
            raise InvalidRequest(
                f"stop strings must be at most {s.max_stop_chars} characters", field="sampling.stop"
            )
        if sp.seed is not None and not 0 <= sp.seed < 2**64:
            raise InvalidRequest("must fit in 64 unsigned bits", field="sampling.seed")
        return Validated(model, ids, max_tokens, temperature, top_p, top_k, sp.stop, sp.seed)

    def _render_chat(self, template: ChatTemplate, messages: Sequence[ChatMessage]) -> str:
        """The chat prompt, its messages checked (`_check_messages`)."""
        limit = self._settings.max_prompt_chars
        try:
            text = template.render(
                [{"role": m.role, "content": m.content} for m in messages],
                add_generation_prompt=True,
            )
        except ChatTemplateError as err:
            raise InvalidRequest(
                f"rejected by the model's chat template: {err}", field="messages"
            ) from err
        if len(text) > limit:  # the template's own text per message counts too
            raise InvalidRequest(
                f"longer than {limit} characters with the chat template", field="messages"
            )
        return text

    def _check_messages(self, model: ServedModel, messages: Sequence[ChatMessage]) -> None:
        """The checks of a chat request that need no rendering."""
        if model.chat_template is None:
            raise InvalidRequest(
                f"model {model.name!r} has no chat template; send a text prompt instead",
                field="messages",
            )
        if not messages:
            raise InvalidRequest("must not be empty", field="messages")
        limit = self._settings.max_prompt_chars
        chars = 0
        for i, m in enumerate(messages):
            if m.role not in CHAT_ROLES:
                raise InvalidRequest(
                    f"must be one of {', '.join(sorted(CHAT_ROLES))}", field=f"messages[{i}].role"
                )
            chars += len(m.content)
        if chars > limit:
            raise InvalidRequest(f"longer than {limit} characters in all", field="messages")
        control = model.control_tokens
        for i, m in enumerate(messages):
            # The rendered prompt is tokenized with its special tokens parsed (the template's
            # own); one typed in a message would be parsed too: a user forging a turn.
            found = None if control is None else control.search(m.content)
            if found is not None:
                raise InvalidRequest(
                    f"contains {found.group()!r}, a control token of model {model.name!r}: "
                    "message content is text, control tokens come from the chat template",
                    field=f"messages[{i}].content",
                )

    # -- generation -------------------------------------------------------------------------
    def deadline(self, timeout_s: float | None, start: float) -> float:
        """When (`time.perf_counter`) a request that began at `start` with the client's
        `timeout_s` (None: none) ends: that, else `request_timeout_s`, at most
        `max_request_timeout_s`. A front passes the time left until it to `generate` (one
        deadline from the request's arrival) and bounds its client by it (`stall.py`)."""
        s = self._settings
        return start + min(
            timeout_s if timeout_s is not None else s.request_timeout_s, s.max_request_timeout_s
        )

    def generate(
        self, req: GenerationRequest, timeout_s: float | None, opened: Opened | None = None
    ) -> AsyncGenerator[Event, None]:
        """The request's events. Keyed requests go through the idempotency store (attach to the
        generation under their id, or start it; `opened` gets its creation time); others
        generate directly. The generator itself, not a wrapper re-yielding it: every event would
        cross one more generator frame."""
        if req.keyed or req.resume_from is not None:
            return self._generate_keyed(req, timeout_s, opened)
        return self._generate_once(req, timeout_s)

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
        self, req: GenerationRequest, timeout_s: float | None, opened: Opened | None
    ) -> AsyncGenerator[Event, None]:
        start = time.perf_counter()
        progress = Progress()
        # Whether the store ran this caller's generation (new, or taken over): its deadline is
        # then the generation's own.
        ran = False

        def source(takeover: Takeover | None, billing: Billing) -> AsyncGenerator[Event, None]:
            # At once for a new generation; for a takeover, whenever the generation's gateway
            # is found gone (the caller may have followed it for a while): the caller's
            # deadline still counts from its arrival.
            nonlocal ran
            ran = True
            left = None if timeout_s is None else timeout_s - (time.perf_counter() - start)
            return self._generate_once(req, left, takeover, billing)

        try:
            if not req.keyed:
                raise InvalidRequest("needs a client-chosen request id", field="resume_from")
            self._check_request_id(req.request_id)
            self._check_sizes_of(req)  # the digest reads every item
            tenant = self.authenticate(req.api_key)
            progress.tenant = "" if tenant is None else tenant.name
            try:
                sub = await self._resume.subscribe(
                    Key(progress.tenant, req.request_id),
                    request_digest(req),
                    req.resume_from,
                    self._reserve(req),
                    source,
                )
            except (ResumeStoreFull, Unavailable):
                # A request that can never be served is told why (INVALID_ARGUMENT,
                # NOT_FOUND), not to retry later; checked only on this path (the generation
                # validates it anyway), and without tokenizing: while Redis is down every
                # keyed retry comes here.
                self.check_untokenized(req)
                raise
        except ServiceError as err:
            self._account(req, progress, metrics.outcome_label(err), start)
            raise
        if opened is not None:
            opened.created = sub.created
        # A caller that attached to a generation another caller started keeps its own
        # deadline (from its arrival): one with a shorter one (an HTTP retry's
        # x-request-timeout) gets DEADLINE_EXCEEDED then, and the generation goes on for the
        # others and for a resume. One whose generation this is ends with it (no timer).
        loop = asyncio.get_running_loop()
        until = (
            None if timeout_s is None else loop.time() + timeout_s - (time.perf_counter() - start)
        )
        async with contextlib.aclosing(sub.events) as events:
            while True:
                bound = asyncio.timeout_at(None if ran else until)
                try:
                    async with bound:
                        ev = await anext(events)
                except StopAsyncIteration:
                    return
                except TimeoutError:
                    if not bound.expired():
                        raise
                    raise DeadlineExceeded(
                        "the request's deadline passed (its generation goes on: resume it "
                        "with the same id)"
                    ) from None
                yield ev

    async def _generate_once(
        self,
        req: GenerationRequest,
        timeout_s: float | None,
        takeover: Takeover | None = None,
        billing: Billing | None = None,
    ) -> AsyncGenerator[Event, None]:
        """One generation; with `takeover` (a keyed generation another gateway began and left,
        resume_redis.py), its continuation after the deltas it produced: the migration
        machinery's continuation (prompt plus those tokens, the remaining max_tokens), neither
        charged nor refused by the tenant's limits again, its usage record billing only what
        the earlier gateways' did not."""
        start = time.perf_counter()
        deadline = self.deadline(timeout_s, start)
        outcome = "error"
        progress = Progress(unbilled=takeover is not None)
        model_label = req.model if req.model in self._models else "unknown"
        metrics.record_in_flight(model_label, 1)
        slot: Slot | None = None
        tries = Tries()  # the attempts' leases (none: no generation ran)
        try:
            with _tracer.start_as_current_span("gateway.generate", kind=SpanKind.SERVER) as span:
                span.set_attribute("llmmesh.request_id", req.request_id)
                tenant = self.authenticate(req.api_key)
                if tenant is not None:
                    req = dataclasses.replace(
                        req, tenant=tenant.name, priority=tenant.priority.priority
                    )
                    progress.tenant = tenant.name
                    span.set_attribute("llmmesh.tenant", tenant.name)
                # Concurrency before tokenizing: a refused request costs no tokenizer time.
                try:
                    slot = self._streams.enter(
                        None if tenant is None else tenant.limits, force=takeover is not None
                    )
                except RateLimited as err:
                    metrics.record_rate_limited("" if tenant is None else tenant.name, err.limit)
                    raise
                v = await self.validate(req)
                progress.prompt_tokens = len(v.prompt_ids)
                limits = None if tenant is None else tenant.limits

                # A takeover was charged (and its prompt counted) where it began; one handed
                # to another gateway (this one drains, or lost its claim: another takes it over
                # uncharged) keeps its charge: it continues there.
                def refundable() -> bool:
                    return billing is None or not (billing.handing_off or billing.superseded)

                refund: Callable[[], None] | None = None
                if limits is not None and takeover is None:
                    try:
                        refund = await limits.acquire(
                            len(v.prompt_ids), refund_if_cancelled=refundable
                        )
                    except RateLimited as err:
                        metrics.record_rate_limited(limits.tenant, err.limit)
                        raise
                if takeover is None and limits is not None:
                    metrics.record_tenant_prompt_tokens(limits.tenant, len(v.prompt_ids))
                state = StreamState(
                    v.model,
                    prompt_tokens=len(v.prompt_ids),
                    max_tokens=v.max_tokens,
                    stop=v.stop,
                    block_size=self._block_size,
                    start=start,
                    progress=progress,
                    limits=limits,
                    context=v.prompt_ids,
                )
                if takeover is not None:
                    state.restore(takeover.prior)
                    progress.billed, progress.unbilled = takeover.billed, False
                    span.add_event("takeover", {"llmmesh.tokens": state.completion_tokens})
                try:
                    if state.finish is not None:  # its last delta was written, not its summary
                        yield state.completion(0.0, progress.replica)
                    else:
                        # Closed here, not left to the collector (in another task and context),
                        # when this generator is closed (cancellation arrives as GeneratorExit).
                        attempts = self._attempts.run(req, v, state, deadline, span, tries)
                        async with contextlib.aclosing(attempts) as events:
                            async for ev in events:
                                yield ev
                except BaseException as exc:
                    # Never served (no lease: queue full, no replica, the caller gone while it
                    # waited for admission, a fault of this gateway's; or its replica failed
                    # before any token and no other took it): the tenant keeps its budget.
                    # As the usage record judges it: whatever ends it but the caller's leaving
                    # is a failure (a ServiceError or a fault of this gateway's).
                    failed = not isinstance(exc, (asyncio.CancelledError, GeneratorExit))
                    if (
                        refund is not None
                        and not was_served(takeover, progress, tries, failed=failed)
                        and refundable()
                    ):
                        refund()
                    raise
                outcome = "success"
        except ServiceError as err:
            outcome = metrics.outcome_label(err)
            raise
        except (asyncio.CancelledError, GeneratorExit):
            outcome = "cancelled"
            raise
        finally:
            if slot is not None:
                # A slot counts as freed (for the concurrency retry-after) only when a
                # generation ran in it: requests refused at once would make slots look like
                # they free up fast, and send refused callers back too soon.
                slot.release(freed=bool(tries.leases))
            metrics.record_in_flight(model_label, -1)
            self._account(
                req,
                progress,
                outcome,
                start,
                billing,
                served=outcome == "success"
                or was_served(takeover, progress, tries, failed=outcome != "cancelled"),
            )

    def _account(
        self,
        req: GenerationRequest,
        progress: Progress,
        outcome: str,
        start: float,
        billing: Billing | None = None,
        *,
        served: bool = False,
    ) -> None:
        """The request's metrics and usage record; once per request. A keyed generation's
        record bills what its earlier gateways' did not (`billing`, resume_redis.py), and says
        what they all billed from then on. A request no replica served (refused, timed out or
        cancelled before a lease) bills no prompt, as its tenant's charge was refunded."""
        model_label = req.model if req.model in self._models else "unknown"
        duration_s = time.perf_counter() - start
        metrics.record_request(model_label, outcome, progress.tenant, duration_s)
        nothing = progress.unbilled or (billing is not None and billing.superseded)
        prompt = (
            0 if nothing or progress.billed is not None or not served else progress.prompt_tokens
        )
        completion = 0 if nothing else max(0, progress.completion_tokens - (progress.billed or 0))
        if billing is not None and not nothing and (progress.billed is not None or prompt):
            billing.tokens = max(progress.billed or 0, progress.completion_tokens)
        if self._usage is None:
            return
        record = UsageRecord(
            time=self._wall_clock(),
            request_id=req.request_id,
            tenant=progress.tenant,
            model=model_label,
            outcome=outcome,
            prompt_tokens=prompt,
            completion_tokens=completion,
            cached_prompt_tokens=progress.cached_prompt_tokens if prompt else 0,
            ttft_ms=None
            if progress.first_token_s is None
            else (progress.first_token_s - start) * 1000,
            duration_ms=duration_s * 1000,
            replica=progress.replica,
        )
        if billing is not None and billing.deferred:
            billing.hold(functools.partial(self._submit_settled, self._usage, record))
        else:
            self._usage.submit(record)

    @staticmethod
    def _submit_settled(usage: UsageSink, record: UsageRecord, billed: bool) -> None:
        """A keyed generation's held record, once its store settled: billing nothing when
        another gateway bills the generation (`Billing.superseded`)."""
        if not billed:
            record = dataclasses.replace(
                record, prompt_tokens=0, completion_tokens=0, cached_prompt_tokens=0
            )
        usage.submit(record)

    async def close(self) -> None:
        """After the fronts drained: cancel keyed generations nobody follows any more (their
        grace periods), then wait for every lease report."""
        try:
            await self._resume.close()
        finally:  # the lease reports and the limiter's charges go out whatever came before
            try:
                await self._admission.drain()
            finally:
                if self._auth is not None:
                    await self._auth.close()
