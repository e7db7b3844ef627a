"""A front's bound on a client that stops taking its stream's events.

A client that keeps its connection open but reads no more (a full socket, a full flow-control
window) would hold its generation, and with it a lease, a stream slot and a tenant slot, for as
long as it stays connected: grpc enforces only a client's own deadline, aiohttp's writes none.
The request's deadline ends its generation; past it, a client that takes no event for
`STALLED_CLIENT_GRACE_S` (a keyed generation's subscriber may still be catching up on what was
generated before it) is given up on.
"""

from __future__ import annotations

import asyncio
import time
from types import TracebackType
from typing import Final

STALLED_CLIENT_GRACE_S: Final = 1.0


class ClientStall:
    """`async with ClientStall(deadline):` around a front's writes (`deadline` in
    `time.perf_counter` time, `GatewayCore.deadline`), `taken()` after each: raises TimeoutError
    at the block's exit once no event was taken for `STALLED_CLIENT_GRACE_S` past the deadline
    (half of it at least); `expired()` tells that TimeoutError from any other."""

    def __init__(self, deadline: float) -> None:
        self._loop = asyncio.get_running_loop()
        self._deadline = self._loop.time() + (deadline - time.perf_counter())
        self._timeout = asyncio.timeout_at(self._deadline + STALLED_CLIENT_GRACE_S)

    async def __aenter__(self) -> ClientStall:
        await self._timeout.__aenter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._timeout.__aexit__(exc_type, exc, tb)

    def taken(self) -> None:
        """The client took an event: past the deadline, it has the grace again from now (once
        less than half of it is left: a timer each event would cost a replay's catch-up)."""
        now = self._loop.time()
        if now > self._deadline and not self._timeout.expired():
            when = self._timeout.when()
            if when is not None and when - now < STALLED_CLIENT_GRACE_S / 2:
                self._timeout.reschedule(now + STALLED_CLIENT_GRACE_S)

    def expired(self) -> bool:
        return self._timeout.expired()
