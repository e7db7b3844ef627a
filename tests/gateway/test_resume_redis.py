"""The shared idempotency store (services/gateway/resume_redis.py): two gateway cores (fake
admission and engines) on one private redis-server: replay and follow across gateways,
conflicts, unknown resumes, takeover after a gateway died mid-stream, batched writes, the
creation time every gateway answers with, and what a keyed request gets while Redis is down."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, cast

import pytest
import pytest_asyncio
import redis.asyncio as aioredis
from prometheus_client import REGISTRY
from redis.exceptions import ConnectionError as RedisConnectionError

from llmmesh.common import metric_names as names
from llmmesh.common.errors import DeadlineExceeded, NotFound, ServiceError, Unavailable
from llmmesh.netutil import free_port
from llmmesh.redis_server import RedisServer
from services.gateway.auth import Authenticator, TenantsFile, hash_key
from services.gateway.core import (
    Completion,
    Delta,
    Event,
    GatewayCore,
    GenerationRequest,
    Opened,
    Sampling,
    UsageSink,
)
from services.gateway.errors import (
    InvalidRequest,
    ModelNotFound,
    RateLimited,
    RequestIdConflict,
    ResumeStoreFull,
)
from services.gateway.models import ServedModel
from services.gateway.resume import Clock, Key, ResumeStore
from services.gateway.resume_redis import RedisResumeStore, _Keys, decode_batch, encode_items
from services.gateway.settings import GatewaySettings, ModelSettings
from services.gateway.triton_stream import EngineChunk
from services.gateway.usage import UsageRecord
from tests.gateway.conftest import MODEL, FakeAdmission, FakeEngine, Hang, Sink, chunk
from tests.helpers import eventually

PROMPT = list(range(100, 140))
# Token ids the test tokenizer decodes (plain words), so deltas carry text.
TOKENS = list(range(300, 600))

_ids = itertools.count()


@pytest.fixture(scope="module")
def model(tokenizer_path: Path) -> ServedModel:
    return ServedModel.load(ModelSettings(name=MODEL, tokenizer_path=tokenizer_path))


@pytest.fixture
def request_id() -> str:
    return f"req-{next(_ids)}"


class Cores:
    """Gateway cores made by a test, closed after it."""

    def __init__(self, model: ServedModel, url: str) -> None:
        self.model = model
        self.url = url
        self.made: list[GatewayCore] = []

    def make(
        self,
        engine: FakeEngine,
        usage: UsageSink | None = None,
        wall_clock: Clock = time.time,
        auth: Authenticator | None = None,
        admission: FakeAdmission | None = None,
        **settings: Any,
    ) -> GatewayCore:
        fields: dict[str, Any] = {
            "resume_redis_url": self.url,
            "resume_redis_lease_s": 0.3,
            "resume_redis_flush_interval_s": 0.01,
            "resume_grace_s": 30.0,
            **settings,
        }
        core = GatewayCore(
            GatewaySettings(models=[self.model.settings], **fields),
            [self.model],
            admission or FakeAdmission(),
            engine,
            32,
            auth,
            usage=usage,
            wall_clock=wall_clock,
        )
        self.made.append(core)
        return core


@pytest_asyncio.fixture
async def cores(model: ServedModel, redis_server: RedisServer) -> AsyncIterator[Cores]:
    made = Cores(model, redis_server.url)
    yield made
    for core in made.made:
        await core.close()


@pytest_asyncio.fixture
async def redis(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_server.url)
    yield client
    await client.aclose()


def store(core: GatewayCore) -> RedisResumeStore:
    return cast(RedisResumeStore, core.resume)


def request(
    request_id: str, n: int, resume_from: int | None = None, **kw: Any
) -> GenerationRequest:
    return GenerationRequest(
        model=MODEL,
        request_id=request_id,
        prompt_ids=kw.pop("prompt", PROMPT),
        sampling=Sampling(max_tokens=n, **kw),
        keyed=True,
        resume_from=resume_from,
    )


def tokens(*ids: int) -> list[EngineChunk]:
    return [chunk(t) for t in ids]


async def collect(
    core: GatewayCore, req: GenerationRequest, opened: Opened | None = None
) -> list[Event]:
    return [ev async for ev in core.generate(req, 10.0, opened)]


def at(t: float) -> Clock:
    """A wall clock stopped at `t`."""
    return lambda: t


def ids_of(events: list[Event]) -> list[int]:
    return [t for e in events if isinstance(e, Delta) for t in e.token_ids]


def contiguous(events: list[Event], start: int = 0) -> bool:
    offset = start
    for d in events:
        if isinstance(d, Delta):
            if d.offset != offset:
                return False
            offset = d.end
    return True


async def record_of(sink: Sink, request_id: str) -> UsageRecord:
    """The one usage record of `request_id`: a keyed generation's goes out once its store wrote
    its end (`Billing.settle`), a moment after its stream ended."""

    async def written() -> bool:
        return any(r.request_id == request_id for r in sink.records)

    await eventually(written, what=f"the usage record of {request_id}")
    (record,) = [r for r in sink.records if r.request_id == request_id]
    return record


async def ended_here(core: GatewayCore, what: str) -> None:
    """Until `core` runs no keyed generation: each one's end was written to Redis."""

    async def ended() -> bool:
        return not store(core).entries

    await eventually(ended, what=what)


def writes() -> float:
    return REGISTRY.get_sample_value(names.GATEWAY_RESUME_REDIS_WRITES) or 0.0


def resume_requests(result: str) -> float:
    return REGISTRY.get_sample_value(names.GATEWAY_RESUME_REQUESTS, {"result": result}) or 0.0


async def killed_after_writing(
    cores: Cores, redis: aioredis.Redis, request_id: str, written: list[int], max_tokens: int
) -> None:
    """Gateway A streams `written` to its client, writes them to Redis as one batch, then is
    killed (as kill -9: no more writes; its client gets UNAVAILABLE); returns once its claim
    expired, so that the next gateway the client reaches takes the generation over."""
    a = cores.make(
        FakeEngine([[*tokens(*written), Hang()]]),
        resume_redis_flush_tokens=len(written),
        resume_redis_flush_interval_s=3600.0,
    )
    client_a = a.generate(request(request_id, max_tokens), 10.0)
    [await anext(client_a) for _ in written]
    own = store(a)._owned[Key("", request_id)]

    async def all_written() -> bool:
        return own.flushed_tokens == len(written)

    await eventually(all_written, what=f"A wrote its {len(written)} tokens")
    await store(a).kill()
    with pytest.raises(Unavailable):
        await anext(client_a)
    claim = store(a)._keys(Key("", request_id)).claim

    async def expired() -> bool:
        return not await redis.exists(claim)

    await eventually(expired, what="A's claim expired")


def test_in_memory_store_without_a_redis_url(model: ServedModel) -> None:
    core = GatewayCore(
        GatewaySettings(models=[model.settings]), [model], FakeAdmission(), FakeEngine([]), 32
    )
    assert isinstance(core.resume, ResumeStore)


async def test_finished_on_one_gateway_replays_on_another(cores: Cores, request_id: str) -> None:
    out = TOKENS[:8]
    a = cores.make(FakeEngine([[*tokens(*out), chunk(final=True)]]))
    b_engine = FakeEngine([])
    b = cores.make(b_engine)
    first = await collect(a, request(request_id, 8))
    assert ids_of(first) == out

    await ended_here(a, "the finished generation written to Redis")
    before = resume_requests("replayed")
    assert await collect(b, request(request_id, 8)) == first
    again = await collect(b, request(request_id, 8, resume_from=3))
    assert again == [e for e in first if not isinstance(e, Delta) or e.offset >= 3]
    assert resume_requests("replayed") == before + 2
    assert b_engine.requests == []  # nothing generated again
    with pytest.raises(InvalidRequest):
        await collect(b, request(request_id, 8, resume_from=9))


async def test_a_finished_generation_whose_log_was_evicted_is_as_one_past_its_retention(
    cores: Cores, redis: aioredis.Redis, request_id: str
) -> None:
    """Redis evicted the log (maxmemory volatile-lru) but kept the meta: a resume is NOT_FOUND
    and a plain retry generates again, never an empty stream."""
    out = TOKENS[:4]
    a = cores.make(FakeEngine([[*tokens(*out), chunk(final=True)]]))
    b_engine = FakeEngine([[*tokens(*out), chunk(final=True)]])
    b = cores.make(b_engine)
    await collect(a, request(request_id, 4))

    await ended_here(a, "the finished generation written to Redis")
    keys = store(b)._keys(Key("", request_id))

    async def evict_log() -> None:
        (log_key,) = [k async for k in redis.scan_iter(match=keys.log("*"))]
        await redis.delete(log_key)
        assert await redis.hget(keys.meta, "done") == b"1"

    await evict_log()
    again = await collect(b, request(request_id, 4))
    assert ids_of(again) == out
    assert isinstance(again[-1], Completion)
    assert len(b_engine.requests) == 1

    await ended_here(b, "the new generation written to Redis")
    await evict_log()
    with pytest.raises(NotFound):
        await collect(b, request(request_id, 4, resume_from=2))


async def test_a_follower_whose_finished_generation_lost_its_log_is_told_not_found(
    cores: Cores, redis: aioredis.Redis, request_id: str
) -> None:
    hang = Hang()
    a = cores.make(FakeEngine([[*tokens(*TOKENS[:3]), hang]]))
    b = cores.make(FakeEngine([]))
    client_a = a.generate(request(request_id, 10), 10.0)
    [await anext(client_a) for _ in range(3)]
    follower = asyncio.ensure_future(collect(b, request(request_id, 10)))
    before = resume_requests("attached")

    async def attached() -> bool:
        return resume_requests("attached") > before or follower.done()

    await eventually(attached, what="the second gateway follows")
    keys = store(b)._keys(Key("", request_id))
    (log_key,) = [k async for k in redis.scan_iter(match=keys.log("*"))]
    await redis.hset(keys.meta, mapping={"done": "1"})
    await redis.delete(log_key)
    with pytest.raises(NotFound):
        await asyncio.wait_for(follower, 10.0)
    await client_a.aclose()


async def test_running_on_one_gateway_is_followed_from_another(
    cores: Cores, request_id: str
) -> None:
    hang = Hang()
    out = TOKENS[:10]
    a = cores.make(FakeEngine([[*tokens(*out[:5]), hang, *tokens(*out[5:]), chunk(final=True)]]))
    b_engine = FakeEngine([])
    b = cores.make(b_engine)
    client_a = a.generate(request(request_id, 10), 10.0)
    got_a = [await anext(client_a) for _ in range(5)]
    follower = asyncio.ensure_future(collect(b, request(request_id, 10, resume_from=2)))

    async def attached() -> bool:
        return resume_requests("attached") > 0 and not follower.done()

    await eventually(attached, what="the second gateway follows")
    hang.release.set()
    got_a += [ev async for ev in client_a]
    got_b = await follower
    assert ids_of(got_a) == out
    assert got_b == [e for e in got_a if not isinstance(e, Delta) or e.offset >= 2]
    assert isinstance(got_b[-1], Completion)
    assert b_engine.requests == []


async def test_every_gateway_answers_with_the_creation_time_of_the_first_open(
    cores: Cores, redis: aioredis.Redis, request_id: str
) -> None:
    """Gateways whose wall clocks read differently: a client attached while it runs, a retry
    and a resume after it finished, on the gateway that runs it or another, all get the time
    it was first opened. A key recorded without one gets the first reader's, for everyone."""
    hang = Hang()
    out = TOKENS[:6]
    a = cores.make(
        FakeEngine([[*tokens(*out[:3]), hang, *tokens(*out[3:]), chunk(final=True)]]),
        wall_clock=at(1_700_000_000.75),
    )
    b = cores.make(FakeEngine([]), wall_clock=at(1_700_000_042.0))
    opened = Opened()
    client_a = a.generate(request(request_id, 6), 10.0, opened)
    got = [await anext(client_a)]
    assert opened.created == 1_700_000_000.75
    attached_a, attached_b = Opened(), Opened()
    follower_a = asyncio.ensure_future(collect(a, request(request_id, 6), attached_a))
    follower_b = asyncio.ensure_future(collect(b, request(request_id, 6), attached_b))

    async def attached() -> bool:
        return attached_a.created is not None and attached_b.created is not None

    await eventually(attached, what="both followers attached")
    hang.release.set()
    got += [ev async for ev in client_a]
    assert await follower_a == got
    assert await follower_b == got

    await ended_here(a, "the finished generation written to Redis")
    replayed, resumed = Opened(), Opened()
    assert await collect(b, request(request_id, 6), replayed) == got
    assert ids_of(await collect(b, request(request_id, 6, resume_from=3), resumed)) == out[3:]
    times = {attached_a.created, attached_b.created, replayed.created, resumed.created}
    assert times == {1_700_000_000.75}
    # A meta hash without a creation time (written by a gateway that did not record one).
    meta = store(b)._keys(Key("", request_id)).meta
    assert await redis.hdel(meta, "created") == 1
    first_reader, second_reader = Opened(), Opened()
    await collect(b, request(request_id, 6), first_reader)
    await collect(a, request(request_id, 6), second_reader)
    assert first_reader.created == second_reader.created == 1_700_000_042.0


@pytest.mark.parametrize("finished", [False, True])
async def test_another_body_under_the_id_conflicts_on_another_gateway(
    cores: Cores, request_id: str, finished: bool
) -> None:
    hang = Hang()
    script: list[EngineChunk | Hang] = [*tokens(*TOKENS[:3]), chunk(final=True)]
    if not finished:
        script.insert(3, hang)
    a = cores.make(FakeEngine([script]))
    b_engine = FakeEngine([])
    b = cores.make(b_engine)
    client_a = a.generate(request(request_id, 3), 10.0)
    await anext(client_a)
    if finished:
        assert ids_of([ev async for ev in client_a]) == TOKENS[1:3]
    with pytest.raises(RequestIdConflict):
        await collect(b, request(request_id, 3, prompt=[1, 2, 3]))
    with pytest.raises(RequestIdConflict):
        await collect(b, request(request_id, 4))  # other sampling
    assert b_engine.requests == []
    hang.release.set()
    await client_a.aclose()


async def test_unknown_key_with_an_offset_is_not_found(cores: Cores, request_id: str) -> None:
    b_engine = FakeEngine([])
    b = cores.make(b_engine)
    before = resume_requests("not_found")
    with pytest.raises(NotFound):
        await collect(b, request(request_id, 5, resume_from=2))
    assert resume_requests("not_found") == before + 1
    assert b_engine.requests == []


@pytest.mark.parametrize("claim_expired_first", [False, True])
async def test_a_client_whose_gateway_died_resumes_through_another(
    cores: Cores, redis: aioredis.Redis, request_id: str, claim_expired_first: bool
) -> None:
    """Gateway A dies after sending 5 tokens, having written 3 to Redis (a batch of 3; the
    interval never comes). The client resumes from 5 on B: B takes the generation over and
    continues it after the 3 tokens Redis holds (the engine regenerates tokens 3 and 4, which
    the client already has and does not get again)."""
    n = 12
    out = TOKENS[:n]
    batch_written = Hang()
    a = cores.make(
        FakeEngine([[*tokens(*out[:3]), batch_written, *tokens(*out[3:5]), Hang()]]),
        wall_clock=at(1000.0),
        resume_redis_flush_tokens=3,
        resume_redis_flush_interval_s=3600.0,
    )
    b_engine = FakeEngine([[*tokens(*out[3:]), chunk(final=True)]])
    b_usage = Sink()
    b = cores.make(b_engine, usage=b_usage, wall_clock=at(2000.0))
    opened_a = Opened()
    client_a = a.generate(request(request_id, n), 10.0, opened_a)
    got = [await anext(client_a) for _ in range(3)]
    own = store(a)._owned[Key("", request_id)]

    async def three_written() -> bool:
        return own.flushed_tokens == 3

    await eventually(three_written, what="A wrote its first batch")
    batch_written.release.set()
    got += [await anext(client_a) for _ in range(2)]
    assert ids_of(got) == out[:5]
    await store(a).kill()  # as kill -9: no more writes, its claim runs out
    with pytest.raises(Unavailable):
        await anext(client_a)
    claim = store(b)._keys(Key("", request_id)).claim
    if claim_expired_first:

        async def expired() -> bool:
            return not await redis.exists(claim)

        await eventually(expired, what="A's claim expired")
    before = resume_requests("taken_over")
    opened_b = Opened()
    rest = await collect(b, request(request_id, n, resume_from=5), opened_b)
    # The continuation is the same completion: created when A first opened it.
    assert opened_a.created == opened_b.created == 1000.0

    stream = got + rest
    assert ids_of(stream) == out  # nothing lost, nothing twice
    assert contiguous(stream)
    assert isinstance(stream[-1], Completion)
    assert stream[-1].completion_tokens == n
    assert resume_requests("taken_over") == before + 1
    # B continued the generation: the prompt plus what Redis held, the rest of max_tokens.
    (continuation,) = b_engine.requests
    assert list(continuation.input_ids) == PROMPT + out[:3]
    assert continuation.max_tokens == n - 3
    # A died before writing its usage record: B's one record bills the whole generation.
    billed = await record_of(b_usage, request_id)
    assert billed.completion_tokens == n
    # Finished now, under B: a third client replays it whole.
    c = cores.make(FakeEngine([]), wall_clock=at(3000.0))

    await ended_here(b, "B wrote the end")
    opened_c = Opened()
    assert ids_of(await collect(c, request(request_id, n), opened_c)) == out
    assert opened_c.created == 1000.0


async def test_a_generation_a_draining_gateway_released_is_neither_charged_nor_billed_twice(
    cores: Cores, request_id: str
) -> None:
    """Gateway A drains (close) after streaming 4 tokens: it bills the prompt and those 4 and
    releases the generation. The client resumes through B, where the tenant has used its one
    request per minute: the takeover is not refused (nor charged), and B bills only the rest."""
    n = 10
    out = TOKENS[:n]
    key = "sk-a"

    def auth() -> Authenticator:
        return Authenticator(
            TenantsFile.model_validate(
                {
                    "tenants": [
                        {"name": "a", "api_keys_sha256": [hash_key(key)], "requests_per_minute": 1}
                    ]
                }
            )
        )

    a_usage, b_usage = Sink(), Sink()
    a = cores.make(
        FakeEngine([[*tokens(*out[:4]), Hang()]]),
        usage=a_usage,
        auth=auth(),
        resume_redis_flush_interval_s=3600.0,
    )
    b_engine = FakeEngine([[chunk(1)], [*tokens(*out[4:]), chunk(final=True)]])
    b = cores.make(b_engine, usage=b_usage, auth=auth())
    await collect(b, dataclasses.replace(request(request_id + "-other", 1), api_key=key))
    with pytest.raises(RateLimited):  # B's tenant is out of requests for this minute
        await collect(b, dataclasses.replace(request(request_id + "-more", 1), api_key=key))
    client_a = a.generate(dataclasses.replace(request(request_id, n), api_key=key), 10.0)
    got = [await anext(client_a) for _ in range(4)]
    await a.close()  # drains: writes the 4 tokens, bills them, releases the claim
    with pytest.raises(ServiceError):
        await anext(client_a)
    rest = await collect(b, dataclasses.replace(request(request_id, n, resume_from=4), api_key=key))
    assert ids_of(got + rest) == out
    assert isinstance(rest[-1], Completion)
    (continuation,) = b_engine.requests[1:]
    assert list(continuation.input_ids) == PROMPT + out[:4]
    (first,) = a_usage.records
    assert (first.prompt_tokens, first.completion_tokens) == (len(PROMPT), 4)
    second = await record_of(b_usage, request_id)
    assert (second.prompt_tokens, second.completion_tokens) == (0, n - 4)


async def test_a_follower_that_takes_over_keeps_its_callers_deadline(
    cores: Cores, redis: aioredis.Redis, request_id: str
) -> None:
    """B's client follows A's generation; A dies and B, a lease later, takes it over: the
    continuation runs within what is left of B's caller's deadline (counted from its arrival),
    not a whole new one."""
    a = cores.make(FakeEngine([[*tokens(*TOKENS[:2]), Hang()]]))
    client_a = a.generate(request(request_id, 5), 10.0)
    [await anext(client_a) for _ in range(2)]
    admission = FakeAdmission()
    b = cores.make(FakeEngine([[*tokens(*TOKENS[2:5]), chunk(final=True)]]), admission=admission)
    timeout_s = 30.0
    client_b = b.generate(request(request_id, 5), timeout_s)
    await anext(client_b)  # following A's generation
    await store(a).kill()
    with pytest.raises(Unavailable):
        await anext(client_a)
    rest = [ev async for ev in client_b]
    assert isinstance(rest[-1], Completion)
    [admitted] = admission.timeouts
    assert admitted <= timeout_s - store(b).lease_s  # A's claim had to expire first


async def test_a_takeover_whose_client_leaves_during_the_replay_is_abandoned_after_the_grace(
    cores: Cores, redis: aioredis.Redis, request_id: str
) -> None:
    """B takes over a generation whose gateway died after writing 3 tokens; its client reads
    one of them and leaves: the continuation is cancelled after the grace, not run to the end
    with nobody following it."""
    b = cores.make(FakeEngine([[Hang()]]), resume_grace_s=0.05)
    await killed_after_writing(cores, redis, request_id, TOKENS[:3], 10)
    client_b = b.generate(request(request_id, 10), 10.0)
    first = await anext(client_b)  # the first of the 3 replayed deltas
    assert isinstance(first, Delta)
    assert Key("", request_id) in store(b)._owned  # taken over
    await client_b.aclose()

    async def abandoned() -> bool:
        return Key("", request_id) not in store(b)._owned

    await eventually(abandoned, what="the continuation abandoned after the grace")


async def test_a_generation_nobody_reads_is_abandoned_while_redis_is_unreachable(
    cores: Cores, request_id: str
) -> None:
    """Its client left; whether a gateway follows it cannot be read (Redis unreachable from
    here): nobody can be following what this gateway cannot write there, so it is abandoned
    after the grace, not kept (with its lease and slots) for as long as Redis stays away."""
    engine = FakeEngine([[Hang()]])
    a = cores.make(engine, resume_grace_s=0.05)
    st = store(a)

    async def unreachable(keys: Any) -> int:
        raise RedisConnectionError("Connection refused")

    st._watch_ttl_ms = unreachable  # type: ignore[method-assign]
    client = a.generate(request(request_id, 10), 10.0)
    task = asyncio.ensure_future(anext(client))
    await eventually(lambda: _requested(engine), what="the generation reached its engine")
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await client.aclose()

    async def abandoned() -> bool:
        return Key("", request_id) not in st._owned

    await eventually(abandoned, what="the generation abandoned after the grace")


async def _requested(engine: FakeEngine) -> bool:
    return bool(engine.requests)


async def test_a_running_generation_stays_this_gateways_while_redis_is_away_past_its_keys_ttl(
    cores: Cores, request_id: str
) -> None:
    """Redis unreachable for longer than the generation's keys live (lease + grace): it goes on
    here, serving its client from memory, still counted in the store's bounds (a drain ends
    it) and still writing (backing off): its writes are not given up while it runs. Once Redis
    answers, its end is written and its client gets every token."""
    hang = Hang()
    out = TOKENS[:3]
    a = cores.make(
        FakeEngine([[*tokens(out[0]), hang, *tokens(*out[1:]), chunk(final=True)]]),
        resume_grace_s=0.05,
    )
    st = store(a)
    real = st._write_script
    failed: list[float] = []

    async def unreachable(keys: list[str], args: list[Any]) -> Any:
        failed.append(time.monotonic())
        raise RedisConnectionError("Connection refused")

    client = a.generate(request(request_id, 3), 10.0)
    first = await anext(client)
    st._write_script = unreachable  # type: ignore[assignment]
    ttl = st.lease_s + st.grace_s

    async def retried_past_ttl() -> bool:
        return sum(1 for t in failed if t - failed[0] > ttl) >= 2

    await eventually(retried_past_ttl, what="its writes retried after its keys expired")
    assert Key("", request_id) in st._owned
    assert st.entries == 1
    assert st.tokens > 0
    ended: list[float] = []

    async def answering(keys: list[str], args: list[Any]) -> Any:
        if args[1] != "run":
            ended.append(time.monotonic())
        return await real(keys=keys, args=args)

    st._write_script = answering  # type: ignore[assignment]
    hang.release.set()
    rest = [ev async for ev in client]
    assert ids_of([first, *rest]) == out
    assert isinstance(rest[-1], Completion)

    async def forgotten() -> bool:
        return st.entries == 0 and st.tokens == 0

    await eventually(forgotten, what="the ended generation's room given back")
    assert ended  # its end was written, not given up on


async def test_concurrent_opens_do_not_overfill_the_store(cores: Cores, request_id: str) -> None:
    """Two keyed requests open at once on a store with room for one: the room one takes while
    its open awaits Redis is not given to the other (which is told the store is full)."""
    a = cores.make(
        FakeEngine([[*tokens(*TOKENS[:2]), Hang()], [*tokens(*TOKENS[:2]), Hang()]]),
        resume_max_entries=1,
    )
    st = store(a)
    real = st._open
    asked = 0
    both_asked = asyncio.Event()

    async def together(keys: list[str], args: list[Any]) -> Any:
        nonlocal asked
        asked += 1
        if asked == 2:
            both_asked.set()
        await both_asked.wait()  # each asks (one without room: only to join an existing key)
        return await real(keys=keys, args=args)

    st._open = together  # type: ignore[assignment]
    one = a.generate(request(request_id, 10), 10.0)
    two = a.generate(request(request_id + "-other", 10), 10.0)
    results = await asyncio.gather(anext(one), anext(two), return_exceptions=True)
    refused = [r for r in results if isinstance(r, ResumeStoreFull)]
    started = [r for r in results if isinstance(r, Delta)]
    assert len(refused) == 1, results
    assert len(started) == 1, results
    assert st.entries == 1
    await one.aclose()
    await two.aclose()


async def test_a_retry_while_an_abandoned_generation_is_forgotten_starts_afresh(
    cores: Cores, request_id: str
) -> None:
    """The client left and the grace ran out: the generation is cancelled and its keys are
    being forgotten in Redis (that write held back here). A retry in between waits for it and
    generates again, instead of attaching to the cancelled one (CANCELLED)."""
    out = TOKENS[:3]
    a = cores.make(
        FakeEngine([[*tokens(*out[:2]), Hang()], [*tokens(*out), chunk(final=True)]]),
        resume_grace_s=0.05,
    )
    st = store(a)
    real = st._write_script
    held = asyncio.Event()
    forgets: list[str] = []

    async def hold_forget(keys: list[str], args: list[Any]) -> Any:
        if args[1] == "forget":
            forgets.append(keys[0])
            await held.wait()
        return await real(keys=keys, args=args)

    st._write_script = hold_forget  # type: ignore[assignment]
    client = a.generate(request(request_id, 3), 10.0)
    await anext(client)
    await client.aclose()

    async def forgetting() -> bool:
        return bool(forgets)

    await eventually(forgetting, what="the abandoned generation being forgotten")
    retry = asyncio.ensure_future(collect(a, request(request_id, 3)))
    held.set()
    again = await retry
    assert ids_of(again) == out
    assert isinstance(again[-1], Completion)


async def test_a_takeover_drained_before_it_restored_the_tokens_bills_nothing_and_hands_on(
    cores: Cores, redis: aioredis.Redis, request_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A is killed after writing 4 tokens (no usage record). B takes the generation over and
    drains while it still validates it: B's record bills nothing, its release leaves the
    billing as it was (nobody billed the prompt), so C, taking over next, bills it all."""
    n = 10
    out = TOKENS[:n]
    b_usage, c_usage = Sink(), Sink()
    b = cores.make(FakeEngine([]), usage=b_usage)
    c_engine = FakeEngine([[*tokens(*out[4:]), chunk(final=True)]])
    c = cores.make(c_engine, usage=c_usage)
    await killed_after_writing(cores, redis, request_id, out[:4], n)
    keys = store(b)._keys(Key("", request_id))

    async def expired() -> bool:
        return not await redis.exists(keys.claim)

    validating = asyncio.Event()

    async def stuck(req: GenerationRequest) -> Any:
        validating.set()
        await asyncio.Event().wait()

    monkeypatch.setattr(b, "validate", stuck)
    client_b = asyncio.ensure_future(collect(b, request(request_id, n, resume_from=4)))

    async def b_validates() -> bool:
        return validating.is_set()

    await eventually(b_validates, what="B took it over and validates it")
    await b.close()  # drains: B's generation is cancelled before it restored A's tokens
    with pytest.raises(ServiceError):
        await client_b
    (b_record,) = b_usage.records
    assert (b_record.prompt_tokens, b_record.completion_tokens) == (0, 0)
    assert await redis.hget(keys.meta, "billed") is None
    await eventually(expired, what="B released its claim")
    rest = await collect(c, request(request_id, n, resume_from=4))
    assert ids_of(rest) == out[4:]
    c_record = await record_of(c_usage, request_id)
    assert (c_record.prompt_tokens, c_record.completion_tokens) == (len(PROMPT), n)


async def test_a_takeover_redis_fails_is_refused_with_a_retry_after(
    cores: Cores, redis: aioredis.Redis, request_id: str
) -> None:
    """A's claim ran out after it wrote 3 tokens; B's takeover script fails (Redis went away
    as B asked): the client gets UNAVAILABLE with a retry-after, not an internal error."""
    out = TOKENS[:8]
    a = cores.make(
        FakeEngine([[*tokens(*out[:3]), Hang()]]),
        resume_redis_flush_tokens=3,
        resume_redis_flush_interval_s=3600.0,
    )
    client_a = a.generate(request(request_id, 8), 10.0, Opened())
    assert ids_of([await anext(client_a) for _ in range(3)]) == out[:3]
    own = store(a)._owned[Key("", request_id)]

    async def three_written() -> bool:
        return own.flushed_tokens == 3

    await eventually(three_written, what="A wrote its first batch")
    await store(a).kill()
    claim = store(a)._keys(Key("", request_id)).claim

    async def expired() -> bool:
        return not await redis.exists(claim)

    await eventually(expired, what="A's claim expired")
    b_engine = FakeEngine([[*tokens(*out[3:]), chunk(final=True)]])
    b = cores.make(b_engine)

    async def unreachable(**_: Any) -> int:
        raise RedisConnectionError("connection reset")

    store(b)._takeover = unreachable  # type: ignore[assignment]
    before = resume_requests("unavailable")
    with pytest.raises(Unavailable) as info:
        await collect(b, request(request_id, 8, resume_from=3))
    assert info.value.retry_after_s is not None
    assert resume_requests("unavailable") == before + 1
    assert b_engine.requests == []
    with pytest.raises(Unavailable):
        await anext(client_a)


async def test_writes_are_batched_off_the_token_path(cores: Cores, request_id: str) -> None:
    n = 256
    out = TOKENS[:n]
    a = cores.make(
        FakeEngine([[*tokens(*out), chunk(final=True)]]),
        resume_redis_flush_tokens=64,
        resume_redis_flush_interval_s=0.05,
    )
    before = writes()
    events = await collect(a, request(request_id, n))
    assert ids_of(events) == out

    await ended_here(a, "the end written")
    per_generation = writes() - before
    assert 1 <= per_generation <= n // 16, per_generation
    b = cores.make(FakeEngine([]))
    assert await collect(b, request(request_id, n)) == events


async def test_bad_input_is_told_so_when_the_store_is_full(
    cores: Cores, request_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = cores.make(FakeEngine([[*tokens(*TOKENS[:2]), Hang()]]), resume_max_entries=1)
    running = a.generate(request(request_id, 10), 10.0)
    await anext(running)  # holds the one entry
    with pytest.raises(ResumeStoreFull):
        await collect(a, request(request_id + "-next", 4))
    with pytest.raises(ModelNotFound):
        await collect(a, dataclasses.replace(request(request_id + "-next", 4), model="nope"))
    with pytest.raises(InvalidRequest) as info:
        await collect(a, request(request_id + "-next", 4, temperature=9.0))
    assert info.value.field == "sampling.temperature"

    async def no_tokenizing(text: str) -> list[int]:
        raise AssertionError("a request refused anyway is not tokenized")

    monkeypatch.setattr(cores.model, "encode_off_loop", no_tokenizing)
    text = dataclasses.replace(request(request_id + "-next", 4), prompt_ids=None, prompt_text="x")
    with pytest.raises(ResumeStoreFull):
        await collect(a, text)
    # What needs no tokenizer is still told: an empty or too long text, an empty chat.
    for bad, field in (
        (dataclasses.replace(text, prompt_text=""), "prompt"),
        (dataclasses.replace(text, prompt_text="x" * 10**7), "prompt.text"),
        (dataclasses.replace(text, prompt_text=None, messages=()), "messages"),
    ):
        with pytest.raises(InvalidRequest) as info:
            await collect(a, bad)
        assert info.value.field == field
    await running.aclose()


async def test_keyed_requests_are_refused_while_redis_is_unreachable(
    cores: Cores, request_id: str
) -> None:
    cores.url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    engine = FakeEngine([[*tokens(*TOKENS[:2]), chunk(final=True)]])
    core = cores.make(engine)
    before = resume_requests("unavailable")
    with pytest.raises(Unavailable) as info:
        await collect(core, request(request_id, 2))
    assert info.value.retry_after_s is not None
    assert resume_requests("unavailable") == before + 1
    assert engine.requests == []  # never served unkeyed
    unkeyed = GenerationRequest(
        model=MODEL, request_id="", prompt_ids=PROMPT, sampling=Sampling(max_tokens=2)
    )
    assert ids_of(await collect(core, unkeyed)) == TOKENS[:2]


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    server.start_blocking()
    try:
        yield server
    finally:
        server.stop()


async def test_a_running_generation_outlives_redis_going_away(
    model: ServedModel, own_redis: RedisServer, request_id: str
) -> None:
    """Redis dies mid-stream: the gateway running the generation keeps serving its client from
    memory; a new keyed request is refused until Redis is back."""
    hang = Hang()
    out = TOKENS[:6]
    made = Cores(model, own_redis.url)
    a = made.make(FakeEngine([[*tokens(*out[:3]), hang, *tokens(*out[3:]), chunk(final=True)]]))
    try:
        client = a.generate(request(request_id, 6), 10.0)
        got = [await anext(client) for _ in range(3)]
        own_redis.stop()
        hang.release.set()
        got += [ev async for ev in client]
        assert ids_of(got) == out
        with pytest.raises(Unavailable):
            await collect(a, request(request_id + "-new", 2))
    finally:
        for core in made.made:
            await core.close()


async def redis_changed_midway(
    cores: Cores,
    request_id: str,
    change: Callable[[_Keys], Awaitable[object]],
    *,
    flush_tokens: int = 1000,  # default: nothing written before the end
) -> tuple[list[Event], UsageRecord, _Keys]:
    """Gateway A streams a generation of 6 tokens; after the first 3, `change` alters its keys
    in Redis (what another gateway, or Redis itself, did meanwhile); then A's engine goes on to
    the end. The events A's client got, A's usage record, and the generation's keys."""
    out = TOKENS[:6]
    gate = Hang()
    usage = Sink()
    a = cores.make(
        FakeEngine([[*tokens(*out[:3]), gate, *tokens(*out[3:]), chunk(final=True)]]),
        usage=usage,
        resume_redis_flush_interval_s=3600.0,
        resume_redis_flush_tokens=flush_tokens,
    )
    client = a.generate(request(request_id, len(out)), 10.0)
    got = [await anext(client) for _ in range(3)]
    keys = store(a)._keys(Key("", request_id))
    await change(keys)
    gate.release.set()
    got += [ev async for ev in client]
    return got, await record_of(usage, request_id), keys


async def test_a_gateway_that_lost_its_claim_as_its_engine_finished_bills_nothing(
    cores: Cores, redis: aioredis.Redis, request_id: str
) -> None:
    """Another gateway took A's claim (A was cut off from Redis past its lease, say) while A's
    engine went on to the end: A's client still gets its stream from memory, A's last write is
    refused, and A's usage record, held until that answer, bills nothing (the taker bills the
    generation from the last release on)."""
    got, record, _ = await redis_changed_midway(
        cores, request_id, lambda keys: redis.set(keys.claim, "another-gateway")
    )
    assert ids_of(got) == TOKENS[:6]
    assert isinstance(got[-1], Completion)
    assert (record.prompt_tokens, record.completion_tokens, record.outcome) == (0, 0, "success")


@pytest.mark.parametrize("gone", ["claim", "meta", "taken and finished"])
async def test_a_generation_bills_where_it_ran_unless_another_gateway_took_it(
    cores: Cores, redis: aioredis.Redis, request_id: str, gone: str
) -> None:
    """A's claim expired with nobody taking the generation over (Redis away longer than the
    lease), or its whole key did: A's engine goes on to the end, and A bills the generation (its
    end is recorded: no takeover continues a generation that finished). Had gateway B taken it
    over and finished it meanwhile, B bills it and A's record bills nothing."""

    async def change(keys: _Keys) -> None:
        if gone == "taken and finished":  # as B's takeover, then B's end, leave them
            await redis.hset(keys.meta, mapping={"owner": "gateway-b", "done": "1"})
        await redis.delete(keys.meta if gone == "meta" else keys.claim)

    got, record, keys = await redis_changed_midway(cores, request_id, change)
    assert ids_of(got) == TOKENS[:6]
    billed = (0, 0) if gone == "taken and finished" else (len(PROMPT), 6)
    assert (record.prompt_tokens, record.completion_tokens) == billed
    if gone == "claim":
        assert await redis.hget(keys.meta, "done") == b"1"  # the end recorded


async def test_a_running_generation_whose_key_expired_is_served_and_kept_here(
    cores: Cores, redis: aioredis.Redis, request_id: str
) -> None:
    """Redis lost A's whole key (away longer than its TTL) while A ran the generation: nobody
    else can continue it, so A serves its client to the end from memory, keeps the generation
    (a retry here attaches to it; a drain waits for it), and bills it."""
    got, record, _ = await redis_changed_midway(
        cores,
        request_id,
        lambda keys: redis.delete(keys.meta, keys.claim),
        flush_tokens=4,  # a write once 4 tokens wait: after the key is gone
    )
    assert ids_of(got) == TOKENS[:6]  # not cut off as a lost claim
    assert (record.prompt_tokens, record.completion_tokens) == (len(PROMPT), 6)


async def test_the_fenced_write_without_the_claim(
    cores: Cores, redis: aioredis.Redis, request_id: str
) -> None:
    """The write script's answers when its gateway does not hold the claim: each case as Redis
    would hold it after what the case names."""
    a = cores.make(FakeEngine([]))
    rs = store(a)
    keys = rs._keys(Key("", request_id))
    me = rs.owner

    async def write(mode: str) -> int:
        return int(
            await rs._write_script(
                keys=[keys.meta, keys.claim, keys.log("g1"), keys.watch],
                args=[me, mode, 2000, 10_000, 60_000, 5000, "", "g1", 0, 0],
            )
        )

    async def state(owner: str, done: str = "0", holder: str | None = None) -> None:
        await redis.delete(keys.meta, keys.claim)
        await redis.hset(keys.meta, mapping={"gen": "g1", "done": done, "owner": owner})
        if holder is not None:
            await redis.set(keys.claim, holder)

    await state(me, holder="gateway-b")  # B holds it
    assert await write("run") == 0
    await state("gateway-b")  # B took it over, then finished, released or died
    assert await write("done") == 0
    await state(me)  # expired, nobody took it: still A's, claimed again by its next write
    assert await write("run") == 1
    assert await redis.get(keys.claim) == me.encode()
    await state(me, done="1")  # A's own end, its answer lost: the retry is no second end
    assert await write("done") == 1
    await state(me)
    assert await write("release") == 1
    await redis.hset(keys.meta, "owner", "gateway-b")  # A's release landed, B took it over
    assert await write("release") == 1  # A's retry: its release, not a takeover of B's
    await redis.delete(keys.meta, keys.claim)  # the key is gone
    assert await write("run") == 2
    await state(me, holder="gateway-c")
    await redis.hset(keys.meta, "gen", "g2")  # a newer generation under the key
    assert await write("done") == 2
    await state(me, holder=me)  # a newer generation this gateway opened: its claim is g2's
    await redis.hset(keys.meta, "gen", "g2")
    assert await write("run") == 2
    assert await redis.hget(keys.meta, "logged") is None


async def test_a_write_retried_after_its_answer_was_lost_logs_each_event_once(
    cores: Cores, redis: aioredis.Redis, request_id: str
) -> None:
    """The write script appends only the events past what the log holds: a retry of a batch
    whose first answer was lost (the same events, or those and more since) appends each event
    once, and an error item still goes on."""
    a = cores.make(FakeEngine([]))
    rs = store(a)
    keys = rs._keys(Key("", request_id))
    await redis.hset(keys.meta, mapping={"gen": "g1", "done": "0", "owner": rs.owner})
    await redis.set(keys.claim, rs.owner)
    deltas = [Delta(f"w{i}", [TOKENS[i]], i) for i in range(5)]

    async def write(mode: str, first: int, events: Sequence[Event], error: bool = False) -> int:
        err = Unavailable("engine gone") if error else None
        head: list[str | int] = [rs.owner, mode, 2000, 10_000, 60_000, 5000, "", "g1", first]
        return int(
            await rs._write_script(
                keys=[keys.meta, keys.claim, keys.log("g1"), keys.watch],
                args=[*head, len(events), *encode_items(events, err)],
            )
        )

    async def logged() -> tuple[list[Event], ServiceError | None, int]:
        events, error, _ = await rs._read_log(keys.log("g1"), "-")
        return events, error, int(await redis.xlen(keys.log("g1")))

    assert await write("run", 0, deltas[:2]) == 1
    assert await write("run", 0, deltas[:2]) == 1  # its answer was lost: the same batch again
    assert await logged() == (deltas[:2], None, 1)
    assert await write("run", 0, deltas[:4]) == 1  # again, with what came since
    assert await logged() == (deltas[:4], None, 2)
    assert await write("forget", 4, deltas[4:], error=True) == 1
    events, error, entries = await logged()
    assert (events, entries) == (deltas, 3)
    assert isinstance(error, Unavailable)


async def test_a_generation_whose_write_answer_was_lost_replays_each_token_once(
    cores: Cores, request_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A's first write reaches Redis but its answer is lost (the connection dropped): A writes
    the batch again with its next one, and a client replaying the generation through gateway B
    gets each token once."""
    out = TOKENS[:6]
    gate = Hang()
    a = cores.make(
        FakeEngine([[*tokens(*out[:3]), gate, *tokens(*out[3:]), chunk(final=True)]]),
        resume_redis_flush_tokens=3,
        resume_redis_flush_interval_s=0.01,
    )
    rs = store(a)
    real = rs._write_script
    lost: list[int] = []

    async def answer_lost_once(*, keys: list[str], args: list[Any]) -> Any:
        answer = await real(keys=keys, args=args)
        if not lost and len(args) > 10:
            lost.append(int(args[9]))
            raise RedisConnectionError("connection lost before the answer")
        return answer

    monkeypatch.setattr(rs, "_write_script", answer_lost_once)
    client = a.generate(request(request_id, len(out)), 10.0)
    got = [await anext(client) for _ in range(3)]

    async def first_write_lost() -> bool:
        return bool(lost)

    await eventually(first_write_lost, what="A's first write, its answer lost")
    gate.release.set()
    got += [ev async for ev in client]
    assert ids_of(got) == out

    await ended_here(a, "A's end written")
    b = cores.make(FakeEngine([]))
    replayed = await collect(b, request(request_id, len(out)))
    assert ids_of(replayed) == out  # not the first batch twice
    assert contiguous(replayed)


async def test_a_takeover_of_a_generation_whose_log_was_evicted_logs_all_it_generates(
    cores: Cores, redis: aioredis.Redis, request_id: str
) -> None:
    """A wrote 4 tokens and was killed; Redis then evicted the log and kept the meta. B takes
    the generation over with nothing to continue from and generates it again: B's log holds all
    of it (a replay through C gets every token), not only what comes after the 4 A logged."""
    out = TOKENS[:8]
    await killed_after_writing(cores, redis, request_id, out[:4], len(out))
    b = cores.make(FakeEngine([[*tokens(*out), chunk(final=True)]]))
    keys = store(b)._keys(Key("", request_id))
    gen = await redis.hget(keys.meta, "gen")
    assert isinstance(gen, bytes)
    assert await redis.delete(keys.log(gen.decode())) == 1
    assert ids_of(await collect(b, request(request_id, len(out)))) == out

    await ended_here(b, "B wrote the end")
    c = cores.make(FakeEngine([]))
    replayed = await collect(c, request(request_id, len(out)))
    assert ids_of(replayed) == out
    assert contiguous(replayed)


async def test_a_finished_generation_whose_log_lost_its_start_is_generated_again(
    cores: Cores, redis: aioredis.Redis, request_id: str
) -> None:
    """Redis evicted A's log after its first batch; A's next writes started a new one, without
    the first tokens. Another gateway's client does not get the answer without its start: a
    retry generates it again there, and a resume is NOT_FOUND (as a log gone whole)."""
    out = TOKENS[:6]
    gate = Hang()
    a = cores.make(
        FakeEngine([[*tokens(*out[:2]), gate, *tokens(*out[2:]), chunk(final=True)]]),
        resume_redis_flush_tokens=2,
        resume_redis_flush_interval_s=3600.0,
    )
    client = a.generate(request(request_id, len(out)), 10.0)
    got = [await anext(client) for _ in range(2)]
    own = store(a)._owned[Key("", request_id)]

    async def first_batch_written() -> bool:
        return own.flushed_tokens == 2

    await eventually(first_batch_written, what="A wrote its first batch")
    assert await redis.delete(own.keys.log(own.gen_id)) == 1  # evicted
    gate.release.set()
    got += [ev async for ev in client]
    assert ids_of(got) == out

    await ended_here(a, "A wrote the end")
    b = cores.make(FakeEngine([[*tokens(*out), chunk(final=True)]]))
    with pytest.raises(NotFound):
        await collect(b, request(request_id, len(out), resume_from=2))
    again = await collect(b, request(request_id, len(out)))
    assert ids_of(again) == out
    assert contiguous(again)


async def test_keyed_generations_beyond_the_pool_wait_for_connections(
    cores: Cores, redis: aioredis.Redis
) -> None:
    """More keyed generations opening and writing at once than the store's pool holds wait for
    a connection: redis-py's default pool failed every call past 100 in use, which refused the
    generations as if Redis were down. The store's connections stay within the bound."""
    n, out = 40, TOKENS[:8]
    core = cores.make(
        FakeEngine([[*tokens(*out), chunk(final=True)]] * n),
        redis_max_connections=2,
        resume_redis_timeout_s=5.0,  # the wait for a connection on a loaded machine
    )
    results = await asyncio.gather(
        *(collect(core, request(f"pool-{i}-{next(_ids)}", 8)) for i in range(n))
    )
    assert all(ids_of(events) == out for events in results)
    await ended_here(core, "every generation's end written to Redis")
    # The store's command connections (at most 2; its blocking reads', none: no follower) and
    # this test's own client.
    assert len(await redis.client_list()) <= 3


async def test_a_follower_taking_its_events_slowly_keeps_the_generation_alive(
    cores: Cores, request_id: str
) -> None:
    """The owner's client left; a client on another gateway attached and takes the replay
    slowly (nothing for five times the owner's grace): the generation runs on for it. The watch
    was set only between the follower's reads of the log, so a follower paused on a replayed
    event let the owner abandon the generation under it."""
    hang = Hang()
    out = TOKENS[:10]
    a_engine = FakeEngine([[*tokens(*out[:5]), hang, *tokens(*out[5:]), chunk(final=True)]])
    a = cores.make(a_engine, resume_grace_s=0.2)
    b = cores.make(FakeEngine([]), resume_grace_s=0.2)
    client_a = a.generate(request(request_id, 10), 10.0)
    got_a = [await anext(client_a) for _ in range(5)]
    async with contextlib.aclosing(b.generate(request(request_id, 10), 10.0)) as follower:
        first = await anext(follower)  # attached: the replay begins
        await client_a.aclose()  # the owner's client leaves: its grace runs
        await asyncio.sleep(1.0)  # the follower's client takes nothing meanwhile (the condition)
        hang.release.set()
        rest = [ev async for ev in follower]
    assert ids_of([first, *rest]) == out
    assert ids_of(got_a) == out[:5]
    assert isinstance(rest[-1], Completion)
    assert a_engine.cancelled == 0


@pytest.mark.parametrize(
    ("failure", "code", "retry_after_s"),
    [
        (InvalidRequest("prompt_ids: 9000 tokens exceed the context"), "INVALID_ARGUMENT", None),
        (
            RateLimited("tenant 'a': tokens per minute", limit="tokens", retry_after_s=7.5),
            "RESOURCE_EXHAUSTED",
            7.5,
        ),
        (DeadlineExceeded("the request's deadline passed"), "DEADLINE_EXCEEDED", None),
        (Unavailable("the replica failed", retry_after_s=30.0), "UNAVAILABLE", 1.0),
        (ServiceError("a bug"), "UNAVAILABLE", 1.0),
    ],
)
def test_a_generations_failure_reaches_its_followers_as_the_requests_own(
    failure: ServiceError, code: str, retry_after_s: float | None
) -> None:
    """A caller following the generation from another gateway gets the request's own failure
    (its input, its limits, its deadline) as the caller on the gateway running it did, not a
    retry that fails again; a failure of that gateway or its replica reads UNAVAILABLE."""
    batch = b"[" + b",".join(encode_items([], failure)) + b"]"
    _, error = decode_batch(batch)
    assert error is not None
    assert (error.code.name, error.retry_after_s) == (code, retry_after_s)
    if code != "UNAVAILABLE":
        assert str(failure) in str(error)
    # An older writer's item (code and message only) still reads UNAVAILABLE.
    old = json.dumps([{"x": [failure.code.name, str(failure)]}]).encode()
    assert decode_batch(old)[1].code.name in ("UNAVAILABLE", "CANCELLED")  # type: ignore[union-attr]
