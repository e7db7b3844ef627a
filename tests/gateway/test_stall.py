"""ClientStall: nothing before the request's deadline; past it, a grace from the last event
the client took."""

from __future__ import annotations

import asyncio
import time

import pytest

from services.gateway import stall
from services.gateway.stall import ClientStall

GRACE = 1.0


@pytest.fixture(autouse=True)
def short_grace(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stall, "STALLED_CLIENT_GRACE_S", GRACE)


async def test_a_client_taking_nothing_is_given_up_on_a_grace_past_the_deadline() -> None:
    bound = ClientStall(time.perf_counter() + 0.05)
    start = time.perf_counter()
    with pytest.raises(TimeoutError):
        async with bound:
            await asyncio.Event().wait()
    assert bound.expired()
    assert time.perf_counter() - start >= 0.05 + GRACE - 0.01


async def test_a_client_still_taking_events_past_the_deadline_is_not() -> None:
    """A keyed generation's subscriber may be catching up on events generated before it."""
    bound = ClientStall(time.perf_counter() + 0.02)
    async with bound:
        for _ in range(15):  # 1.5 s in all (past deadline and grace), an event every 0.1 s
            await asyncio.sleep(GRACE / 10)  # the client's pace
            bound.taken()
    assert not bound.expired()


async def test_another_timeout_error_is_not_the_client_s() -> None:
    bound = ClientStall(time.perf_counter() + 10)
    with pytest.raises(TimeoutError):
        async with bound:
            raise TimeoutError
    assert not bound.expired()
