"""Idempotent request ids: re-attach to a running or recently finished generation.

A client-chosen request id is an idempotency key within its tenant (the authenticated tenant;
"" when authentication is off, so then every client shares one key space). Per key the store
holds the digest of the request body and the generation's event log:

- same key, same digest: attach. The log is replayed from the requested token offset, then the
  live generation is followed; nothing is generated again.
- same key, different digest: `RequestIdConflict` (gRPC ALREADY_EXISTS, HTTP 409).
- unknown key with a positive resume offset: `NOT_FOUND` (expired, evicted or never seen);
  without one: a fresh generation under that key.

Lifetime:
- A running generation outlives its last subscriber by `grace_s`; if nobody re-attaches within
  it, it is cancelled (its lease completed as cancelled) and forgotten.
- A generation that fails or is cancelled is forgotten at once: retrying its id starts afresh.
- A finished generation is kept `retention_s` after it finished, then forgotten.

Creation time: a generation records the wall-clock time it was first opened (`created`, the
store's injected `wall_clock`); every subscriber gets that time, so every response of one
keyed completion (original, retry, resume) carries the same creation time.

Bounds: at most `max_entries` entries and `max_tokens` completion tokens. A new generation
reserves its `max_tokens` when it starts (shrunk to what it produced when it finishes), so a
running one never outgrows its share. Room is made by evicting finished entries, oldest first;
when that is not enough the keyed request is refused with `ResumeStoreFull` (RESOURCE_EXHAUSTED,
retry-after), never served unkeyed: the client relies on its id not to generate twice.

This store is per process: the default, right for a single gateway. Gateways that scale out
share `resume_redis.RedisResumeStore` instead (setting `resume_redis_url`); both are a
`ResumeBackend`, which is all the core knows.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from llmmesh.common.errors import Cancelled, Internal, NotFound, ServiceError
from services.gateway import metrics
from services.gateway.errors import InvalidRequest, RequestIdConflict, ResumeStoreFull
from services.gateway.events import Delta, Event

log = logging.getLogger(__name__)

Clock = Callable[[], float]
EventSource = Callable[[], AsyncGenerator[Event, None]]


@dataclass(frozen=True, slots=True)
class Takeover:
    """A generation another gateway began and left (resume_redis.py): the deltas it produced,
    and how many of their tokens its usage record billed, with the prompt (None: it wrote no
    record, it died)."""

    prior: Sequence[Delta]
    billed: int | None


@dataclass(slots=True)
class Billing:
    """What the usage records of one keyed generation billed, shared by the store that runs it
    (and hands it to the next gateway: resume_redis.py) and the core that writes its record."""

    # Completion tokens billed so far, with the prompt; None: no record billed the prompt yet.
    tokens: int | None = None
    # The gateway drains: another gateway continues it, charged where it began (no refund).
    handing_off: bool = False
    # Another gateway took it over (this one lost its claim): that one bills from the last
    # hand-off on, so this one's record bills nothing.
    superseded: bool = False
    # Set by a store that writes the generation's end elsewhere (resume_redis.py): the usage
    # record waits (`hold`) until that write answered (`settle`), so a gateway that lost its
    # claim bills nothing even when its engine finished before it learned so.
    deferred: bool = False
    _held: Callable[[bool], None] | None = None
    _settled: bool = False

    def hold(self, submit: Callable[[bool], None]) -> None:
        """`submit(billed)` the record once settled (at once if it is): `billed` False when
        another gateway bills the generation."""
        if self._settled:
            submit(not self.superseded)
        else:
            self._held = submit

    def settle(self) -> None:
        """The store's last word on the generation: a held record goes out now."""
        self._settled = True
        held, self._held = self._held, None
        if held is not None:
            held(not self.superseded)


# The generation's events: a new one (no `Takeover`) or a continuation, with its `Billing`.
ContinuableSource = Callable[[Takeover | None, Billing], AsyncGenerator[Event, None]]

# Retry-after for a full store: finished entries age out and running ones finish continuously.
FULL_RETRY_AFTER_S = 1.0


@dataclass(frozen=True, slots=True)
class Key:
    tenant: str
    request_id: str


@dataclass(frozen=True, slots=True)
class Subscription:
    """A subscriber's view of a keyed generation: its events after the requested offset and the
    wall-clock time (Unix seconds) the generation was first opened, on whichever gateway."""

    events: AsyncGenerator[Event, None]
    created: float


class ResumeBackend(Protocol):
    """What the core needs of an idempotency store: the in-process `ResumeStore` or the shared
    `resume_redis.RedisResumeStore`, with the semantics of the module docstring."""

    async def subscribe(
        self,
        key: Key,
        digest: str,
        resume_from: int | None,
        reserve_tokens: int,
        source: ContinuableSource,
    ) -> Subscription:
        """The events of the generation under `key` after token offset `resume_from`, and its
        creation time; starts `source` when the key is new. Raises (here, not while iterating)
        RequestIdConflict, NotFound, InvalidRequest, ResumeStoreFull, or Unavailable when the
        store is unreachable."""
        ...

    async def close(self) -> None:
        """After the fronts drained: end the generations this process still runs."""
        ...


class GenerationHolder(Protocol):
    """The store a `Generation` reports to."""

    grace_s: float

    def _ended(self, gen: Generation) -> None: ...

    def _forget(self, gen: Generation) -> None: ...


class Generation:
    """One keyed generation: its event log, its producer task and its subscribers."""

    def __init__(
        self, store: GenerationHolder, key: Key, digest: str, reserved: int, created: float
    ):
        self.key = key
        self.digest = digest
        self.reserved = reserved
        self.created = created  # wall-clock time (Unix seconds) it was first opened
        self.events: list[Event] = []
        self.tokens = 0
        self.done = False
        self.error: ServiceError | None = None
        self.finished_at: float | None = None
        self._store = store
        self._subscribers = 0
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._grace: asyncio.TimerHandle | None = None

    @property
    def subscribers(self) -> int:
        return self._subscribers

    # -- producer ---------------------------------------------------------------------------
    def start(self, source: EventSource) -> None:
        self._task = asyncio.get_running_loop().create_task(self._produce(source()))
        self._task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        # A task cancelled before it ever ran never reached _end in _produce.
        if not self.done:
            self._end(Cancelled("the generation was cancelled"))

    async def _produce(self, events: AsyncGenerator[Event, None]) -> None:
        try:
            async with contextlib.aclosing(events):
                async for ev in events:
                    self.events.append(ev)
                    if isinstance(ev, Delta):
                        self.tokens += len(ev.token_ids)
                    self._notify()
        except ServiceError as err:
            self._end(err)
        except asyncio.CancelledError:
            self._end(Cancelled("the generation was cancelled"))
            raise
        except Exception:
            log.exception("keyed generation failed", extra={"request_id": self.key.request_id})
            self._end(Internal("the generation failed"))
        else:
            self._end(None)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _end(self, error: ServiceError | None) -> None:
        self.done = True
        self.error = error
        if self._grace is not None:
            self._grace.cancel()
            self._grace = None
        self._store._ended(self)
        self._notify()

    def cancel(self) -> asyncio.Task[None] | None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            return self._task
        return None

    # -- subscribers ------------------------------------------------------------------------
    def start_index(self, resume_from: int | None) -> int:
        """Index in the log of the first event after token offset `resume_from`: 0, or the end
        of a delta already produced."""
        if not resume_from:
            return 0
        for i, ev in enumerate(self.events):
            if isinstance(ev, Delta) and ev.end == resume_from:
                return i + 1
        raise InvalidRequest(
            f"{resume_from} is not the end of a delta of this generation "
            f"({self.tokens} tokens generated so far)",
            field="resume_from",
        )

    async def follow(self, start: int) -> AsyncGenerator[Event, None]:
        """The log from `start`, then live events until the generation ends; its error, if
        any, is raised after the events produced before it."""
        self.attach()
        try:
            i = start
            while True:
                while i < len(self.events):
                    yield self.events[i]
                    i += 1
                if self.done:
                    if self.error is not None:
                        raise self.error
                    return
                await self._changed.wait()
        finally:
            self.detach()

    def attach(self) -> None:
        """One more subscriber (as while `follow` runs); `detach` once it is gone."""
        self._subscribers += 1
        if self._grace is not None:
            self._grace.cancel()
            self._grace = None

    def detach(self) -> None:
        self._subscribers -= 1
        if self._subscribers == 0 and not self.done:
            self._grace = asyncio.get_running_loop().call_later(self._store.grace_s, self._abandon)

    def _abandon(self) -> None:
        self._grace = None
        if self._subscribers == 0 and not self.done:
            # Forgotten first: a retry from now on starts a fresh generation rather than
            # attaching to one being cancelled.
            self._store._forget(self)
            self.cancel()
            metrics.record_resume_eviction("abandoned")


class ResumeStore:
    """Keyed generations, bounded by entries and tokens (module docstring)."""

    def __init__(
        self,
        *,
        retention_s: float,
        grace_s: float,
        max_entries: int,
        max_tokens: int,
        clock: Clock = time.monotonic,
        wall_clock: Clock = time.time,
    ):
        """`clock` (monotonic) times retention; `wall_clock` stamps a generation's creation."""
        self.retention_s = retention_s
        self.grace_s = grace_s
        self.max_entries = max_entries
        self.max_tokens = max_tokens
        self._clock = clock
        self._wall_clock = wall_clock
        self._entries: dict[Key, Generation] = {}
        # Finished entries in the order they finished: expiry and eviction order.
        self._finished: OrderedDict[Key, Generation] = OrderedDict()
        self._tokens = 0

    @property
    def entries(self) -> int:
        return len(self._entries)

    @property
    def tokens(self) -> int:
        """Completion tokens held (finished entries) plus reserved (running ones)."""
        return self._tokens

    async def subscribe(
        self,
        key: Key,
        digest: str,
        resume_from: int | None,
        reserve_tokens: int,
        source: ContinuableSource,
    ) -> Subscription:
        """`ResumeBackend.subscribe`: `open`, then follow."""
        gen, start = self.open(
            key, digest, resume_from, reserve_tokens, lambda: source(None, Billing())
        )
        return Subscription(gen.follow(start), gen.created)

    def get(self, key: Key) -> Generation | None:
        self.sweep()
        return self._entries.get(key)

    def open(
        self,
        key: Key,
        digest: str,
        resume_from: int | None,
        reserve_tokens: int,
        source: EventSource,
    ) -> tuple[Generation, int]:
        """The generation for `key` and the log index to follow it from, starting `source`
        when the key is new. Raises RequestIdConflict, NotFound, InvalidRequest (bad offset) or
        ResumeStoreFull."""
        self.sweep()
        gen = self._entries.get(key)
        if gen is not None:
            if not hmac.compare_digest(gen.digest, digest):
                metrics.record_resume_request("conflict")
                raise RequestIdConflict(
                    "already used for a different request (model, prompt or sampling differ); "
                    "use a new id for a new request",
                    field="request_id",
                )
            start = gen.start_index(resume_from)
            metrics.record_resume_request("replayed" if gen.done else "attached")
            return gen, start
        if resume_from:
            metrics.record_resume_request("not_found")
            raise NotFound(
                "no generation with this id to resume (finished longer ago than the "
                "retention, evicted, or never started); send the request without a resume "
                "offset to generate again",
                field="resume_from",
            )
        self._make_room(reserve_tokens)
        gen = Generation(self, key, digest, reserve_tokens, self._wall_clock())
        self._entries[key] = gen
        self._tokens += reserve_tokens
        self._publish()
        gen.start(source)
        metrics.record_resume_request("new")
        return gen, 0

    def _make_room(self, tokens: int) -> None:
        def fits() -> bool:
            return (
                len(self._entries) < self.max_entries and self._tokens + tokens <= self.max_tokens
            )

        while not fits() and self._finished:
            _, oldest = self._finished.popitem(last=False)
            self._forget(oldest)
            metrics.record_resume_eviction("capacity")
        if not fits():
            metrics.record_resume_request("full")
            raise ResumeStoreFull(
                f"the idempotency store is full ({len(self._entries)} generations, "
                f"{self._tokens} tokens held); retry later, or send no request id",
                retry_after_s=FULL_RETRY_AFTER_S,
            )

    def sweep(self) -> None:
        """Forget finished entries older than the retention."""
        horizon = self._clock() - self.retention_s
        while self._finished:
            oldest = next(iter(self._finished.values()))
            assert oldest.finished_at is not None
            if oldest.finished_at > horizon:
                break
            self._finished.popitem(last=False)
            self._forget(oldest)
            metrics.record_resume_eviction("expired")

    def _ended(self, gen: Generation) -> None:
        if self._entries.get(gen.key) is not gen:
            return
        if gen.error is not None:
            self._forget(gen)
            return
        gen.finished_at = self._clock()
        self._tokens += gen.tokens - gen.reserved
        gen.reserved = gen.tokens
        self._finished[gen.key] = gen
        self._publish()

    def _forget(self, gen: Generation) -> None:
        if self._entries.get(gen.key) is gen:
            del self._entries[gen.key]
            self._finished.pop(gen.key, None)
            self._tokens -= gen.reserved
            self._publish()

    def _publish(self) -> None:
        metrics.record_resume_store(len(self._entries), self._tokens)

    async def close(self) -> None:
        """Cancel the generations still running (after the fronts drained: nobody follows
        them) and wait for them to end."""
        tasks = [t for t in (g.cancel() for g in list(self._entries.values())) if t is not None]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
