"""The OpenAI HTTP front on a real aiohttp server (port 0) over the real core, with in-process
fakes of admission and the engine: status codes and headers, SSE framing, errors after
the first token, deadlines, and client disconnects."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web
from prometheus_client import REGISTRY

from llmmesh.common import metric_names as names
from llmmesh.common.errors import Reason, ResourceExhausted, ServiceError
from services.gateway.admission import Outcome
from services.gateway.auth import Authenticator, TenantsFile, hash_key
from services.gateway.core import GatewayCore
from services.gateway.errors import InvalidRequest, NoReplica, OrchestratorUnavailable
from services.gateway.http import OpenAIHttpFront, ResumeAt, parse_resume, parse_timeout
from services.gateway.models import ServedModel
from services.gateway.resume import Clock
from services.gateway.settings import GatewaySettings, ModelSettings
from services.gateway.triton_stream import EngineChunk, EngineRequest, TritonStreamError
from tests.gateway.conftest import MODEL, FakeAdmission


class ScriptedEngine:
    """Yields the given token ids one chunk each; `hold` keeps the stream open (until cancelled)
    after them, `fail` raises a replica fault after them."""

    def __init__(
        self, ids: list[int], *, hold: bool = False, fail: bool = False, bug: bool = False
    ):
        self.ids = ids
        self.hold = hold
        self.fail = fail
        self.bug = bug  # raise an unexpected error (not a ServiceError) after the ids
        self.requests: list[tuple[EngineRequest, float | None]] = []
        self.started = asyncio.Event()
        self.closed = asyncio.Event()

    async def stream(
        self,
        address: str,
        authority: str,
        request: EngineRequest,
        *,
        timeout_s: float | None,
        metadata: Any = (),
    ) -> AsyncGenerator[EngineChunk, None]:
        self.requests.append((request, timeout_s))
        self.started.set()
        try:
            for t in self.ids:
                yield EngineChunk([t], False)
            if self.fail:
                raise TritonStreamError("connection reset", replica_fault=True)
            if self.bug:
                raise ValueError("bytes length not a multiple of item size")
            if self.hold:
                await asyncio.Event().wait()
            yield EngineChunk([], True)
        finally:
            self.closed.set()


@pytest.fixture(scope="module")
def model(tokenizer_path: Path) -> ServedModel:
    return ServedModel.load(ModelSettings(name=MODEL, tokenizer_path=tokenizer_path))


class Front:
    def __init__(self, front: OpenAIHttpFront, orch: FakeAdmission):
        self.front = front
        self.orch = orch
        self.url = f"http://127.0.0.1:{front.port}"


@pytest_asyncio.fixture(loop_scope="session")
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


async def serve(
    model: ServedModel,
    engine: ScriptedEngine,
    orch: FakeAdmission | None = None,
    auth: Authenticator | None = None,
) -> Front:
    orch = orch or FakeAdmission()
    settings = GatewaySettings(models=[model.settings], http_port=0, drain_seconds=5)
    core = GatewayCore(settings, [model], orch, engine, 32, auth)
    front = OpenAIHttpFront(core, settings)
    await front.start()
    return Front(front, orch)


def body(**kw: Any) -> dict[str, Any]:
    return {"model": MODEL, "prompt": "Hello", **kw}


async def sse_events(resp: aiohttp.ClientResponse) -> list[str]:
    raw = (await resp.read()).decode()
    assert raw.endswith("\n\n")
    events = raw.split("\n\n")[:-1]
    assert all(e.startswith("data: ") for e in events)
    return [e.removeprefix("data: ") for e in events]


async def test_completion_round_trip(model: ServedModel, session: aiohttp.ClientSession) -> None:
    ids = model.encode(" one two")
    f = await serve(model, ScriptedEngine(ids))
    try:
        async with session.post(f"{f.url}/v1/completions", json=body(max_tokens=len(ids))) as r:
            assert r.status == 200
            assert r.headers["x-request-id"]
            data = await r.json()
        assert data["choices"][0]["text"] == model.decode(ids)
        assert data["usage"]["completion_tokens"] == len(ids)
    finally:
        await f.front.stop()


async def test_sse_framing(model: ServedModel, session: aiohttp.ClientSession) -> None:
    ids = model.encode(" one two three")
    f = await serve(model, ScriptedEngine(ids))
    try:
        req = body(max_tokens=len(ids), stream=True, stream_options={"include_usage": True})
        async with session.post(f"{f.url}/v1/completions", json=req) as r:
            assert r.status == 200
            assert r.headers["Content-Type"].startswith("text/event-stream")
            events = await sse_events(r)
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == model.decode(ids)
        assert chunks[-1]["choices"] == []
        assert chunks[-1]["usage"]["completion_tokens"] == len(ids)
    finally:
        await f.front.stop()


@pytest.mark.parametrize("stream", [False, True])
async def test_admission_rejection_is_429_with_retry_after(
    model: ServedModel, session: aiohttp.ClientSession, stream: bool
) -> None:
    orch = FakeAdmission(
        reject=ResourceExhausted("queue full", retry_after_s=2.4, reason=Reason.QUEUE_FULL)
    )
    f = await serve(model, ScriptedEngine([]), orch)
    try:
        async with session.post(f"{f.url}/v1/completions", json=body(stream=stream)) as r:
            assert r.status == 429
            assert r.headers["Retry-After"] == "3"
            assert r.headers["retry-after-ms"] == "2400"
            err = (await r.json())["error"]
        assert err["type"] == "rate_limit_error"
        assert err["code"] == "rate_limit_exceeded"
    finally:
        await f.front.stop()


@pytest.mark.parametrize(
    "refusal",
    [
        NoReplica("admission: no ready replica", reason=Reason.NO_REPLICA),
        OrchestratorUnavailable("orchestrator: connection refused"),
    ],
)
async def test_no_replica_or_no_orchestrator_is_503(
    model: ServedModel, session: aiohttp.ClientSession, refusal: ServiceError
) -> None:
    f = await serve(model, ScriptedEngine([]), FakeAdmission(reject=refusal))
    try:
        async with session.post(f"{f.url}/v1/chat/completions", json=chat_body()) as r:
            assert r.status == 503
            assert (await r.json())["error"]["type"] == "server_error"
    finally:
        await f.front.stop()


def chat_body(**kw: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **kw}


async def test_failure_after_first_token_is_an_error_event(
    model: ServedModel, session: aiohttp.ClientSession
) -> None:
    ids = model.encode(" one two")
    f = await serve(model, ScriptedEngine(ids, fail=True))
    try:
        async with session.post(
            f"{f.url}/v1/chat/completions", json=chat_body(stream=True, max_tokens=50)
        ) as r:
            assert r.status == 200
            events = await sse_events(r)
        assert "[DONE]" not in events
        err = json.loads(events[-1])["error"]
        assert err["type"] == "server_error"
        assert "replica" in err["message"]
    finally:
        await f.front.stop()


async def test_an_unexpected_error_mid_stream_ends_the_stream_with_an_error_event(
    model: ServedModel, session: aiohttp.ClientSession
) -> None:
    f = await serve(model, ScriptedEngine(model.encode(" one two"), bug=True))
    try:
        async with session.post(
            f"{f.url}/v1/completions", json=body(stream=True, max_tokens=50)
        ) as r:
            assert r.status == 200
            raw = (await r.read()).decode()
        assert "HTTP/1.1" not in raw  # no second response inside the body
        events = [e.removeprefix("data: ") for e in raw.strip().split("\n\n")]
        assert json.loads(events[0])["choices"][0]["text"]  # the tokens before the error
        assert "[DONE]" not in events
        assert json.loads(events[-1])["error"]["type"] == "server_error"
    finally:
        await f.front.stop()


async def test_failure_after_first_token_non_stream_is_503(
    model: ServedModel, session: aiohttp.ClientSession
) -> None:
    f = await serve(model, ScriptedEngine(model.encode(" one two"), fail=True))
    try:
        async with session.post(f"{f.url}/v1/completions", json=body(max_tokens=50)) as r:
            assert r.status == 503
    finally:
        await f.front.stop()


async def test_timeout_header_becomes_the_deadline(
    model: ServedModel, session: aiohttp.ClientSession
) -> None:
    engine = ScriptedEngine(model.encode(" x"))
    f = await serve(model, engine)
    longest = GatewaySettings().max_request_timeout_s
    try:
        # A "no timeout" value is cut to max_request_timeout_s: as a gRPC deadline it would
        # overflow and expire at once.
        for value, bound in (("2.5", 2.5), ("1e10", longest)):
            async with session.post(
                f"{f.url}/v1/completions",
                json=body(max_tokens=1),
                headers={"x-request-timeout": value},
            ) as r:
                assert r.status == 200
            (_, timeout_s) = engine.requests[-1]
            assert timeout_s is not None
            assert bound - 5 < timeout_s <= bound
            assert bound - 5 < f.orch.timeouts[-1] <= bound
    finally:
        await f.front.stop()


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        (None, True),
        ("1", True),
        ("0.25", True),
        ("0", False),
        ("-1", False),
        ("nan", False),
        ("inf", False),
        ("x", False),
    ],
)
def test_parse_timeout(value: str | None, ok: bool) -> None:
    if ok:
        parse_timeout(value)
    else:
        with pytest.raises(Exception, match="x-request-timeout"):
            parse_timeout(value)


@pytest.mark.parametrize("stream", [True, False])
async def test_client_disconnect_cancels_the_generation(
    model: ServedModel, session: aiohttp.ClientSession, stream: bool
) -> None:
    engine = ScriptedEngine(model.encode(" one"), hold=True)
    f = await serve(model, engine)
    try:
        url = f"{f.url}/v1/completions"
        if stream:
            resp = await session.post(url, json=body(max_tokens=100, stream=True))
            assert resp.status == 200
            first = await resp.content.readline()
            assert first.startswith(b"data: ")
            resp.close()  # drops the connection
        else:
            # No response before the generation ends: the client gives up while waiting.
            call = asyncio.create_task(session.post(url, json=body(max_tokens=100)))
            await asyncio.wait_for(engine.started.wait(), 10)
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call
        await asyncio.wait_for(engine.closed.wait(), 10)
        [report] = await asyncio.wait_for(f.orch.wait_reports(1), 10)
        assert report.outcome is Outcome.CANCELLED
    finally:
        await f.front.stop()


async def test_stop_drains_an_in_flight_stream(
    model: ServedModel, session: aiohttp.ClientSession
) -> None:
    ids = model.encode(" one two three four")
    gate = asyncio.Event()

    f = await serve(model, GatedEngine(ids, gate))
    async with session.post(
        f"{f.url}/v1/completions", json=body(max_tokens=len(ids), stream=True)
    ) as r:
        assert r.status == 200
        assert (await r.content.readuntil(b"\n\n")).startswith(b"data: {")
        stopping = asyncio.create_task(f.front.stop())
        gate.set()
        events = await sse_events(r)
    await stopping
    assert events[-1] == "[DONE]"


async def test_stop_now_cuts_an_in_flight_stream_and_accounts_for_it(
    model: ServedModel, session: aiohttp.ClientSession
) -> None:
    """A second signal during the drain: the streams still running end now, reported as
    cancelled, before the gateway closes its clients (the drain would wait drain_seconds).
    The client reads why in an error event (UNAVAILABLE: send it again), not a body cut off."""
    ids = model.encode(" one two three four")
    gate = asyncio.Event()  # never set: the stream waits for ever after its first token

    f = await serve(model, GatedEngine(ids, gate))
    async with session.post(
        f"{f.url}/v1/completions", json=body(max_tokens=len(ids), stream=True)
    ) as r:
        assert (await r.content.readuntil(b"\n\n")).startswith(b"data: {")
        stopping = asyncio.create_task(f.front.stop())
        await asyncio.wait_for(f.front.stop_now(), 10)
        [report] = await asyncio.wait_for(f.orch.wait_reports(1), 10)
        assert report.outcome is Outcome.CANCELLED
        events = await asyncio.wait_for(sse_events(r), 10)
    await asyncio.wait_for(stopping, 10)
    error = json.loads(events[-1])["error"]
    assert error["type"] == "server_error"
    assert "send the request again" in error["message"]


async def test_a_stream_outlasting_the_drain_is_cut_and_accounted_for(
    model: ServedModel, session: aiohttp.ClientSession
) -> None:
    """aiohttp's shutdown waits its timeout, then cancels the handlers without waiting for
    them: a stream still running then had no report and no usage record before the gateway
    closed its clients. And while the drain lasts, a generation asked for on a kept-alive
    connection is refused (503), not started."""
    ids = model.encode(" one two three four")
    gate = asyncio.Event()  # never set

    orch = FakeAdmission()
    settings = GatewaySettings(models=[model.settings], http_port=0, drain_seconds=0.5)
    core = GatewayCore(settings, [model], orch, GatedEngine(ids, gate), 32)
    front = OpenAIHttpFront(core, settings)
    await front.start()
    url = f"http://127.0.0.1:{front.port}"
    async with (
        aiohttp.ClientSession() as own,
        own.post(f"{url}/v1/completions", json=body(max_tokens=len(ids), stream=True)) as r,
    ):
        assert (await r.content.readuntil(b"\n\n")).startswith(b"data: {")
        async with own.get(f"{url}/health") as h:  # a second connection, kept alive
            assert h.status == 200
        stopping = asyncio.create_task(front.stop())
        async with own.post(f"{url}/v1/completions", json=body(max_tokens=1)) as late:
            assert late.status == 503
            assert late.headers["Retry-After"] == "1"
            assert late.headers["x-request-id"]
        await asyncio.wait_for(stopping, 10)
        [report] = orch.reports
        assert report.outcome is Outcome.CANCELLED
    assert len(orch.admits) == 1  # the late request was never admitted


class GatedEngine(ScriptedEngine):
    """Streams the first token, then waits for `gate` before the others."""

    def __init__(self, ids: list[int], gate: asyncio.Event) -> None:
        super().__init__(ids)
        self.gate = gate

    async def stream(self, *args: Any, **kw: Any) -> AsyncGenerator[EngineChunk, None]:
        inner = super().stream(*args, **kw)
        async for i, chunk in _enumerate(inner):
            if i == 1:
                await self.gate.wait()
            yield chunk


async def _enumerate(
    it: AsyncGenerator[EngineChunk, None],
) -> AsyncIterator[tuple[int, EngineChunk]]:
    i = 0
    async for x in it:
        yield i, x
        i += 1


def acme_auth(**limits: int) -> Authenticator:
    return Authenticator(
        TenantsFile.model_validate(
            {"tenants": [{"name": "acme", "api_keys_sha256": [hash_key("sk-acme")], **limits}]}
        )
    )


@pytest.mark.parametrize(("authorization", "status"), [(None, 401), ("Bearer sk-acme", 400)])
async def test_a_prompt_beyond_the_context_is_refused_by_its_count_after_authentication(
    model: ServedModel, session: aiohttp.ClientSession, authorization: str | None, status: int
) -> None:
    # 8192 ids (the model's context) and a string after them: read item by item, the prompt
    # would be refused as a batch; by its count, as beyond the context, once the caller is known.
    f = await serve(model, ScriptedEngine(model.encode(" x")), auth=acme_auth())
    headers = {"Authorization": authorization} if authorization else {}
    try:
        async with session.post(
            f"{f.url}/v1/completions", json=body(prompt=[1] * 8192 + ["x"]), headers=headers
        ) as r:
            assert r.status == status
            err = (await r.json())["error"]
        expected = "invalid_api_key" if status == 401 else "context_length_exceeded"
        assert err["code"] == expected
        assert f.orch.admits == []
    finally:
        await f.front.stop()


@pytest.mark.parametrize("authorization", [None, "Bearer wrong", "Basic c2stYWNtZQ=="])
async def test_missing_or_bad_key_is_401(
    model: ServedModel, session: aiohttp.ClientSession, authorization: str | None
) -> None:
    f = await serve(model, ScriptedEngine(model.encode(" x")), auth=acme_auth())
    headers = {"Authorization": authorization} if authorization else {}
    try:
        for method, path, payload in (
            ("POST", "/v1/completions", body(max_tokens=1)),
            ("POST", "/v1/chat/completions", chat_body(max_tokens=1, stream=True)),
            # Answered before the body is read: not a 400 about the body.
            ("POST", "/v1/completions", {}),
            ("POST", "/v1/chat/completions", "not json"),
            ("POST", "/v1/completions", body(n=2)),
            ("GET", "/v1/models", None),
            ("GET", f"/v1/models/{MODEL}", None),
        ):
            data = payload if isinstance(payload, str) else None
            json_ = None if isinstance(payload, str) else payload
            async with session.request(
                method, f"{f.url}{path}", json=json_, data=data, headers=headers
            ) as r:
                assert r.status == 401, path
                assert r.headers["WWW-Authenticate"] == "Bearer"
                err = (await r.json())["error"]
                assert (err["type"], err["code"]) == ("invalid_request_error", "invalid_api_key")
        assert f.orch.admits == []
    finally:
        await f.front.stop()


async def test_tenant_over_its_limit_gets_429_with_ratelimit_headers(
    model: ServedModel, session: aiohttp.ClientSession
) -> None:
    engine = ScriptedEngine(model.encode(" x"))
    f = await serve(model, engine, auth=acme_auth(requests_per_minute=2, tokens_per_minute=1000))
    headers = {"Authorization": "Bearer sk-acme"}
    try:
        for _ in range(2):
            async with session.post(
                f"{f.url}/v1/completions", json=body(max_tokens=1), headers=headers
            ) as r:
                assert r.status == 200
        async with session.post(
            f"{f.url}/v1/completions", json=body(max_tokens=1), headers=headers
        ) as r:
            assert r.status == 429
            assert int(r.headers["Retry-After"]) >= 1
            assert 0 < int(r.headers["retry-after-ms"]) <= 30_000
            assert r.headers["x-ratelimit-limit-requests"] == "2"
            assert r.headers["x-ratelimit-remaining-requests"] == "0"
            assert r.headers["x-ratelimit-reset-requests"].endswith("s")
            assert r.headers["x-ratelimit-limit-tokens"] == "1000"
            err = (await r.json())["error"]
            assert (err["type"], err["code"]) == ("rate_limit_error", "rate_limit_exceeded")
        assert [a.tenant for a in f.orch.admits] == ["acme", "acme"]
    finally:
        await f.front.stop()


async def test_a_prompt_over_the_whole_tokens_per_minute_limit_is_not_to_be_retried(
    model: ServedModel, session: aiohttp.ClientSession
) -> None:
    """No wait makes it fit: no Retry-After, and x-should-retry: false (OpenAI's clients
    retry every other 429)."""
    engine = ScriptedEngine(model.encode(" x"))
    f = await serve(model, engine, auth=acme_auth(tokens_per_minute=3))
    headers = {"Authorization": "Bearer sk-acme"}
    try:
        req = body(prompt=" one two three four five six", max_tokens=1)
        async with session.post(f"{f.url}/v1/completions", json=req, headers=headers) as r:
            assert r.status == 429
            assert r.headers["x-should-retry"] == "false"
            assert "Retry-After" not in r.headers
            assert "exceeds the tokens-per-minute limit" in (await r.json())["error"]["message"]
        assert not engine.requests
    finally:
        await f.front.stop()


# -- idempotency keys and SSE resume --------------------------------------------------------


class WallClock:
    """A wall clock the test moves."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def serve_with(
    model: ServedModel,
    engine: ScriptedEngine,
    wall_clock: Clock = time.time,
    **settings: Any,
) -> Front:
    orch = FakeAdmission()
    s = GatewaySettings(models=[model.settings], http_port=0, drain_seconds=5, **settings)
    core = GatewayCore(s, [model], orch, engine, 32, wall_clock=wall_clock)
    front = OpenAIHttpFront(core, s)
    await front.start()
    return Front(front, orch)


def split_events(raw: str) -> list[tuple[str | None, str]]:
    out: list[tuple[str | None, str]] = []
    for event in raw.split("\n\n")[:-1]:
        lines = event.split("\n")
        event_id = lines[0].removeprefix("id: ") if lines[0].startswith("id: ") else None
        out.append((event_id, lines[-1].removeprefix("data: ")))
    return out


def position(event_id: str) -> tuple[int, int]:
    """An event id as (token offset, events without tokens after it)."""
    offset, _, k = event_id.partition(".")
    return int(offset), int(k or 0)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        ("0", ResumeAt(0)),
        ("17", ResumeAt(17)),
        (" 5 ", ResumeAt(5)),
        ("5.1", ResumeAt(5, 1)),
        ("5.2", ResumeAt(5, 2)),
        ("-1", "err"),
        ("x", "err"),
        ("1" * 11, "err"),
        ("5.", "err"),
        ("5.0", "err"),
        (".1", "err"),
        ("5.1.1", "err"),
        ("5.x", "err"),
    ],
)
def test_parse_resume(value: str | None, expected: ResumeAt | str | None) -> None:
    if expected == "err":
        with pytest.raises(InvalidRequest) as info:
            parse_resume(value)
        assert info.value.field == "resume_from"
    else:
        assert parse_resume(value) == expected


@pytest.mark.parametrize("header", ["x-request-id", "Idempotency-Key"])
async def test_keyed_stream_has_event_ids_and_resumes_from_last_event_id(
    model: ServedModel, session: aiohttp.ClientSession, header: str
) -> None:
    ids = model.encode(" one two three four five")
    engine = ScriptedEngine(ids)
    clock = WallClock(1_700_000_000.9)
    f = await serve_with(model, engine, clock)
    try:
        url = f"{f.url}/v1/completions"
        req = body(max_tokens=len(ids), stream=True)
        async with session.post(url, json=req, headers={header: "k-1"}) as r:
            assert r.headers["x-request-id"] == "k-1"
            full = split_events((await r.read()).decode())
        clock.now += 1.0  # the resume comes in another second
        assert full[-1] == (None, "[DONE]")
        positions = [position(e) for e, _ in full if e is not None and e != "0"]
        assert positions == sorted(positions)
        assert len(set(positions)) == len(positions)  # "0" (opening chunks) aside, one each
        assert positions[-1] == (len(ids), 1)  # the closing chunk, after the last token
        cut = full[1][0]
        assert cut is not None
        resumed_headers = {header: "k-1", "Last-Event-ID": cut}
        async with session.post(url, json=req, headers=resumed_headers) as r:
            rest = split_events((await r.read()).decode())
        assert rest == full[2:]
        # Every chunk, original or resumed, is of one completion: one id, one creation time.
        chunks = [json.loads(data) for _, data in full + rest if data != "[DONE]"]
        assert {(c["id"], c["created"]) for c in chunks} == {("cmpl-k-1", 1_700_000_000)}
        assert len(engine.requests) == 1
    finally:
        await f.front.stop()


async def test_a_resume_after_the_tail_text_does_not_send_it_again(
    model: ServedModel, session: aiohttp.ClientSession
) -> None:
    # A stop string holds text back; the end of the sequence releases it as an event without
    # tokens, at the last token's offset: each event still has its own id.
    ids = [*model.encode(" one two thr"), *model.encode("ee")]
    f = await serve_with(model, ScriptedEngine([*ids, model.end_id]))
    try:
        url = f"{f.url}/v1/completions"
        # With usage, the closing chunks are two (finish, usage): each its own id too.
        req = body(max_tokens=50, stream=True, stop=["xyz"], stream_options={"include_usage": True})
        async with session.post(url, json=req, headers={"Idempotency-Key": "k-t"}) as r:
            full = split_events((await r.read()).decode())
        chunks = [json.loads(data) for _, data in full if data != "[DONE]"]
        assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == " one two three"
        assert chunks[-1]["usage"]["completion_tokens"] == len(ids)
        numbered = [e for e, _ in full if e is not None and e != "0"]  # "0": opening chunks
        assert len(set(numbered)) == len(numbered)
        for i, (event_id, _) in enumerate(full[:-1]):
            if event_id is None or event_id == "0":
                continue
            headers = {"Idempotency-Key": "k-t", "Last-Event-ID": event_id}
            async with session.post(url, json=req, headers=headers) as r:
                rest = split_events((await r.read()).decode())
            assert rest == full[i + 1 :], event_id  # exactly what came after it, once
    finally:
        await f.front.stop()


async def test_x_request_id_is_no_key_when_the_setting_is_off(
    model: ServedModel, session: aiohttp.ClientSession
) -> None:
    ids = model.encode(" one two")
    engine = ScriptedEngine(ids)
    f = await serve_with(model, engine, http_request_id_is_key=False)
    try:
        url = f"{f.url}/v1/completions"
        for prompt in ("Hello", "Other"):  # another body under the same id is no conflict
            req = body(prompt=prompt, max_tokens=len(ids), stream=True)
            async with session.post(url, json=req, headers={"x-request-id": "envoy-1"}) as r:
                assert r.status == 200
                assert r.headers["x-request-id"] == "envoy-1"
                assert (await r.read()).startswith(b"data: ")  # no event ids
        assert len(engine.requests) == 2
        async with session.post(
            url, json=body(max_tokens=2), headers={"x-request-id": "envoy-1", "Last-Event-ID": "1"}
        ) as r:
            assert r.status == 400
            assert (await r.json())["error"]["param"] == "last-event-id"
    finally:
        await f.front.stop()


async def test_a_resume_of_a_non_streaming_request_is_400(
    model: ServedModel, session: aiohttp.ClientSession
) -> None:
    """Not a completion cut at the resume point, its usage counting what it left out."""
    ids = model.encode(" one two three")
    engine = ScriptedEngine(ids)
    f = await serve_with(model, engine)
    try:
        url = f"{f.url}/v1/completions"
        headers = {"Idempotency-Key": "k-r"}
        async with session.post(url, json=body(max_tokens=len(ids)), headers=headers) as r:
            assert r.status == 200
        for header in ("Last-Event-ID", "x-resume-from"):
            async with session.post(
                url, json=body(max_tokens=len(ids)), headers={**headers, header: "1"}
            ) as r:
                assert r.status == 400
                assert (await r.json())["error"]["param"] == "last-event-id"
        assert len(engine.requests) == 1
    finally:
        await f.front.stop()


async def test_conflicting_body_is_409(model: ServedModel, session: aiohttp.ClientSession) -> None:
    ids = model.encode(" one")
    f = await serve_with(model, ScriptedEngine(ids))
    try:
        url = f"{f.url}/v1/completions"
        headers = {"Idempotency-Key": "k-2"}
        async with session.post(url, json=body(max_tokens=1), headers=headers) as r:
            assert r.status == 200
        async with session.post(url, json=body(max_tokens=1, seed=3), headers=headers) as r:
            assert r.status == 409
            assert r.headers["x-should-retry"] == "false"  # OpenAI's clients retry 409s
            err = (await r.json())["error"]
        assert err["code"] == "request_id_conflict"
        assert err["type"] == "invalid_request_error"
    finally:
        await f.front.stop()


async def test_a_keyed_request_answers_with_the_clients_own_request_id(
    model: ServedModel, session: aiohttp.ClientSession
) -> None:
    """The idempotency key is the generation's id; the x-request-id a client (or its proxy)
    sent is what it correlates by, on success and refusal alike, and an error about the key
    names the header the key came in."""
    ids = model.encode(" one")
    f = await serve_with(model, ScriptedEngine(ids))
    try:
        url = f"{f.url}/v1/completions"
        headers = {"Idempotency-Key": "k-3", "x-request-id": "trace-1"}
        for stream in (False, True):
            req = body(max_tokens=1, stream=stream)
            async with session.post(url, json=req, headers=headers) as r:
                assert r.status == 200
                assert r.headers["x-request-id"] == "trace-1"
        async with session.post(url, json=body(max_tokens=1, seed=3), headers=headers) as r:
            assert r.status == 409
            assert r.headers["x-request-id"] == "trace-1"
            err = (await r.json())["error"]
        assert err["param"] == "idempotency-key"
        async with session.post(url, json=body(max_tokens=1), headers={"x-request-id": "k-4"}) as r:
            assert r.status == 200
        async with session.post(
            url, json=body(max_tokens=1, seed=3), headers={"x-request-id": "k-4"}
        ) as r:
            assert r.status == 409
            assert (await r.json())["error"]["param"] == "x-request-id"
    finally:
        await f.front.stop()


def _requests_counted(model: str, outcome: str) -> float:
    labels = {"model": model, "outcome": outcome, "tenant": ""}
    return REGISTRY.get_sample_value(names.GATEWAY_REQUESTS, labels) or 0.0


@pytest.mark.parametrize(
    ("payload", "headers", "status"),
    [
        (b"{not json", {}, 400),
        (json.dumps(body(prompt="x" * 70_000)).encode(), {}, 413),  # over http_max_body_bytes
        (json.dumps(body()).encode(), {"X-Request-Id": "caf\u00e9"}, 400),
        (json.dumps(body(prompt=[1] * 8192)).encode(), {}, 400),  # beyond the context, by count
        (json.dumps(body()).encode(), {"X-Request-Timeout": "soon"}, 400),
    ],
)
async def test_a_request_refused_before_generation_is_counted_once(
    model: ServedModel,
    session: aiohttp.ClientSession,
    payload: bytes,
    headers: dict[str, str],
    status: int,
) -> None:
    settings = GatewaySettings(models=[model.settings], http_port=0, http_max_body_bytes=65_536)
    core = GatewayCore(settings, [model], FakeAdmission(), ScriptedEngine([]), 32)
    front = OpenAIHttpFront(core, settings)
    await front.start()
    before = _requests_counted("unknown", "invalid")
    try:
        async with session.post(
            f"http://127.0.0.1:{front.port}/v1/completions",
            data=payload,
            headers={"Content-Type": "application/json", **headers},
        ) as r:
            assert r.status == status
            assert r.headers["x-request-id"].isprintable()
    finally:
        await front.stop()
    assert _requests_counted("unknown", "invalid") == before + 1


async def test_an_unauthenticated_caller_learns_nothing_about_its_request_id(
    model: ServedModel, session: aiohttp.ClientSession
) -> None:
    f = await serve(model, ScriptedEngine(model.encode(" x")), auth=acme_auth())
    try:
        headers = {"Authorization": "Bearer wrong", "Idempotency-Key": "caf\u00e9"}
        async with session.post(f"{f.url}/v1/completions", json=body(), headers=headers) as r:
            assert r.status == 401
        headers["Authorization"] = "Bearer sk-acme"
        async with session.post(f"{f.url}/v1/completions", json=body(), headers=headers) as r:
            assert r.status == 400
            assert (await r.json())["error"]["param"] == "idempotency-key"
    finally:
        await f.front.stop()


async def test_an_unkeyed_completion_is_stamped_by_the_injected_wall_clock(
    model: ServedModel, session: aiohttp.ClientSession
) -> None:
    ids = model.encode(" one two")
    f = await serve_with(model, ScriptedEngine(ids), WallClock(1_600_000_000.5))
    try:
        async with session.post(f"{f.url}/v1/completions", json=body(max_tokens=len(ids))) as r:
            assert r.status == 200
            answer = await r.json()
        assert answer["created"] == 1_600_000_000
    finally:
        await f.front.stop()


async def test_a_client_that_stops_reading_is_given_up_on_after_its_deadline(
    model: ServedModel, session: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its connection open, its socket full: without a bound, its generation's lease and slots
    would stay held for as long as the client keeps the connection."""
    written = 0
    original = web.StreamResponse.write

    async def stuck(self: web.StreamResponse, data: bytes) -> None:
        nonlocal written
        written += 1
        if written > 1:
            await asyncio.Event().wait()  # as a write to a client that reads no more
        await original(self, data)

    monkeypatch.setattr(web.StreamResponse, "write", stuck)
    ids = model.encode(" one two three four")
    f = await serve(model, ScriptedEngine(ids, hold=True))
    try:
        async with session.post(
            f"{f.url}/v1/completions",
            json=body(max_tokens=len(ids), stream=True),
            headers={"x-request-timeout": "0.2"},
        ) as r:
            assert r.status == 200
            # The deadline (0.2 s) plus the grace (stall.py, 1 s): well within 10 s.
            [report] = await asyncio.wait_for(f.orch.wait_reports(1), 10)
            assert report.outcome is Outcome.CANCELLED
            with contextlib.suppress(aiohttp.ClientError):
                await r.read()  # the connection was closed
    finally:
        await f.front.stop()
