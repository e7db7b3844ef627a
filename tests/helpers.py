"""Shared test helpers."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

import grpc
import pytest


class ManualClock:
    """A clock that moves only when a test moves it (`t`)."""

    def __init__(self, t: float = 10.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


async def eventually(
    check: Callable[[], Awaitable[bool]], timeout_s: float = 15.0, what: str = ""
) -> None:
    """Poll a condition until it holds: the system under test converges asynchronously, and the
    test must not guess how long that takes."""
    deadline = time.monotonic() + timeout_s
    while not await check():
        if time.monotonic() > deadline:
            pytest.fail(f"condition not reached within {timeout_s}s: {what}")
        await asyncio.sleep(0.02)


def shared_head(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading items `a` and `b` have in common."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


@contextlib.asynccontextmanager
async def grpc_served(register: Callable[[grpc.aio.Server], None]) -> AsyncIterator[str]:
    """A grpc.aio server with the servicers `register` adds, on an ephemeral port of
    127.0.0.1; yields its address, stops it (no grace) on exit."""
    server = grpc.aio.server()
    register(server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(None)
