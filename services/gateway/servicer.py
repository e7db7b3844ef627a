"""gRPC adapter: protobuf ↔ gateway core."""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import Callable
from typing import TypeVar

import grpc
from google.protobuf.message import DecodeError, Message
from opentelemetry import context as otel_context

from llmmesh.common.errors import DeadlineExceeded, ServiceError, abort
from llmmesh.common.telemetry import extract_trace_context, request_id_var
from llmmesh.common.topology import Priority
from llmmesh.generated.gateway.v1 import gateway_pb2 as pb
from llmmesh.generated.gateway.v1 import gateway_pb2_grpc as pb_grpc
from services.gateway.auth import bearer_token
from services.gateway.core import (
    ChatMessage,
    Completion,
    Delta,
    FinishReason,
    GatewayCore,
    GenerationRequest,
    Sampling,
)
from services.gateway.errors import InvalidRequest
from services.gateway.stall import ClientStall

log = logging.getLogger(__name__)
Ctx = grpc.aio.ServicerContext[object, object]
M = TypeVar("M", bound=Message)
SERVICE = pb.DESCRIPTOR.services_by_name["GatewayService"].full_name


class Undecodable:
    """A request whose bytes are not a valid message (bad wire format, invalid UTF-8 in a
    string). The generated handlers would answer UNKNOWN; these get INVALID_ARGUMENT."""

    def __init__(self, message_type: str, error: str):
        self.message_type = message_type
        self.error = error

    def as_error(self) -> InvalidRequest:
        return InvalidRequest(f"not a valid {self.message_type}: {self.error}")


def _lenient(message_type: type[M]) -> Callable[[bytes], M | Undecodable]:
    def parse(data: bytes) -> M | Undecodable:
        try:
            return message_type.FromString(data)
        except DecodeError as err:
            return Undecodable(message_type.DESCRIPTOR.full_name, str(err))

    return parse


_PRIORITY = {
    pb.PRIORITY_UNSPECIFIED: Priority.STANDARD,
    pb.PRIORITY_INTERACTIVE: Priority.INTERACTIVE,
    pb.PRIORITY_STANDARD: Priority.STANDARD,
    pb.PRIORITY_BATCH: Priority.BATCH,
}
_FINISH = {FinishReason.STOP: pb.FINISH_REASON_STOP, FinishReason.LENGTH: pb.FINISH_REASON_LENGTH}


def api_key_from(context: Ctx) -> str | None:
    """Bearer token from the `authorization` metadata."""
    for key, value in context.invocation_metadata() or ():
        if key == "authorization" and isinstance(value, str):
            return bearer_token(value)
    return None


def request_from_pb(request: pb.GenerateRequest, api_key: str | None = None) -> GenerationRequest:
    """The one gRPC → domain conversion. Only shapes change here: the core validates (roles,
    empty prompts, chat on a model without a template) and names the field."""
    sp = request.sampling
    which = request.WhichOneof("prompt")
    return GenerationRequest(
        model=request.model,
        request_id=request.request_id or uuid.uuid4().hex,
        prompt_text=request.text if which == "text" else None,
        prompt_ids=list(request.token_ids.ids) if which == "token_ids" else None,
        messages=(
            tuple(ChatMessage(role=m.role, content=m.content) for m in request.messages.messages)
            if which == "messages"
            else None
        ),
        sampling=Sampling(
            max_tokens=sp.max_tokens if sp.HasField("max_tokens") else None,
            temperature=sp.temperature if sp.HasField("temperature") else None,
            top_p=sp.top_p if sp.HasField("top_p") else None,
            top_k=sp.top_k if sp.HasField("top_k") else None,
            stop=tuple(sp.stop),
            seed=sp.seed if sp.HasField("seed") else None,
        ),
        priority=_PRIORITY.get(request.priority, Priority.STANDARD),
        api_key=api_key,
        keyed=bool(request.request_id),
        resume_from=request.resume_from if request.HasField("resume_from") else None,
    )


def _response(request_id: str, ev: Delta | Completion) -> pb.GenerateResponse:
    """The one domain event → GenerateResponse conversion."""
    if isinstance(ev, Completion):
        return pb.GenerateResponse(
            request_id=request_id,
            complete=pb.GenerationComplete(
                finish_reason=_FINISH[ev.finish_reason],
                usage=pb.Usage(
                    prompt_tokens=ev.prompt_tokens,
                    completion_tokens=ev.completion_tokens,
                    cached_prompt_tokens=ev.cached_prompt_tokens,
                ),
                timings=pb.Timings(
                    queue_ms=ev.queue_ms,
                    time_to_first_token_ms=ev.ttft_ms,
                    total_ms=ev.total_ms,
                    mean_inter_token_ms=ev.mean_itl_ms,
                ),
                replica_id=ev.replica_id,
            ),
        )
    # Filled in place: a TokenDelta passed to the constructor would be copied.
    resp = pb.GenerateResponse(request_id=request_id)
    delta = resp.delta
    delta.SetInParent()  # a delta, even one whose fields are all defaults
    delta.text = ev.text
    delta.token_ids.extend(ev.token_ids)
    delta.offset = ev.offset
    if ev.finish_reason is not None:
        delta.finish_reason = _FINISH[ev.finish_reason]
    return resp


class GatewayServicer(pb_grpc.GatewayServiceServicer):
    def __init__(self, core: GatewayCore):
        self._core = core

    async def Generate(  # type: ignore[override]  # writes through the context
        self, request: pb.GenerateRequest | Undecodable, context: Ctx
    ) -> None:
        # A coroutine writing through the context, not an async generator: a call cancelled
        # while a write waits raises here, in this task, and the generation's generators are
        # closed in it (aclosing), their `finally` (lease report, trace context) with them. An
        # abandoned generator would be finalized later in another task and context.
        started = time.perf_counter()
        if isinstance(request, Undecodable):
            err = request.as_error()
            self._core.refused(err, started)
            await abort(context, err)
            return
        which = request.WhichOneof("prompt")
        api_key = api_key_from(context)
        try:  # from the counts, before the items are converted
            self._core.check_sizes(
                request.model,
                messages=len(request.messages.messages) if which == "messages" else None,
                prompt_ids=len(request.token_ids.ids) if which == "token_ids" else None,
                api_key=api_key,
            )
        except ServiceError as err:
            self._core.refused(err, started, request.model)
            await abort(context, err)
            return
        req = request_from_pb(request, api_key)
        skip = request.resume_events if request.HasField("resume_events") else 0
        if request.HasField("resume_events") and req.resume_from is None:
            refusal = InvalidRequest("needs resume_from", field="resume_events")
            self._core.refused(refusal, started, request.model)
            await abort(context, refusal)
            return
        request_id_var.set(req.request_id)
        token = otel_context.attach(extract_trace_context(context.invocation_metadata()))
        deadline = self._core.deadline(context.time_remaining(), started)
        stall = ClientStall(deadline)
        try:
            async with (
                contextlib.aclosing(
                    self._core.generate(req, deadline - time.perf_counter())
                ) as events,
                stall,
            ):
                async for ev in events:
                    if skip:
                        # The deltas without tokens at the resume point the client has.
                        if isinstance(ev, Delta) and not ev.token_ids:
                            skip -= 1
                            continue
                        skip = 0
                    await context.write(_response(req.request_id, ev))
                    stall.taken()
        except ServiceError as err:
            await abort(context, err)
        except TimeoutError:
            if not stall.expired():
                raise
            # Its client took no event for the grace past the deadline (stall.py): the
            # generation is closed, its lease and slots freed; the call ends (after the
            # events the client has not read, if it ever does).
            log.warning("client did not read its stream by its deadline: ended")
            await abort(context, DeadlineExceeded("the client did not read the stream in time"))
        finally:
            otel_context.detach(token)

    async def ListModels(
        self, request: pb.ListModelsRequest | Undecodable, context: Ctx
    ) -> pb.ListModelsResponse:
        try:
            self._core.authenticate(api_key_from(context))
            if isinstance(request, Undecodable):
                raise request.as_error()
        except ServiceError as err:
            await abort(context, err)
        return pb.ListModelsResponse(
            models=[
                pb.ModelInfo(
                    name=m.name,
                    context_length=m.settings.context_length,
                    max_completion_tokens=m.settings.max_completion_tokens,
                    supports_chat=m.chat_template is not None,
                )
                for m in self._core.models()
            ]
        )


def add_to_server(servicer: GatewayServicer, server: grpc.aio.Server) -> None:
    """Like the generated `add_GatewayServiceServicer_to_server`, with deserializers that turn
    undecodable bytes into INVALID_ARGUMENT instead of UNKNOWN."""
    handlers = {
        "Generate": grpc.unary_stream_rpc_method_handler(
            servicer.Generate,
            request_deserializer=_lenient(pb.GenerateRequest),
            response_serializer=pb.GenerateResponse.SerializeToString,
        ),
        "ListModels": grpc.unary_unary_rpc_method_handler(
            servicer.ListModels,
            request_deserializer=_lenient(pb.ListModelsRequest),
            response_serializer=pb.ListModelsResponse.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
