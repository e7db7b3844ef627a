"""OpenAI-compatible HTTP front (aiohttp), served beside the gRPC server on the same core.

Routes: `POST /v1/chat/completions`, `POST /v1/completions`, `GET /v1/models`,
`GET /v1/models/{model}`, and the health routes routers and balancers expect (as vLLM, SGLang
and TGI serve them; no authentication, HEAD too):
- `GET /health`: liveness. 200 `{"status": "ok"}` while the gateway accepts requests, 503
  `{"status": "draining"}` once shutdown began.
- `GET /ready`: readiness. 200 `{"status": "ready", ...}` when the orchestrator answers and
  knows a replica that can take a lease (`readiness.py`); else 503 `{"status": "not_ready",
  "reason": ...}` (or `draining`). Bodies carry the served models and the replica counts.
Handlers are adapters: parse (`openai_request`) →
`GatewayCore.generate` → OpenAI shapes (`openai_response`). Everything else (validation,
tokenization, chat template, admission, streaming, metrics) happens in the core, exactly as
for gRPC.

- Status codes come from the error hierarchy (`ServiceError.http_status`), bodies are OpenAI's
  `{"error": {"message", "type", "param", "code"}}`; 429s carry `Retry-After` (seconds) and
  `retry-after-ms`.
- Request headers: `x-request-id` (echoed on every answer to a generation request, refusals
  included; the request's id when absent or not printable ASCII), `x-request-timeout` (seconds,
  the request's deadline, as `grpc-timeout` is for gRPC; the gateway default otherwise),
  `traceparent`/`tracestate` (W3C trace context).
- `Idempotency-Key`, or a client-sent `x-request-id` (unless `http_request_id_is_key` is off:
  behind Envoy, which stamps x-request-id on every request), is the request id and an
  idempotency key (`resume.py`): resending the request re-attaches to the same generation (a
  non-streaming retry gets the same completion); the same key with a different body is 409
  `request_id_conflict` (errors about the id name the header it came from). Streams of keyed
  requests carry
  `id: <completion tokens sent so far>` on every event (`<tokens>.k` on the k-th event without
  tokens after them: text held back to the end, the closing chunks), so a reconnecting client
  resumes with the standard `Last-Event-ID` header (or `x-resume-from`, same meaning): the
  stream continues after that event, without the opening role chunk. A resume the gateway can no longer serve
  is 404; one on a non-streaming request, 400. Every response and chunk of a keyed completion (the original, a retry, a resume, on
  any gateway) carries the same `id` and `created` (the time its generation was first opened);
  an unkeyed one's `created` is the time its request arrived.
- Streaming (`"stream": true`): Server-Sent Events, `data: {chunk}\\n\\n` ... `data: [DONE]\\n\\n`.
  Response headers are sent with the first token, so admission errors (429, 503, ...) keep
  their status; an error after that is sent as a `data: {"error": ...}` event and the stream
  ends without `[DONE]`.
- A client disconnect cancels the handler (`handler_cancellation`), which closes the core's
  event stream: without `x-request-id` the Triton request is cancelled and the lease completed
  as cancelled at once; with one, after the resume grace period unless a retry re-attached.
- Bodies larger than `http_max_body_bytes` get 413 without being read further.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from opentelemetry import context as otel_context

from llmmesh.common.errors import DeadlineExceeded, Internal, ServiceError, Unavailable
from llmmesh.common.telemetry import extract_trace_context, request_id_var
from services.gateway.auth import bearer_token
from services.gateway.core import Completion, Delta, Event, GatewayCore, Opened
from services.gateway.errors import InvalidRequest, ModelNotFound
from services.gateway.openai_request import (
    Kind,
    OpenAIRequest,
    parse_chat_request,
    parse_completion_request,
)
from services.gateway.openai_response import (
    REQUEST_ID_PARAM,
    SSE_DONE,
    Shapes,
    dumps,
    error_body,
    error_headers,
    model_card,
    model_list,
    plain_error,
    sse,
)
from services.gateway.settings import GatewaySettings
from services.gateway.stall import ClientStall

log = logging.getLogger(__name__)

TIMEOUT_HEADER = "x-request-timeout"
REQUEST_ID_HEADER = "x-request-id"
IDEMPOTENCY_HEADER = "Idempotency-Key"
LAST_EVENT_ID_HEADER = "Last-Event-ID"
RESUME_HEADER = "x-resume-from"
_MAX_OFFSET_DIGITS = 10
_JSON = "application/json"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _json_response(
    status: int, body: dict[str, Any], headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(status=status, body=dumps(body), content_type=_JSON, headers=headers)


@dataclass(frozen=True, slots=True)
class RequestIds:
    """A generation request's ids as HTTP carries them: `id` the generation's (its idempotency
    key when keyed), `echo` the `x-request-id` every answer carries (the client's when it sent a
    usable one: a client or proxy correlates by its own id, whatever the key), `param` the
    header an error about the id names (the one it came from)."""

    id: str
    echo: str
    param: str = REQUEST_ID_PARAM

    @classmethod
    def of(cls, headers: Mapping[str, str], id_is_key: bool) -> tuple[RequestIds, bool]:
        """The ids of a request with these headers, and whether its id is a client's key
        (`Idempotency-Key`, or `x-request-id` when `id_is_key`)."""
        sent = headers.get(REQUEST_ID_HEADER)
        key, param = headers.get(IDEMPOTENCY_HEADER), IDEMPOTENCY_HEADER.lower()
        if not key and id_is_key:
            key, param = sent, REQUEST_ID_PARAM
        rid = key or sent or uuid.uuid4().hex
        echo = sent if sent and _usable(sent) else rid if _usable(rid) else uuid.uuid4().hex
        return cls(rid, echo, param if key else REQUEST_ID_PARAM), bool(key)


def _usable(value: str) -> bool:
    return value.isascii() and value.isprintable()


def error_response(
    err: ServiceError, request: OpenAIRequest | None = None, ids: RequestIds | None = None
) -> web.Response:
    status, body = error_body(err, request, REQUEST_ID_PARAM if ids is None else ids.param)
    headers = error_headers(err)
    if ids is not None:
        headers[REQUEST_ID_HEADER] = ids.echo
    return _json_response(status, body, headers)


def parse_timeout(value: str | None) -> float | None:
    """`x-request-timeout`: seconds (decimal), > 0."""
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        raise InvalidRequest("must be a number of seconds", field=TIMEOUT_HEADER) from None
    if not (math.isfinite(seconds) and seconds > 0):
        raise InvalidRequest("must be a positive number of seconds", field=TIMEOUT_HEADER)
    return seconds


@dataclass(frozen=True, slots=True)
class ResumeAt:
    """Where a reconnecting client's stream resumes: after the delta ending at completion
    token `offset`, and after the `events` events without tokens that followed it (the text
    held back until the end, the closing chunks: they come only at the end)."""

    offset: int
    events: int = 0


class EventIds:
    """The SSE event ids of one stream: a delta's is its end (the completion token offset
    reached); each chunk without tokens after it (the text held back to the end, each closing
    chunk) is "end.k", k = 1, 2, ...: every chunk has its own id, so a client that missed only
    [DONE] resumes after the closing chunks, not before the tail text (it would get it twice).
    A stream resumed at "N.k" counts the same ids and leaves out the k chunks it had."""

    __slots__ = ("_end", "_k", "_skip")

    def __init__(self, start: ResumeAt | None) -> None:
        self._end = 0 if start is None else start.offset
        self._k = 0
        self._skip = 0 if start is None else start.events

    def reached(self, end: int) -> str:
        """A delta with tokens, ending at completion token `end`."""
        self._end, self._k, self._skip = end, 0, 0
        return str(end)

    def after(self) -> str | None:
        """The next chunk without tokens: its id, or None when the client already had it."""
        self._k += 1
        return None if self._k <= self._skip else f"{self._end}.{self._k}"


def parse_resume(value: str | None) -> ResumeAt | None:
    """`Last-Event-ID` / `x-resume-from`: an event id (`EventIds`): a completion token offset
    (decimal, >= 0), optionally ".k" (k >= 1) for the k-th event without tokens after it."""
    if value is None:
        return None
    offset, dot, events = value.strip().partition(".")
    if not (
        offset.isascii()
        and offset.isdigit()
        and len(offset) <= _MAX_OFFSET_DIGITS
        and (not dot or (events.isascii() and events.isdigit() and 0 < int(events) <= 9))
    ):
        raise InvalidRequest(
            "must be the id of the last event received (a completion token offset)",
            field="resume_from",
        )
    return ResumeAt(int(offset), int(events) if dot else 0)


@web.middleware
async def _errors_as_openai(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Unknown routes, wrong methods and unexpected failures still answer with OpenAI's error
    shape (never an HTML page, never a hung connection)."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        message = f"{exc.reason}: {request.method} {request.path}"
        headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        return _json_response(exc.status, plain_error(message, "invalid_request_error"), headers)
    except ServiceError as err:
        return error_response(err)
    except Exception:
        log.exception("unhandled error in HTTP handler")
        return _json_response(500, plain_error("internal error", "server_error"))


# A generation asked of a draining gateway: retried on another at once.
DRAINING_RETRY_AFTER_S = 1.0
# How long a stream the drain cut may take to write its error event (its client may be slow).
CUT_WRITE_TIMEOUT_S = 1.0


class OpenAIHttpFront:
    def __init__(self, core: GatewayCore, settings: GatewaySettings):
        self._core = core
        self._settings = settings
        self._created = int(core.wall_time())
        self._runner: web.AppRunner | None = None
        self._draining = False
        self._cut = False  # the drain's time ran out: `stop_now` cancels the generations
        self._generating: set[asyncio.Task[Any]] = set()  # handlers of the generation routes
        self.port = 0

    def app(self) -> web.Application:
        app = web.Application(
            client_max_size=self._settings.http_max_body_bytes, middlewares=[_errors_as_openai]
        )
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_get("/v1/models", self.list_models)
        app.router.add_get("/v1/models/{model:.+}", self.get_model)
        app.router.add_get("/health", self.health)
        app.router.add_get("/ready", self.ready)
        return app

    # -- lifecycle --------------------------------------------------------------------------
    async def start(self) -> int:
        self._runner = web.AppRunner(
            self.app(),
            handler_cancellation=True,
            shutdown_timeout=self._settings.drain_seconds,
            access_log=None,
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._settings.host, self._settings.http_port)
        await site.start()
        self.port = int(self._runner.addresses[0][1])
        return self.port

    async def stop(self) -> None:
        """Stop accepting, let in-flight generations (streams included) finish within
        `drain_seconds`, then cut them (`stop_now`: cancelled and their handlers awaited, so each
        is accounted for; aiohttp's own shutdown cancels them without waiting), then close the
        connections. A generation asked for meanwhile on a kept-alive connection is refused
        (503, the connection closed): the client retries on another gateway."""
        self._draining = True
        runner = self._runner
        if runner is None:
            return
        for site in list(runner.sites):
            await site.stop()
        if self._generating:  # no more join: `_tracked` refuses them from now on
            await asyncio.wait(list(self._generating), timeout=self._settings.drain_seconds)
        if self._generating:
            await self.stop_now()
        await runner.cleanup()
        self._runner = None

    async def stop_now(self) -> None:
        """Cancel every generation still running and wait for their handlers, which end their
        streams and account for them as cancelled (a `stop` in progress then ends too)."""
        self._cut = True
        running = list(self._generating)
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)

    # -- routes -----------------------------------------------------------------------------
    def _authenticate(self, request: web.Request) -> None:
        self._core.authenticate(bearer_token(request.headers.get("Authorization")))

    async def health(self, request: web.Request) -> web.Response:
        if self._draining:
            return _json_response(503, {"status": "draining"})
        return _json_response(200, {"status": "ok"})

    async def ready(self, request: web.Request) -> web.Response:
        if self._draining:
            return _json_response(503, {"status": "draining"})
        r = await self._core.readiness()
        body: dict[str, Any] = {"status": "ready" if r.ready else "not_ready"}
        if not r.ready:
            body["reason"] = r.reason
        body["models"] = list(r.models)
        if r.status is not None:
            body["replicas"] = r.status.replicas
            body["ready_replicas"] = r.status.ready_replicas
            body["queue_depth"] = r.status.queue_depth
        return _json_response(200 if r.ready else 503, body)

    async def list_models(self, request: web.Request) -> web.Response:
        self._authenticate(request)  # errors become OpenAI errors in the middleware
        return _json_response(200, model_list(self._core.models(), self._created))

    async def get_model(self, request: web.Request) -> web.Response:
        self._authenticate(request)
        name = request.match_info["model"]
        for m in self._core.models():
            if m.name == name:
                return _json_response(200, model_card(m, self._created))
        return error_response(ModelNotFound(f"unknown model {name!r}", field="model"))

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._tracked(request, Kind.CHAT)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._tracked(request, Kind.COMPLETION)

    async def _tracked(self, request: web.Request, kind: Kind) -> web.StreamResponse:
        if self._draining:
            draining = Unavailable("gateway is draining", retry_after_s=DRAINING_RETRY_AFTER_S)
            self._core.refused(draining, time.perf_counter())
            ids, _ = RequestIds.of(request.headers, self._settings.http_request_id_is_key)
            refused = error_response(draining, ids=ids)
            refused.force_close()
            return refused
        task = asyncio.current_task()
        if task is not None:
            self._generating.add(task)
        try:
            return await self._generate(request, kind)
        finally:
            if task is not None:
                self._generating.discard(task)

    # -- generation -------------------------------------------------------------------------
    async def _generate(self, request: web.Request, kind: Kind) -> web.StreamResponse:
        arrived = self._core.wall_time()
        started = time.perf_counter()
        ids, keyed = RequestIds.of(request.headers, self._settings.http_request_id_is_key)
        request_id = ids.id
        api_key = bearer_token(request.headers.get("Authorization"))
        try:
            # First: a caller without a valid key learns nothing else, and costs no read or
            # parse of up to http_max_body_bytes.
            self._core.authenticate(api_key)
        except ServiceError as unauthenticated:
            self._core.refused(unauthenticated, started)
            return error_response(unauthenticated)
        if not _usable(request_id):
            bad_id = InvalidRequest("must be printable ASCII", field="request_id")
            self._core.refused(bad_id, started)
            return error_response(bad_id, ids=ids)
        request_id_var.set(request_id)
        try:
            timeout_s = parse_timeout(request.headers.get(TIMEOUT_HEADER))
            resume_at = parse_resume(
                request.headers.get(LAST_EVENT_ID_HEADER, request.headers.get(RESUME_HEADER))
            )
            try:
                body = await request.read()
            except web.HTTPRequestEntityTooLarge:
                message = f"request body larger than {self._settings.http_max_body_bytes} bytes"
                self._core.refused(InvalidRequest(message), started)
                return _json_response(
                    413,
                    plain_error(message, "invalid_request_error"),
                    {REQUEST_ID_HEADER: ids.echo},
                )
            parse = parse_chat_request if kind is Kind.CHAT else parse_completion_request
            sizes = functools.partial(self._core.check_sizes, api_key=api_key)
            oreq = parse(body, request_id=request_id, api_key=api_key, sizes=sizes)
            if resume_at is not None and not oreq.stream:
                # A completion is whole: its events are the stream's (a non-streaming retry
                # with the same key gets it all).
                raise InvalidRequest(
                    "resumes a stream: not with a non-streaming request", field="resume_from"
                )
            if keyed or resume_at is not None:
                oreq = dataclasses.replace(
                    oreq,
                    generation=dataclasses.replace(
                        oreq.generation,
                        keyed=keyed,
                        resume_from=None if resume_at is None else resume_at.offset,
                    ),
                )
        except ServiceError as err:
            self._core.refused(err, started)
            return error_response(err, None, ids)
        deadline = self._core.deadline(timeout_s, started)
        if deadline <= time.perf_counter():  # the body's upload took it all
            late = DeadlineExceeded("the request's deadline passed while it was read")
            self._core.refused(late, started)
            return error_response(late, None, ids)
        token = otel_context.attach(
            extract_trace_context((k.lower(), v) for k, v in request.headers.items())
        )
        try:
            opened = Opened()
            events = self._core.generate(oreq.generation, deadline - time.perf_counter(), opened)
            async with contextlib.aclosing(events):
                try:
                    first = await anext(events)
                except ServiceError as err:
                    return error_response(err, oreq, ids)
                except StopAsyncIteration:
                    return error_response(Internal("empty generation"), oreq, ids)
                created = arrived if opened.created is None else opened.created
                shapes = Shapes(oreq, int(created))
                if oreq.stream:
                    return await self._stream(
                        request, oreq, ids, shapes, first, events, resume_at, deadline
                    )
                return await self._collect(oreq, ids, shapes, first, events)
        finally:
            otel_context.detach(token)

    async def _collect(
        self,
        oreq: OpenAIRequest,
        ids: RequestIds,
        shapes: Shapes,
        first: Event,
        events: AsyncIterator[Event],
    ) -> web.Response:
        parts: list[str] = []
        done: Completion | None = None

        def take(ev: Event) -> None:
            nonlocal done
            if isinstance(ev, Completion):
                done = ev
            else:
                parts.append(ev.text)

        take(first)
        try:
            async for ev in events:
                take(ev)
        except ServiceError as err:
            return error_response(err, oreq, ids)
        if done is None:
            return error_response(Internal("generation ended without completion"), oreq, ids)
        return _json_response(
            200, shapes.response("".join(parts), done), {REQUEST_ID_HEADER: ids.echo}
        )

    async def _stream(
        self,
        request: web.Request,
        oreq: OpenAIRequest,
        ids: RequestIds,
        shapes: Shapes,
        first: Event,
        events: AsyncIterator[Event],
        resume_at: ResumeAt | None,
        deadline: float,
    ) -> web.StreamResponse:
        """A client that takes no event for a grace past the request's `deadline` is given up
        on (`stall.py`): its connection is dropped, and the caller's leaving closes the
        generation (its lease and slots freed)."""
        resp = web.StreamResponse(
            status=200,
            headers={
                "Content-Type": "text/event-stream; charset=utf-8",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",
                REQUEST_ID_HEADER: ids.echo,
            },
        )
        await resp.prepare(request)
        gen = oreq.generation
        event_ids = EventIds(resume_at) if gen.keyed else None
        stall = ClientStall(deadline)
        try:
            async with stall:
                if gen.resume_from is None:
                    for chunk in shapes.opening_chunks():
                        await resp.write(sse(chunk, "0" if event_ids else None))
                try:
                    await self._write_event(resp, shapes, first, event_ids)
                    stall.taken()
                    async for ev in events:
                        await self._write_event(resp, shapes, ev, event_ids)
                        stall.taken()
                except ServiceError as err:
                    _, body = error_body(err, oreq, ids.param)
                    await resp.write(sse(body))
                except asyncio.CancelledError:
                    if self._cut:
                        await self._tell_cut(resp, oreq)
                    raise
                except ConnectionError:
                    raise  # the client went away (a write to its closing transport): below
                except Exception:
                    # A bug, not a refusal: the headers are sent, so the stream ends with an error
                    # event (the middleware's 500 would be a second response inside this body).
                    log.exception("generation failed mid-stream")
                    _, body = error_body(Internal("internal error"), oreq)
                    await resp.write(sse(body))
                else:
                    await resp.write(SSE_DONE)
                await resp.write_eof()
        except ConnectionError:
            # The client went away: leaving closes the event stream (aclosing), which cancels
            # the generation.
            log.info("client disconnected mid-stream")
        except TimeoutError:
            if not stall.expired():
                raise
            # Nothing taken for the grace past the deadline: the connection is dropped (a close
            # would wait for the unread bytes to flush); leaving closes the generation
            # (aclosing), freeing its lease and slots.
            log.warning("client did not read its stream by its deadline: dropped")
            if request.transport is not None:
                request.transport.abort()
        return resp

    @staticmethod
    async def _tell_cut(resp: web.StreamResponse, oreq: OpenAIRequest) -> None:
        """A stream the drain cut ends with an error event (a client sees why, and when to
        send it again: to another gateway, with its id to continue a keyed one), not a
        truncated body. Bounded: the client may not be reading."""
        cut = Unavailable(
            "the gateway stopped before the generation ended; send the request again",
            retry_after_s=DRAINING_RETRY_AFTER_S,
        )
        _, body = error_body(cut, oreq)
        with contextlib.suppress(Exception):
            async with asyncio.timeout(CUT_WRITE_TIMEOUT_S):
                await resp.write(sse(body))
                await resp.write_eof()

    @staticmethod
    async def _write_event(
        resp: web.StreamResponse, shapes: Shapes, ev: Event, ids: EventIds | None
    ) -> None:
        """Deltas without text (a character still incomplete) are not sent: the next one's
        event id covers their tokens."""
        if isinstance(ev, Delta):
            if ev.token_ids:
                event_id = None if ids is None else ids.reached(ev.end)
                if ev.text:
                    await resp.write(sse(shapes.text_chunk(ev.text), event_id))
                return
            chunks = [shapes.text_chunk(ev.text)] if ev.text else []
        else:
            chunks = shapes.closing_chunks(ev)
        for chunk in chunks:
            if ids is None:
                await resp.write(sse(chunk))
            elif (event_id := ids.after()) is not None:
                await resp.write(sse(chunk, event_id))
