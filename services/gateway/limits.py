"""Per-tenant rate limits: token buckets for requests/min and tokens/min.

- A request takes one request token and its prompt tokens at admission (before the orchestrator
  sees it); both must be available, else 429 / RESOURCE_EXHAUSTED with the time until they are.
- Completion tokens are taken as they stream. The tokens bucket may go below zero then (a
  stream is never cut for the limit); the tenant's next requests wait until it refills.
- A prompt larger than the whole tokens/min budget can never pass: 429 without retry-after.
- Buckets start full and refill continuously (limit / 60 per second), so a tenant may burst up
  to one minute's budget.

Each tenant has its own buckets; nothing one tenant does touches another's. The event loop is
single-threaded and check-then-take has no await in between, so concurrent requests cannot
overdraw at admission.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from services.gateway.errors import RateLimited

Clock = Callable[[], float]


class TokenBucket:
    def __init__(self, per_minute: float, clock: Clock):
        self.capacity = float(per_minute)
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
        """Seconds until `amount` is available (inf if it exceeds the capacity)."""
        if amount > self.capacity:
            return math.inf
        missing = amount - self.level()
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


class TenantLimits:
    def __init__(
        self,
        tenant: str,
        requests_per_minute: int | None,
        tokens_per_minute: int | None,
        clock: Clock = time.monotonic,
    ):
        self.tenant = tenant
        self.requests = (
            None if requests_per_minute is None else TokenBucket(requests_per_minute, clock)
        )
        self.tokens = None if tokens_per_minute is None else TokenBucket(tokens_per_minute, clock)

    def admit(self, prompt_tokens: int) -> None:
        """Take one request and the prompt's tokens, or raise RateLimited taking nothing."""
        wait_requests = 0.0 if self.requests is None else self.requests.wait_s(1)
        wait_tokens = 0.0 if self.tokens is None else self.tokens.wait_s(prompt_tokens)
        if self.tokens is not None and math.isinf(wait_tokens):
            raise RateLimited(
                f"tenant {self.tenant!r}: the prompt ({prompt_tokens} tokens) exceeds the "
                f"tokens-per-minute limit of {self.tokens.capacity:.0f}",
                limit="tokens",
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
        """Completion tokens, as they stream (never refused)."""
        if self.tokens is not None and tokens:
            self.tokens.take(tokens)

    def refund(self, prompt_tokens: int) -> None:
        """Give back what `admit` took when the request was never served (admission failed)."""
        if self.requests is not None:
            self.requests.take(-1)
        if self.tokens is not None:
            self.tokens.take(-prompt_tokens)

    def snapshot(self) -> RateLimitSnapshot:
        def state(bucket: TokenBucket | None) -> LimitState | None:
            if bucket is None:
                return None
            return LimitState(int(bucket.capacity), max(int(bucket.level()), 0), bucket.reset_s())

        return RateLimitSnapshot(state(self.requests), state(self.tokens))
