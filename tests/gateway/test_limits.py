"""Gateway limits on an injected clock: concurrency slots and their retry-after, the process
limit next to a tenant's, and the local fallback share of a shared rate limiter."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable

import pytest

from services.gateway.errors import GatewayOverloaded, RateLimited
from services.gateway.limits import ConcurrencyLimit, StreamLimits, TenantLimits
from tests.helpers import eventually


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# (limit, slots freed in the past second, callers refused just before, expected retry-after)
# retry-after = (1 + refusals/s) / slots freed/s, rates weighted over 5 s, within [0.2, 30].
@pytest.mark.parametrize(
    ("limit", "freed", "refused", "expected"),
    [
        (1, 0, 0, 30.0),  # nothing ever freed: the upper bound
        (2, 10, 0, 0.5),  # ~10 freed in 1 s -> rate ~1.8/s (5 s weighting) -> ~0.55 s
        (2, 10, 20, 2.8),  # 20 refused just before (~4/s): (1 + 4) / 1.8
        (2, 200, 0, 0.2),  # fast turnover: the lower bound
    ],
)
def test_concurrency_retry_after(limit: int, freed: int, refused: int, expected: float) -> None:
    clock = Clock()
    c = ConcurrencyLimit(limit, clock, GatewayOverloaded, (0.2, 30.0))
    for _i in range(freed):
        c.enter()
        c.leave()
        clock.now += 1.0 / freed if freed else 0
    for _ in range(limit):
        c.enter()
    for _ in range(refused):
        with pytest.raises(GatewayOverloaded):
            c.enter()
    with pytest.raises(GatewayOverloaded) as info:
        c.enter()
    assert info.value.retry_after_s == pytest.approx(expected, rel=0.2)
    assert c.held == limit  # refusals take nothing


def test_rates_decay_with_time() -> None:
    clock = Clock()
    c = ConcurrencyLimit(1, clock, GatewayOverloaded, (0.2, 30.0))
    for _ in range(10):
        c.enter()
        c.leave()
    fresh = c.retry_after_s()
    clock.now += 20  # four time constants: the rate slots free at is ~2% of what it was
    assert c.retry_after_s() == pytest.approx(min(fresh * math.exp(4), 30.0), rel=0.01)


@pytest.mark.parametrize(
    ("tenant_limit", "process_limit", "open_before", "error", "limit"),
    [
        (1, 5, 1, RateLimited, "concurrency"),  # the tenant's own limit first
        (5, 1, 1, GatewayOverloaded, None),  # the process is full
        (None, 2, 2, GatewayOverloaded, None),  # no tenant limit
        (2, 2, 1, None, None),  # room in both
    ],
)
def test_stream_limits_order_and_rollback(
    tenant_limit: int | None,
    process_limit: int,
    open_before: int,
    error: type[Exception] | None,
    limit: str | None,
) -> None:
    clock = Clock()
    tenant = TenantLimits("acme", None, None, clock, max_concurrent=tenant_limit)
    streams = StreamLimits(process_limit, clock)
    slots = [streams.enter(tenant) for _ in range(open_before)]
    if error is None:
        slots.append(streams.enter(tenant))
    else:
        with pytest.raises(error) as info:
            streams.enter(tenant)
        assert info.value.retry_after_s is not None  # type: ignore[attr-defined]
        if limit is not None:
            assert isinstance(info.value, RateLimited)
            assert info.value.limit == limit
    held = len(slots)
    assert streams.streams.held == held
    if tenant.concurrency is not None:
        assert tenant.concurrency.held == held  # a refusal by the process gives the tenant's back
    for s in slots:
        s.release()
        s.release()  # idempotent
    assert streams.streams.held == 0


def test_a_forced_slot_is_taken_over_the_limits_and_given_back() -> None:
    clock = Clock()
    tenant = TenantLimits("acme", None, None, clock, max_concurrent=1)
    streams = StreamLimits(1, clock)
    first = streams.enter(tenant)
    with pytest.raises(RateLimited):
        streams.enter(tenant)
    forced = streams.enter(tenant, force=True)  # a takeover: admitted where it began
    assert tenant.concurrency is not None
    assert (streams.streams.held, tenant.concurrency.held) == (2, 2)
    forced.release()
    first.release()
    assert (streams.streams.held, tenant.concurrency.held) == (0, 0)


class FakeShared:
    """A shared quota that admits everything, or (`up=False`) is unreachable."""

    def __init__(self) -> None:
        self.up = True
        self.admitted = 0
        self.charged = 0
        self.calls = 0  # charges and refunds

    async def admit(self, prompt_tokens: int) -> bool:
        if self.up:
            self.admitted += 1
        return self.up

    def charge(self, tokens: int) -> bool:
        self.calls += 1
        if self.up:
            self.charged += tokens
        return self.up

    def refund(self, prompt_tokens: int) -> bool:
        return self.charge(-prompt_tokens)

    def fall_back_to(self, charge: Callable[[int], None]) -> None:
        self.unwritten = charge


async def test_a_refund_goes_back_to_the_buckets_that_were_charged() -> None:
    clock = Clock()
    shared = FakeShared()
    lim = TenantLimits("acme", 60, 6000, clock, shared=shared, share=3)
    assert lim.requests is not None
    full = lim.requests.level()
    shared.up = False
    refund = await lim.acquire(10)  # the local share, while the shared store is down
    shared.up = True
    refund()  # back to the local share, not to the shared store that is back
    assert (lim.requests.level(), shared.charged) == (full, 0)
    refund = await lim.acquire(10)  # the shared store
    shared.up = False
    refund()  # the shared store is down again: the local share was never charged
    assert lim.requests.level() == full


def test_completion_tokens_of_a_tenant_without_a_token_limit_are_not_written() -> None:
    """Nothing to charge them to: no write to the shared store (a Redis call per flush)."""
    shared = FakeShared()
    TenantLimits("acme", 60, None, Clock(), shared=shared).charge(100)
    assert shared.calls == 0
    TenantLimits("acme", 60, 6000, Clock(), shared=shared).charge(100)
    assert (shared.calls, shared.charged) == (1, 100)


@pytest.mark.parametrize("handed_off", [False, True])
async def test_a_caller_cancelled_while_the_shared_store_answers_is_refunded(
    handed_off: bool,
) -> None:
    # Handed off (a draining gateway's generation another one continues): kept charged.
    answer = asyncio.Event()

    asking = asyncio.Event()

    class Slow(FakeShared):
        async def admit(self, prompt_tokens: int) -> bool:
            asking.set()
            await answer.wait()
            return await super().admit(prompt_tokens)

    shared = Slow()
    lim = TenantLimits("acme", 60, 6000, Clock(), shared=shared)
    call = asyncio.ensure_future(lim.acquire(10, refund_if_cancelled=lambda: not handed_off))

    async def asked() -> bool:
        return asking.is_set()

    await eventually(asked, what="the admit under way")
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    answer.set()  # the store took it after the caller left

    async def admitted() -> bool:
        return shared.admitted == 1

    await eventually(admitted, what="the admit nobody waited for taken")
    # The callback runs in the tick the admit ends: its refund is queued by now.
    assert shared.charged == (0 if handed_off else -10)


async def test_a_fallback_share_below_one_still_admits_at_its_rate() -> None:
    """2 requests/min over 4 gateways is half a request per gateway-minute: the local bucket
    holds 0.5, which no request fits. It admitted none for the whole outage (retry-after inf,
    a 500 over HTTP); a full bucket now lets one through, below zero, so the share holds over
    time. A prompt is refused for good only above the tenant's whole tokens/min limit."""
    clock = Clock()
    shared = FakeShared()
    shared.up = False
    lim = TenantLimits("acme", 2, 1000, clock, shared=shared, share=4)
    await lim.acquire(200)  # the request bucket (0.5) is full: one passes, to -0.5
    with pytest.raises(RateLimited) as info:
        await lim.acquire(10)
    assert info.value.limit == "requests"
    assert info.value.retry_after_s == pytest.approx(120.0)  # 0.5/min: one every 2 min
    clock.now += 120.0
    await lim.acquire(600)  # above the local 250 but within 1000: passes on a full bucket
    clock.now += 600.0
    with pytest.raises(RateLimited) as never:
        await lim.acquire(1001)
    assert never.value.retry_after_s is None
    assert "1000" in str(never.value)
    snap = lim.snapshot()
    assert snap.requests is not None
    assert (snap.requests.limit, snap.requests.remaining) == (1, 1)


def test_a_wait_that_never_ends_is_no_retry_after() -> None:
    for never in (math.inf, math.nan):
        assert RateLimited("x", limit="tokens", retry_after_s=never).retry_after_s is None
    assert RateLimited("x", limit="tokens", retry_after_s=2.5).retry_after_s == 2.5


def test_a_slot_that_held_no_generation_is_not_counted_as_freed() -> None:
    """Requests refused after taking their slot (rate-limited, invalid) counted as slots freed:
    fifty of them made the next concurrency refusal say 0.2 s instead of the upper bound."""
    clock = Clock()
    limits = StreamLimits(100, clock, retry_after_bounds=(0.2, 10.0))
    tenant = TenantLimits("acme", None, None, clock, max_concurrent=2)
    held = limits.enter(tenant)  # a long generation
    for _ in range(50):
        limits.enter(tenant).release(freed=False)
    second = limits.enter(tenant)
    with pytest.raises(RateLimited) as info:
        limits.enter(tenant)
    assert info.value.retry_after_s == 10.0  # nothing freed: the upper bound
    held.release()
    second.release()


async def test_fallback_holds_the_local_share() -> None:
    clock = Clock()
    shared = FakeShared()
    lim = TenantLimits("acme", 60, 6000, clock, shared=shared, share=3)
    for _ in range(50):  # the shared buckets decide while reachable
        await lim.acquire(10)
    lim.charge(5)
    assert (shared.admitted, shared.charged) == (50, 5)
    shared.up = False
    for _ in range(20):  # 60 requests/min over 3 gateways
        await lim.acquire(10)
    with pytest.raises(RateLimited) as info:
        await lim.acquire(10)
    assert info.value.retry_after_s == pytest.approx(3.0)  # 20/min: one every 3 s
    lim.charge(100)  # completion tokens go to the local buckets while the shared one is down
    assert lim.tokens is not None
    assert lim.tokens.level() == pytest.approx(2000 - 200 - 100)
