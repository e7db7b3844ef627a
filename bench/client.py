"""The gateway's gRPC API (`llmmesh.gateway.v1.GatewayService/Generate`) as a replay `Client`."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc

from bench.replay import Chunk, Final, Refused, RequestError
from bench.workloads import Request
from llmmesh.common.errors import RETRY_AFTER_KEY
from llmmesh.generated.gateway.v1 import gateway_pb2 as pb
from llmmesh.generated.gateway.v1 import gateway_pb2_grpc as pb_grpc
from llmmesh.localmesh import MODEL_NAME

_PRIORITIES = {
    "interactive": pb.PRIORITY_INTERACTIVE,
    "standard": pb.PRIORITY_STANDARD,
    "batch": pb.PRIORITY_BATCH,
}
_MAX_MESSAGE = 64 * 1024 * 1024


class GatewayClient:
    """Streams one request over a shared channel. `meta["priority"]` (interactive, standard,
    batch) sets the request's priority class; unspecified otherwise."""

    def __init__(
        self,
        address: str,
        *,
        model: str = MODEL_NAME,
        timeout_s: float = 600.0,
        keyed: bool = True,
    ) -> None:
        """`keyed`: send the request id (the gateway then keeps the generation resumable);
        False: unkeyed requests, as most clients send them."""
        self.keyed = keyed
        self.address = address
        self.model = model
        self.timeout_s = timeout_s
        self._channel = grpc.aio.insecure_channel(
            address,
            options=[
                ("grpc.max_send_message_length", _MAX_MESSAGE),
                ("grpc.max_receive_message_length", _MAX_MESSAGE),
            ],
        )
        self._stub = pb_grpc.GatewayServiceStub(self._channel)

    async def wait_ready(self, timeout_s: float = 30.0) -> None:
        await asyncio.wait_for(self._channel.channel_ready(), timeout_s)

    async def close(self) -> None:
        await self._channel.close(None)

    async def generate(
        self, request: Request, request_id: str
    ) -> AsyncIterator[Chunk | Final | Refused]:
        priority = _PRIORITIES.get(str(request.meta.get("priority", "")), pb.PRIORITY_UNSPECIFIED)
        msg = pb.GenerateRequest(
            model=self.model,
            token_ids=pb.TokenIds(ids=request.prompt_token_ids),
            sampling=pb.SamplingParams(max_tokens=request.max_tokens),
            priority=priority,
            request_id=request_id if self.keyed else "",
        )
        try:
            async for resp in self._stub.Generate(msg, timeout=self.timeout_s):
                event = resp.WhichOneof("event")
                if event == "delta":
                    yield Chunk(len(resp.delta.token_ids))
                elif event == "complete":
                    c = resp.complete
                    yield Final(
                        prompt_tokens=c.usage.prompt_tokens,
                        completion_tokens=c.usage.completion_tokens,
                        cached_prompt_tokens=c.usage.cached_prompt_tokens,
                        replica_id=c.replica_id,
                        queue_ms=c.timings.queue_ms,
                        finish_reason=pb.FinishReason.Name(c.finish_reason),
                    )
        except grpc.aio.AioRpcError as exc:
            raise RequestError(
                exc.code().name, exc.details() or "", retry_after_s(exc.trailing_metadata())
            ) from None


def retry_after_s(trailers: object) -> float | None:
    """The `retry-after` trailing metadata value (seconds), None when absent or malformed."""
    for key, value in trailers or ():  # type: ignore[attr-defined]
        if key == RETRY_AFTER_KEY:
            try:
                return float(value)
            except (TypeError, ValueError):
                return None
    return None
