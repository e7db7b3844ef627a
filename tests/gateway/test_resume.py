"""The idempotency store (services/gateway/resume.py) with scripted event sources and a manual
clock: keys, conflicts, resume offsets, retention, bounds, grace, failures and the creation
time every subscriber of a generation gets."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from dataclasses import dataclass

import pytest

from llmmesh.common.errors import Cancelled, NotFound, ServiceError, Unavailable
from services.gateway.errors import InvalidRequest, RequestIdConflict, ResumeStoreFull
from services.gateway.events import Completion, Delta, Event, FinishReason
from services.gateway.resume import Billing, Generation, Key, ResumeStore
from tests.helpers import eventually

A = Key("tenant-a", "req-1")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def delta(offset: int, n: int) -> Delta:
    return Delta(f"<{offset}+{n}>", list(range(offset, offset + n)), offset)


def done(tokens: int) -> Completion:
    return Completion(FinishReason.LENGTH, 3, tokens, 0, 0.0, 1.0, 2.0, 0.5, "r0")


_END = object()


class Script:
    """An event source fed by the test: events, an exception, or the end."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[object] = asyncio.Queue()
        self.starts = 0
        self.closed = asyncio.Event()

    def source(self) -> AsyncGenerator[Event, None]:
        self.starts += 1
        return self._run()

    async def _run(self) -> AsyncGenerator[Event, None]:
        try:
            while (item := await self.queue.get()) is not _END:
                if isinstance(item, ServiceError):
                    raise item
                assert isinstance(item, Delta | Completion)
                yield item
        finally:
            self.closed.set()

    def push(self, *items: object) -> None:
        for item in items:
            self.queue.put_nowait(item)


def store(clock: Clock | None = None, wall_clock: Clock | None = None, **kw: float) -> ResumeStore:
    params: dict[str, float] = {
        "retention_s": 60.0,
        "grace_s": 3600.0,
        "max_entries": 100,
        "max_tokens": 10_000,
    }
    params.update(kw)
    return ResumeStore(
        retention_s=params["retention_s"],
        grace_s=params["grace_s"],
        max_entries=int(params["max_entries"]),
        max_tokens=int(params["max_tokens"]),
        clock=clock or Clock(),
        wall_clock=wall_clock or Clock(),
    )


async def until_done(gen: Generation) -> None:
    async def ended() -> bool:
        return gen.done

    await eventually(ended, what="the generation ended")


async def collect(gen: Generation, start: int) -> list[Event]:
    return [ev async for ev in gen.follow(start)]


FIRST: list[Event] = [delta(0, 2), delta(2, 3), delta(5, 1), done(6)]


@dataclass(frozen=True)
class Case:
    name: str
    finished: bool  # the first generation finished before the second open
    key: Key = A
    digest: str = "d1"
    resume_from: int | None = None
    advance_s: float = 0.0  # clock moves this much after the first one finished
    error: type[ServiceError] | None = None
    started_again: bool = False  # a second source was started
    replay: tuple[Event, ...] = ()  # what the second open yields


CASES = [
    Case("retry while running replays all", False, replay=tuple(FIRST)),
    Case("retry after finish replays all", True, replay=tuple(FIRST)),
    Case("resume from a delta end", True, resume_from=2, replay=tuple(FIRST[1:])),
    Case("resume from the last token", True, resume_from=6, replay=(FIRST[3],)),
    Case("resume from 0 is everything", True, resume_from=0, replay=tuple(FIRST)),
    Case("resume mid-delta", True, resume_from=3, error=InvalidRequest),
    Case("resume beyond the tokens", False, resume_from=9, error=InvalidRequest),
    Case("different body", False, digest="d2", error=RequestIdConflict),
    Case("different body after finish", True, digest="d2", error=RequestIdConflict),
    Case(
        "other tenant, same id: its own generation",
        False,
        key=Key("tenant-b", "req-1"),
        digest="d2",
        started_again=True,
        replay=(delta(0, 1), done(1)),
    ),
    Case(
        "other tenant cannot resume",
        True,
        key=Key("tenant-b", "req-1"),
        resume_from=2,
        error=NotFound,
    ),
    Case("within retention", True, advance_s=59.0, replay=tuple(FIRST)),
    Case(
        "after retention: fresh",
        True,
        advance_s=60.0,
        started_again=True,
        replay=(delta(0, 1), done(1)),
    ),
    Case("after retention: resume not found", True, advance_s=61.0, resume_from=2, error=NotFound),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
async def test_second_open(case: Case) -> None:
    clock = Clock()
    s = store(clock)
    script = Script()
    gen, start = s.open(A, "d1", None, 6, script.source)
    assert start == 0
    # The first client follows from the start and sees the whole generation.
    first_client = asyncio.ensure_future(collect(gen, start))
    script.push(*FIRST[:3])
    if case.finished:
        script.push(FIRST[3], _END)
        await until_done(gen)
        clock.now += case.advance_s
    else:

        async def produced() -> bool:
            return gen.tokens == 6

        await eventually(produced, what="three deltas produced")

    second = Script()
    if case.error is not None:
        with pytest.raises(case.error):
            s.open(case.key, case.digest, case.resume_from, 6, second.source)
        assert second.starts == 0
    else:
        gen2, start2 = s.open(case.key, case.digest, case.resume_from, 6, second.source)
        assert second.starts == (1 if case.started_again else 0)
        assert (gen2 is not gen) == case.started_again
        if case.started_again:
            second.push(delta(0, 1), done(1), _END)
        follower = asyncio.ensure_future(collect(gen2, start2))
        if not case.finished and not case.started_again:
            script.push(FIRST[3], _END)  # the live part reaches the re-attached client
        assert tuple(await follower) == case.replay
    if not case.finished:
        script.push(FIRST[3], _END)
    assert await first_client == FIRST
    assert script.starts == 1


@pytest.mark.parametrize(
    ("max_entries", "max_tokens", "finished", "running", "reserve", "evicted", "full"),
    [
        # Room left: nothing evicted.
        (3, 100, 1, 1, 10, 0, False),
        # Entry bound: the oldest finished one goes.
        (2, 100, 1, 1, 10, 1, False),
        (2, 100, 2, 0, 10, 1, False),
        # Token bound: finished entries (5 tokens each) go oldest first until the reserve fits.
        (10, 20, 3, 0, 10, 1, False),
        (10, 20, 3, 0, 20, 3, False),
        # Only running generations: nothing can be evicted, the keyed request is refused.
        (2, 100, 0, 2, 10, 0, True),
        (10, 25, 0, 2, 10, 0, True),  # 2 x 10 reserved + 10 > 25
        # A reserve larger than the whole budget never fits.
        (10, 20, 0, 0, 21, 0, True),
    ],
)
async def test_bounds(
    max_entries: int,
    max_tokens: int,
    finished: int,
    running: int,
    reserve: int,
    evicted: int,
    full: bool,
) -> None:
    clock = Clock()
    s = store(clock, max_entries=max_entries, max_tokens=max_tokens)
    finished_keys = [Key("t", f"f{i}") for i in range(finished)]
    scripts = []
    for key in finished_keys:
        script = Script()
        gen, _ = s.open(key, "d", None, 10, script.source)
        script.push(delta(0, 5), done(5), _END)
        await until_done(gen)
        clock.now += 1
    running_scripts = [Script() for _ in range(running)]
    for i, script in enumerate(running_scripts):
        s.open(Key("t", f"r{i}"), "d", None, 10, script.source)
        scripts.append(script)
    assert s.tokens == finished * 5 + running * 10
    new = Script()
    if full:
        with pytest.raises(ResumeStoreFull) as info:
            s.open(Key("t", "new"), "d", None, reserve, new.source)
        assert info.value.retry_after_s is not None
        assert new.starts == 0
    else:
        s.open(Key("t", "new"), "d", None, reserve, new.source)
        assert new.starts == 1
    gone = [k for k in finished_keys if s.get(k) is None]
    assert gone == finished_keys[:evicted]  # oldest first
    assert s.entries <= max_entries
    assert s.tokens <= max_tokens
    await s.close()


async def test_tokens_shrink_to_what_was_produced() -> None:
    s = store()
    script = Script()
    gen, _ = s.open(A, "d", None, 100, script.source)
    assert s.tokens == 100
    script.push(delta(0, 4), done(4), _END)
    await until_done(gen)
    assert s.tokens == 4
    assert s.entries == 1


async def test_failed_generation_is_forgotten_and_followers_get_the_error() -> None:
    s = store()
    script = Script()
    gen, _ = s.open(A, "d", None, 10, script.source)
    follower = asyncio.ensure_future(collect(gen, 0))
    script.push(delta(0, 1), Unavailable("replica r0 failed"))
    with pytest.raises(Unavailable):
        await follower
    assert s.get(A) is None
    assert s.tokens == 0
    # A retry starts afresh.
    again = Script()
    gen2, _ = s.open(A, "d", None, 10, again.source)
    assert gen2 is not gen
    assert again.starts == 1
    await s.close()


async def test_last_client_leaving_cancels_after_the_grace() -> None:
    s = store(grace_s=0.0)
    script = Script()
    gen, start = s.open(A, "d", None, 10, script.source)
    events = gen.follow(start)
    script.push(delta(0, 1))
    assert await anext(events) == delta(0, 1)
    await events.aclose()  # the client went away

    async def cancelled() -> bool:
        return gen.done

    await eventually(cancelled, what="the abandoned generation is cancelled")
    await script.closed.wait()  # the source (the engine stream) was closed
    assert isinstance(gen.error, Cancelled)
    assert s.get(A) is None
    assert s.tokens == 0


async def test_a_retry_within_the_grace_keeps_the_generation() -> None:
    s = store(grace_s=3600.0)
    script = Script()
    gen, start = s.open(A, "d", None, 10, script.source)
    events = gen.follow(start)
    script.push(delta(0, 1))
    assert await anext(events) == delta(0, 1)
    await events.aclose()
    assert gen.subscribers == 0
    assert not gen.done
    gen2, start2 = s.open(A, "d", 1, 10, Script().source)
    assert gen2 is gen
    follower = asyncio.ensure_future(collect(gen, start2))
    script.push(delta(1, 2), done(3), _END)
    assert await follower == [delta(1, 2), done(3)]
    assert script.starts == 1
    assert gen.error is None


async def test_close_cancels_running_generations() -> None:
    s = store()
    script = Script()
    gen, _ = s.open(A, "d", None, 10, script.source)
    await s.close()
    assert gen.done
    assert isinstance(gen.error, Cancelled)
    assert s.entries == 0


async def test_every_subscriber_gets_the_creation_time_of_the_first_open() -> None:
    """A retry and a resume opened while the wall clock moved on get the time the generation
    was first opened; a fresh generation under the key (after the retention) gets its own."""
    clock, wall = Clock(), Clock()
    wall.now = 1_700_000_000.25
    s = store(clock, wall, retention_s=60.0)
    script = Script()
    first = await s.subscribe(A, "d", None, 10, lambda prior, billing: script.source())
    first_client = asyncio.ensure_future(collect_events(first.events))
    script.push(*FIRST[:2])
    wall.now += 1.5  # the second changes
    retry = await s.subscribe(A, "d", None, 10, lambda prior, billing: Script().source())
    retry_client = asyncio.ensure_future(collect_events(retry.events))
    script.push(*FIRST[2:], _END)
    assert await first_client == FIRST
    assert await retry_client == FIRST
    wall.now += 30.0
    resumed = await s.subscribe(A, "d", 5, 10, lambda prior, billing: Script().source())
    assert await collect_events(resumed.events) == FIRST[2:]
    assert first.created == retry.created == resumed.created == 1_700_000_000.25
    clock.now += 60.0  # retention over: the key is forgotten
    again = Script()
    fresh = await s.subscribe(A, "d", None, 10, lambda prior, billing: again.source())
    again.push(delta(0, 1), done(1), _END)
    assert await collect_events(fresh.events) == [delta(0, 1), done(1)]
    assert fresh.created == wall.now
    assert script.starts == again.starts == 1


async def collect_events(events: AsyncGenerator[Event, None]) -> list[Event]:
    return [ev async for ev in events]


def test_a_held_usage_record_goes_out_once_settled_whichever_comes_first() -> None:
    submitted: list[bool] = []
    held = Billing(deferred=True)
    held.hold(submitted.append)
    assert submitted == []  # held until the store's last word
    held.superseded = True  # the store found its claim lost
    held.settle()
    assert submitted == [False]  # another gateway bills it
    held.settle()
    assert submitted == [False]  # once
    late = Billing(deferred=True)
    late.settle()  # settled before the generation's record was written (it ran on)
    late.hold(submitted.append)
    assert submitted == [False, True]
