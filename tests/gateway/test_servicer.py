"""The gRPC front: protobuf → domain conversion (`request_from_pb`), chat requests through a real
gRPC server, and ListModels."""

from __future__ import annotations

import asyncio
import gc
import logging
from pathlib import Path

import grpc
import pytest
from prometheus_client import REGISTRY

from llmmesh.common import metric_names as names
from llmmesh.generated.gateway.v1 import gateway_pb2 as pb
from llmmesh.generated.gateway.v1 import gateway_pb2_grpc as pb_grpc
from services.gateway.admission import Outcome
from services.gateway.core import ChatMessage, GatewayCore
from services.gateway.models import ServedModel
from services.gateway.servicer import GatewayServicer, request_from_pb
from services.gateway.settings import GatewaySettings
from tests.gateway.conftest import FakeAdmission, FakeEngine, chunk
from tests.gateway.grpc_front import (
    BARE_MODEL,
    BLOCK_SIZE,
    CHAT_MODEL,
    chat_and_bare_models,
    grpc_gateway,
)


@pytest.fixture(scope="module")
def models(tokenizer_path: Path) -> tuple[ServedModel, ServedModel]:
    return chat_and_bare_models(tokenizer_path)


def chat_request(model: str, *messages: tuple[str, str]) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        model=model,
        messages=pb.ChatMessages(messages=[pb.ChatMessage(role=r, content=c) for r, c in messages]),
        sampling=pb.SamplingParams(max_tokens=8),
    )


def test_messages_become_chat_messages_in_order() -> None:
    req = request_from_pb(chat_request(CHAT_MODEL, ("system", "Be brief."), ("user", "Hi")))
    assert list(req.messages or ()) == [
        ChatMessage("system", "Be brief."),
        ChatMessage("user", "Hi"),
    ]
    assert req.prompt_text is None
    assert req.prompt_ids is None


@pytest.mark.parametrize(
    "request_",
    [
        pb.GenerateRequest(model=CHAT_MODEL, text="Hi"),
        pb.GenerateRequest(model=CHAT_MODEL, token_ids=pb.TokenIds(ids=[1, 2])),
    ],
)
def test_raw_prompts_carry_no_messages(request_: pb.GenerateRequest) -> None:
    req = request_from_pb(request_)
    assert req.messages is None
    assert (req.prompt_text, req.prompt_ids) in (("Hi", None), (None, [1, 2]))


def test_an_empty_message_list_is_chat_not_a_missing_prompt() -> None:
    request = pb.GenerateRequest(model=CHAT_MODEL)
    request.messages.SetInParent()
    req = request_from_pb(request)
    assert req.messages is not None
    assert list(req.messages) == []


async def test_chat_prompt_is_the_rendered_template(
    models: tuple[ServedModel, ServedModel],
) -> None:
    chat, _ = models
    assert chat.chat_template is not None
    answer = chat.encode("Rayleigh scattering.")
    script = [chunk(*answer), chunk(chat.end_id, final=True)]
    request = chat_request(CHAT_MODEL, ("system", "S"), ("user", "Why is the sky blue?"))
    async with (
        grpc_gateway(models, [script]) as front,
        grpc.aio.insecure_channel(front.address) as ch,
    ):
        stub = pb_grpc.GatewayServiceStub(ch)
        responses = [r async for r in stub.Generate(request, timeout=10)]
    rendered = chat.chat_template.render(
        [{"role": "system", "content": "S"}, {"role": "user", "content": "Why is the sky blue?"}]
    )
    assert rendered.endswith("<|im_start|>assistant\n")
    assert list(front.engine.requests[0].input_ids) == chat.encode(rendered)
    text = "".join(r.delta.text for r in responses if r.HasField("delta"))
    assert text == "Rayleigh scattering."
    # The end id came alone: the last delta carries the finish (the proto's promise), without
    # tokens; every delta before it has tokens.
    deltas = [r.delta for r in responses if r.HasField("delta")]
    assert deltas[-1].finish_reason == pb.FINISH_REASON_STOP
    assert not deltas[-1].token_ids
    assert all(d.token_ids and not d.HasField("finish_reason") for d in deltas[:-1])
    complete = responses[-1].complete
    assert complete.usage.prompt_tokens == len(chat.encode(rendered))
    assert complete.finish_reason == pb.FINISH_REASON_STOP


@pytest.mark.parametrize(
    ("model", "messages", "details"),
    [
        (
            CHAT_MODEL,
            [("user", "ok"), ("tool", "x")],
            "messages[1].role: must be one of assistant, system, user",
        ),
        (CHAT_MODEL, [], "messages: must not be empty"),
        (CHAT_MODEL, [("user", "")] * 4097, "messages: at most 4096 messages"),
        (BARE_MODEL, [("user", "hi")], "messages: model 'bare' has no chat template"),
    ],
)
async def test_bad_chat_requests_are_invalid_argument_naming_the_field(
    models: tuple[ServedModel, ServedModel],
    model: str,
    messages: list[tuple[str, str]],
    details: str,
) -> None:
    request = chat_request(model, *messages)
    request.messages.SetInParent()
    async with grpc_gateway(models) as front, grpc.aio.insecure_channel(front.address) as ch:
        stub = pb_grpc.GatewayServiceStub(ch)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            [r async for r in stub.Generate(request, timeout=10)]
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (info.value.details() or "").startswith(details)
    assert front.engine.requests == []


async def test_an_oversized_prompt_is_refused_from_its_counts_before_it_is_converted(
    models: tuple[ServedModel, ServedModel], monkeypatch: pytest.MonkeyPatch
) -> None:
    def unreached(*_: object) -> None:
        raise AssertionError("the request was converted")

    monkeypatch.setattr("services.gateway.servicer.request_from_pb", unreached)
    request = chat_request(CHAT_MODEL, *[("user", "")] * 4097)
    async with grpc_gateway(models) as front, grpc.aio.insecure_channel(front.address) as ch:
        stub = pb_grpc.GatewayServiceStub(ch)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            [r async for r in stub.Generate(request, timeout=10)]
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (info.value.details() or "").startswith("messages: at most 4096 messages")


async def test_list_models_says_which_models_chat(
    models: tuple[ServedModel, ServedModel],
) -> None:
    async with grpc_gateway(models) as front, grpc.aio.insecure_channel(front.address) as ch:
        stub = pb_grpc.GatewayServiceStub(ch)
        listed = await stub.ListModels(pb.ListModelsRequest(), timeout=10)
    assert [(m.name, m.supports_chat) for m in listed.models] == [
        (CHAT_MODEL, True),
        (BARE_MODEL, False),
    ]
    assert listed.models[0].context_length == 256
    assert listed.models[0].max_completion_tokens == 64


def _requests_counted(model: str, outcome: str) -> float:
    labels = {"model": model, "outcome": outcome, "tenant": ""}
    return REGISTRY.get_sample_value(names.GATEWAY_REQUESTS, labels) or 0.0


async def test_a_request_refused_before_generation_is_counted_once(
    models: tuple[ServedModel, ServedModel],
) -> None:
    oversized = chat_request(CHAT_MODEL, *[("user", "")] * 4097).SerializeToString()
    undecodable = b"\x12\x01"  # field 2 (model) cut short
    before = (_requests_counted(CHAT_MODEL, "invalid"), _requests_counted("unknown", "invalid"))
    async with grpc_gateway(models) as front, grpc.aio.insecure_channel(front.address) as ch:
        generate = ch.unary_stream(
            "/llmmesh.gateway.v1.GatewayService/Generate",
            request_serializer=None,
            response_deserializer=pb.GenerateResponse.FromString,
        )
        for raw in (oversized, undecodable):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                [r async for r in generate(raw, timeout=10)]
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    after = (_requests_counted(CHAT_MODEL, "invalid"), _requests_counted("unknown", "invalid"))
    assert after == (before[0] + 1, before[1] + 1)


class BlockedWrites:
    """A ServicerContext whose client reads two messages, then stops reading: later writes
    wait (a full flow-control window) until the call is cancelled."""

    def __init__(self, time_remaining: float = 10.0) -> None:
        self.written: list[pb.GenerateResponse] = []
        self.blocked = asyncio.Event()
        self.aborted: grpc.StatusCode | None = None
        self._time_remaining = time_remaining

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return ()

    def time_remaining(self) -> float:
        return self._time_remaining

    def set_trailing_metadata(self, metadata: object) -> None:
        pass

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.aborted = code
        raise grpc.aio.AbortError()

    async def write(self, message: pb.GenerateResponse) -> None:
        if len(self.written) == 2:
            self.blocked.set()
            await asyncio.Event().wait()
        self.written.append(message)


async def test_a_stream_cancelled_while_it_writes_ends_in_its_own_task(
    models: tuple[ServedModel, ServedModel], caplog: pytest.LogCaptureFixture
) -> None:
    # The call is cancelled while a write waits (not while the engine is awaited): the
    # generation's generators are closed in that task, their lease reported. Left to the
    # collector, they were finalized in another task and context, and each span's detach of
    # its trace context logged an ERROR traceback (3 per cancelled request).
    engine = FakeEngine([[chunk(10 + i) for i in range(30)] + [chunk(2, final=True)]])
    admission = FakeAdmission()
    bare = models[1]
    core = GatewayCore(
        GatewaySettings(models=[bare.settings]), [bare], admission, engine, BLOCK_SIZE
    )
    context = BlockedWrites()
    request = pb.GenerateRequest(
        model=BARE_MODEL, token_ids=pb.TokenIds(ids=[5, 6, 7]), sampling=pb.SamplingParams()
    )
    with caplog.at_level(logging.ERROR):
        call = asyncio.create_task(GatewayServicer(core).Generate(request, context))  # type: ignore[arg-type]
        await context.blocked.wait()
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        # Reported before the cancelled call returned: in its own task.
        assert [r.outcome for r in admission.reports] == [Outcome.CANCELLED]
        gc.collect()
        await asyncio.sleep(0)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    await core.close()


async def test_a_resume_leaves_out_the_deltas_without_tokens_the_client_has(
    models: tuple[ServedModel, ServedModel],
) -> None:
    # A stop string holds the last characters back until the completion ends; they come in a
    # delta without tokens ending where the last delta with tokens did. resume_from alone
    # cannot tell whether the client got it; resume_events says it did.
    ids = [19556, 665, 28, 3289]  # "Hello there, friend"
    request = pb.GenerateRequest(
        model=BARE_MODEL,
        request_id="tail",
        token_ids=pb.TokenIds(ids=[5, 6, 7]),
        sampling=pb.SamplingParams(stop=["never in this text"]),
    )
    async with (
        grpc_gateway(models, [[*(chunk(i) for i in ids), chunk(final=True)]]) as front,
        grpc.aio.insecure_channel(front.address) as ch,
    ):
        stub = pb_grpc.GatewayServiceStub(ch)
        whole = [r async for r in stub.Generate(request, timeout=10)]
        deltas = [r.delta for r in whole if r.HasField("delta")]
        tail = deltas[-1]
        assert tail.text
        assert not tail.token_ids
        assert tail.offset == len(ids)
        request.resume_from = len(ids)
        again = [r async for r in stub.Generate(request, timeout=10)]
        assert [r.WhichOneof("event") for r in again] == ["delta", "complete"]  # the tail again
        assert again[0].delta == tail
        request.resume_events = 1
        had_tail = [r async for r in stub.Generate(request, timeout=10)]
        assert [r.WhichOneof("event") for r in had_tail] == ["complete"]
        assert had_tail[0].complete == whole[-1].complete
        request.ClearField("resume_from")
        with pytest.raises(grpc.aio.AioRpcError) as info:
            [r async for r in stub.Generate(request, timeout=10)]
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "resume_events" in (info.value.details() or "")
        assert len(front.engine.requests) == 1  # replayed, never generated again


async def test_a_client_that_stops_reading_is_given_up_on_after_its_deadline(
    models: tuple[ServedModel, ServedModel],
) -> None:
    """The request's deadline (here the client's; without one `request_timeout_s`, which grpc
    does not enforce) ends its generation and frees its lease even if the client keeps the
    call open without reading."""
    engine = FakeEngine([[chunk(10 + i) for i in range(30)] + [chunk(2, final=True)]])
    admission = FakeAdmission()
    bare = models[1]
    core = GatewayCore(
        GatewaySettings(models=[bare.settings]), [bare], admission, engine, BLOCK_SIZE
    )
    context = BlockedWrites(time_remaining=0.2)
    request = pb.GenerateRequest(
        model=BARE_MODEL, token_ids=pb.TokenIds(ids=[5, 6, 7]), sampling=pb.SamplingParams()
    )
    call = GatewayServicer(core).Generate(request, context)  # type: ignore[arg-type]
    with pytest.raises(grpc.aio.AbortError):
        # The deadline (0.2 s) plus the grace (stall.py, 1 s): well within 10 s.
        await asyncio.wait_for(call, 10)
    assert context.aborted == grpc.StatusCode.DEADLINE_EXCEEDED
    assert [r.outcome for r in admission.reports] == [Outcome.CANCELLED]
    await core.close()
