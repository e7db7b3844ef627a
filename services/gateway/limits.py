"""Gateway limits: per-tenant rate limits (token buckets for requests/min and tokens/min),
per-tenant and per-process concurrency (open streams).

Rate limits:

- A request takes one request token and its prompt tokens at admission (before the orchestrator
  sees it); both must be available, else 429 / RESOURCE_EXHAUSTED with the time until they are.
- Completion tokens are taken as they stream. The tokens bucket may go below zero then (a
  stream is never cut for the limit); the tenant's next requests wait until it refills.
- A prompt larger than the whole tokens/min budget can never pass: 429 without retry-after.
- Buckets start full and refill continuously (limit / 60 per second), so a tenant may burst up
  to one minute's budget.

Each tenant has its own buckets; nothing one tenant does touches another's. The event loop is
single-threaded and check-then-take has no await in between, so concurrent requests cannot
overdraw at admission. With a shared limiter (`limits_redis.py`, setting `limits_redis_url`)
the buckets live in Redis and hold across every gateway; the local buckets then hold the
tenant's fallback share (1/`limits_gateways` of each limit), used only while Redis is
unreachable. An amount above a share's bucket but within the whole limit (a share below one
request, a long prompt) passes when the bucket is full and takes it below zero, so the share's
rate holds; only an amount above the whole limit can never pass.

Concurrency (`ConcurrencyLimit`): a tenant's `max_concurrent_requests` and the process's
`max_concurrent_streams` count generations from admission to their end (a slot is taken before
tokenizing, so a refused request costs no tokenizer time). Beyond either: RESOURCE_EXHAUSTED /
429, with a retry-after estimated from how fast slots free up and how many callers were just
refused (`ConcurrencyLimit.retry_after_s`). Counters only: memory does not grow with load.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from services.gateway.errors import GatewayOverloaded, PromptOverTokenLimit, RateLimited

Clock = Callable[[], float]


class TokenBucket:
    """`per_minute` tokens a minute, holding at most a minute's. `limit`: the amount that can
    never pass (above it), when the bucket holds a share of a larger limit (a gateway's fallback
    share): an amount above the capacity but within `limit` passes when the bucket is full and
    takes it below zero, so the share's rate still holds over time."""

    def __init__(self, per_minute: float, clock: Clock, *, limit: float | None = None):
        self.capacity = float(per_minute)
        self.limit = self.capacity if limit is None else max(float(limit), self.capacity)
        self.rate = per_minute / 60.0
        self._clock = clock
        self._level = self.capacity
        self._at = clock()

    def level(self) -> float:
        now = self._clock()
        self._level = min(self.capacity, self._level + (now - self._at) * self.rate)
        self._at = now
        return self._level

    def wait_s(self, amount: float) -> float:
        """Seconds until `amount` may be taken (inf if it exceeds `limit`; an amount above the
        capacity waits for a full bucket)."""
        if amount > self.limit:
            return math.inf
        missing = min(amount, self.capacity) - self.level()
        return 0.0 if missing <= 0 else missing / self.rate

    def take(self, amount: float) -> None:
        self.level()
        self._level -= amount

    def reset_s(self) -> float:
        """Seconds until the bucket is full again."""
        return max(self.capacity - self.level(), 0.0) / self.rate


@dataclass(frozen=True, slots=True)
class LimitState:
    """One limit for `x-ratelimit-*` headers."""

    limit: int
    remaining: int
    reset_s: float


@dataclass(frozen=True, slots=True)
class RateLimitSnapshot:
    requests: LimitState | None
    tokens: LimitState | None


class SharedQuota(Protocol):
    """A tenant's buckets shared by every gateway (`limits_redis.RedisQuota`). Each call answers
    False when the shared store is unreachable: nothing was taken or queued there, and the
    caller uses its local buckets instead."""

    async def admit(self, prompt_tokens: int) -> bool:
        """Take one request and the prompt's tokens, or raise RateLimited taking nothing."""
        ...

    def charge(self, tokens: int) -> bool:
        """Completion tokens, written in the background (to the buckets bound by
        `fall_back_to` when that write fails)."""
        ...

    def fall_back_to(self, charge: Callable[[int], None]) -> None:
        """Where completion tokens go that were queued but could not be written."""
        ...

    def refund(self, prompt_tokens: int) -> bool:
        """Give back one request and the prompt's tokens, written in the background."""
        ...


def _ignore(_: bool) -> None:
    """A shared refund that could not be queued (the store is down): its buckets refill."""


class TenantLimits:
    def __init__(
        self,
        tenant: str,
        requests_per_minute: int | None,
        tokens_per_minute: int | None,
        clock: Clock = time.monotonic,
        *,
        max_concurrent: int | None = None,
        shared: SharedQuota | None = None,
        share: int = 1,
        retry_after_bounds: tuple[float, float] = (0.2, 10.0),
    ):
        """`share` > 1 with `shared`: the local buckets (the fallback) hold 1/share of each
        limit, so `share` gateways falling back at once still admit at most the limit."""
        self.tenant = tenant
        self.shared = shared
        self.requests = (
            None
            if requests_per_minute is None
            else TokenBucket(requests_per_minute / share, clock, limit=requests_per_minute)
        )
        self.tokens = (
            None
            if tokens_per_minute is None
            else TokenBucket(tokens_per_minute / share, clock, limit=tokens_per_minute)
        )
        if shared is not None:
            shared.fall_back_to(self._charge_locally)
        self.concurrency = (
            None
            if max_concurrent is None
            else ConcurrencyLimit(
                max_concurrent, clock, RateLimited, retry_after_bounds, owner=tenant
            )
        )

    async def acquire(
        self, prompt_tokens: int, *, refund_if_cancelled: Callable[[], bool] = lambda: True
    ) -> Callable[[], None]:
        """`admit` against the shared buckets when there are some (the local share while the
        shared store is unreachable), else the local ones. Returns the refund of what it took,
        to the buckets it took it from (a shared refund that cannot be queued, the store down
        again, is dropped: those buckets refill). A caller cancelled while the shared store
        answers is refunded there once it did take, if `refund_if_cancelled()` then."""
        shared = self.shared
        if shared is not None:
            admit = asyncio.ensure_future(shared.admit(prompt_tokens))
            try:
                taken = await asyncio.shield(admit)
            except asyncio.CancelledError:

                def taken_after_all(t: asyncio.Future[bool]) -> None:
                    if t.cancelled() or t.exception() is not None or not t.result():
                        return
                    if refund_if_cancelled():
                        shared.refund(prompt_tokens)

                admit.add_done_callback(taken_after_all)
                raise
            if taken:
                return lambda: _ignore(shared.refund(prompt_tokens))
        self.admit(prompt_tokens)
        return lambda: self.refund(prompt_tokens)

    def admit(self, prompt_tokens: int) -> None:
        """Take one request and the prompt's tokens, or raise RateLimited taking nothing."""
        wait_requests = 0.0 if self.requests is None else self.requests.wait_s(1)
        wait_tokens = 0.0 if self.tokens is None else self.tokens.wait_s(prompt_tokens)
        if self.tokens is not None and math.isinf(wait_tokens):
            raise PromptOverTokenLimit(
                f"tenant {self.tenant!r}: the prompt ({prompt_tokens} tokens) exceeds the "
                f"tokens-per-minute limit of {self.tokens.limit:.0f}",
                snapshot=self.snapshot(),
            )
        if wait_requests > 0 or wait_tokens > 0:
            which = "requests" if wait_requests >= wait_tokens else "tokens"
            raise RateLimited(
                f"tenant {self.tenant!r}: {which} per minute limit reached",
                limit=which,
                retry_after_s=max(wait_requests, wait_tokens),
                snapshot=self.snapshot(),
            )
        if self.requests is not None:
            self.requests.take(1)
        if self.tokens is not None:
            self.tokens.take(prompt_tokens)

    def charge(self, tokens: int) -> None:
        """Completion tokens, as they stream (never refused); nothing for a tenant without a
        token limit (no write to the shared store either)."""
        if not tokens or self.tokens is None:
            return
        if self.shared is not None and self.shared.charge(tokens):
            return
        self._charge_locally(tokens)

    def _charge_locally(self, tokens: int) -> None:
        if self.tokens is not None:
            self.tokens.take(tokens)

    def refund(self, prompt_tokens: int) -> None:
        """Give back what `admit` took (the local buckets) when the request was never served
        (admission failed)."""
        if self.requests is not None:
            self.requests.take(-1)
        if self.tokens is not None:
            self.tokens.take(-prompt_tokens)

    def snapshot(self) -> RateLimitSnapshot:
        def state(bucket: TokenBucket | None) -> LimitState | None:
            if bucket is None:
                return None
            # A fallback share below one (a full bucket still lets one through) reads as one.
            level = bucket.level()
            remaining = max(int(level), 1 if level >= bucket.capacity else 0)
            return LimitState(math.ceil(bucket.capacity), remaining, bucket.reset_s())

        return RateLimitSnapshot(state(self.requests), state(self.tokens))


class _Rate:
    """Events per second, exponentially weighted over `tau_s` (injected clock)."""

    def __init__(self, clock: Clock, tau_s: float = 5.0):
        self._clock = clock
        self._tau = tau_s
        self._value = 0.0
        self._at = clock()

    def _decay(self) -> None:
        now = self._clock()
        if now > self._at:
            self._value *= math.exp(-(now - self._at) / self._tau)
            self._at = now

    def add(self, n: float = 1.0) -> None:
        self._decay()
        self._value += n

    def per_s(self) -> float:
        self._decay()
        return self._value / self._tau


class ConcurrencyLimit:
    """At most `limit` slots held at once; `enter` takes one or raises `error`.

    retry-after = (1 + refusals per second) / slots freed per second, both rates exponentially
    weighted over 5 s, within `bounds`: the more callers were just turned away, the further
    apart the ones that retry are sent, so they do not all come back for the same freed slot.
    With nothing freed recently it is the upper bound.
    """

    def __init__(
        self,
        limit: int,
        clock: Clock,
        error: type[GatewayOverloaded] | type[RateLimited],
        bounds: tuple[float, float],
        *,
        owner: str = "",
    ):
        if limit < 1:
            raise ValueError("limit must be at least 1")
        self.limit = limit
        self.held = 0
        self._error = error
        self._owner = owner
        self._bounds = bounds
        self._freed = _Rate(clock)
        self._refused = _Rate(clock)

    def retry_after_s(self) -> float:
        low, high = self._bounds
        freed = self._freed.per_s()
        if freed <= 0:
            return high
        return min(max((1.0 + self._refused.per_s()) / freed, low), high)

    def enter(self, *, force: bool = False) -> None:
        """Take a slot; `force`: even over the limit (a generation admitted elsewhere)."""
        if self.held >= self.limit and not force:
            wait = self.retry_after_s()
            self._refused.add()
            who = f"tenant {self._owner!r}" if self._owner else "this gateway"
            message = f"{who}: {self.limit} concurrent requests, the limit"
            if self._error is RateLimited:
                raise RateLimited(message, limit="concurrency", retry_after_s=wait)
            raise GatewayOverloaded(message, retry_after_s=wait)
        self.held += 1

    def leave(self, *, freed: bool = True) -> None:
        """Give the slot back; `freed=False` when the caller never used it (not counted in the
        rate slots free up at)."""
        assert self.held > 0, "leave without enter"
        self.held -= 1
        if freed:
            self._freed.add()


class Slot:
    """The concurrency a generation holds (its tenant's and the process's); `release` once it
    ends (idempotent)."""

    __slots__ = ("_limits",)

    def __init__(self, limits: tuple[ConcurrencyLimit, ...]):
        self._limits = limits

    def release(self, *, freed: bool = True) -> None:
        """`freed=False`: the slot held no generation (refused after it was taken), so it is
        not counted in the rate slots free up at."""
        limits, self._limits = self._limits, ()
        for limit in limits:
            limit.leave(freed=freed)


class StreamLimits:
    """The process's `max_concurrent_streams` plus each tenant's `max_concurrent_requests`."""

    def __init__(
        self,
        max_streams: int,
        clock: Clock = time.monotonic,
        retry_after_bounds: tuple[float, float] = (0.2, 10.0),
    ):
        self.streams = ConcurrencyLimit(max_streams, clock, GatewayOverloaded, retry_after_bounds)

    def enter(self, tenant: TenantLimits | None, *, force: bool = False) -> Slot:
        """A slot, or RESOURCE_EXHAUSTED taking nothing: the tenant's own limit is checked
        first (a tenant over its limit is told so, not that the gateway is full). `force`: a
        slot even over the limits, for a generation admitted already (a takeover, which a
        refusal would end, losing the client's request id)."""
        own = None if tenant is None else tenant.concurrency
        if own is not None:
            own.enter(force=force)
        try:
            self.streams.enter(force=force)
        except GatewayOverloaded:
            if own is not None:
                own.leave(freed=False)
            raise
        return Slot((self.streams,) if own is None else (own, self.streams))
