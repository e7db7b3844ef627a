"""The orchestrator's view of kv_registry: prefix lookups for routing, and the approximate-mode
loop (record each routing decision as predicted blocks; correct it with what the engine reports).

Every call degrades gracefully: a failed lookup routes prefix-blind, a failed record or report
only loses prediction quality. Prompts are hashed once here and sent as block hashes.

kv_registry runs as several independent replicas, each fed by every engine
(`llmmesh.common.kv_registries`). Lookups read from one of them: the last one that answered
(sticky, so a freshly restarted replica that is still resyncing is not preferred over one that
kept its index), failing over within the same lookup to the next one when it errs or misses its
deadline. A lookup goes over the registry's LookupStream (one long-lived call per registry, opened
on first use and after it ended; answers matched to lookups by request id), or as a unary Lookup
where streams are turned off (`kv_lookup_stream`), refused (an older registry, a mesh policy) or
full (`MAX_STREAM_WAITING` lookups waiting): the stream saves a call's own cost, about half of
the round trip and of each side's CPU per lookup. A replica that failed is skipped for `retry_s`, then tried again when a lookup needs
it. Approximate-mode updates (RecordRouting, ReportReuse, DropReplica) go to every replica not
marked down, concurrently and in the background (the caller never waits on them), so each
replica's predictions follow the same routing; RecordRouting's predicted blocks are the preferred
replica's answer. A replica that was down misses the updates of that time: its predictions
(short-lived: they end with their lease) are those of a restarted replica.

With a copy of the exact index (`mirror`, `kv_mirror.ExactMirror`), one registry is watched
(WatchExact, from the first registry up) and a lookup whose candidate replicas are all exact in
the copy, while it is in sync, is answered from it: no call, no registry CPU. Any other lookup
(an approximate-mode candidate, the copy out of sync) goes to a registry as above. A watch that
ends drops the copy and starts again from a fresh snapshot.

Updates are queued and sent in order, as UpdateBatch calls (`llmmesh.common.batching`): at most
one batch in flight, the next one holds what arrived meanwhile (up to `MAX_BATCH`), so under
load one call carries many decisions' updates. A batch that is not full waits `linger_s` before
it leaves: an idle orchestrator's routing update then leaves after the Admit's answer (not on
the request's way to its first token), a request's reuse report shares a call with the next
request's routing, and a busy one makes at most one call per `linger_s` until its batches fill
(each call costs both processes a gRPC call's CPU). The queue holds at most
`max_pending` updates; beyond that the oldest is dropped (`llmmesh_orchestrator_kv_updates_dropped_total`):
an update lost costs prediction quality only. A registry that does not know UpdateBatch
(UNIMPLEMENTED: an older version) gets the batch's updates one RPC each, in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
import time
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

import grpc

from llmmesh.common import kv_registries
from llmmesh.common.batching import LingerBatcher
from llmmesh.common.channels import KEEPALIVE_OPTIONS
from llmmesh.common.errors import NOT_OFFERED
from llmmesh.common.kv_registries import RegistryEndpoint
from llmmesh.common.telemetry import inject_trace_metadata
from llmmesh.generated.kvregistry.v1 import kvregistry_pb2 as pb
from llmmesh.generated.kvregistry.v1 import kvregistry_pb2_grpc as pb_grpc
from llmmesh.kvblocks import BlockConfig, ChunkedHashes, PromptHashes
from llmmesh.kvblocks import token_bytes as kv_token_bytes
from services.orchestrator import metrics
from services.orchestrator.kv_mirror import ExactMirror, MirrorFull
from services.orchestrator.settings import OrchestratorSettings

_T = TypeVar("_T")

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class PrefixMatches:
    prompt_blocks: int
    matched_blocks: dict[str, int]
    hashes: Sequence[int] = field(default=())
    # kv_registry's own matches where `matched_blocks` also counts live leases' prompts
    # (`InflightPrefixes.merge`); None when they are the same.
    registered: dict[str, int] | None = None
    # Replicas whose registered matches come from their own KV events (exact mode): the
    # registry's answer to a RecordRouting for one of them is its registered match.
    exact: frozenset[str] = frozenset()

    def registered_blocks(self, replica_id: str) -> int:
        """The blocks kv_registry says the replica holds (in-flight prompts not counted)."""
        known = self.matched_blocks if self.registered is None else self.registered
        return known.get(replica_id, 0)

    def cached_tokens(self, replica_id: str, prompt_tokens: int) -> int:
        """The prompt tokens the replica reuses: its matched share of the prompt's blocks."""
        return self._prorated(self.matched_blocks.get(replica_id, 0), prompt_tokens)

    def registered_tokens(self, replica_id: str, prompt_tokens: int) -> int:
        """`cached_tokens` of the blocks kv_registry says the replica holds (in-flight prompts
        not counted)."""
        return self._prorated(self.registered_blocks(replica_id), prompt_tokens)

    def _prorated(self, blocks: int, prompt_tokens: int) -> int:
        """`blocks` of the prompt's blocks as its tokens."""
        if self.prompt_blocks == 0:
            return 0
        return blocks * prompt_tokens // self.prompt_blocks

    def fraction(self, replica_id: str) -> float:
        if self.prompt_blocks == 0:
            return 0.0
        return self.matched_blocks.get(replica_id, 0) / self.prompt_blocks


NO_MATCHES = PrefixMatches(0, {})


class PrefixIndex(Protocol):
    async def lookup(
        self,
        token_ids: Sequence[int],
        replica_ids: Collection[str] = (),
        hashes: PromptHashes | None = None,
    ) -> PrefixMatches:
        """Matches per replica; `replica_ids`: the replicas the decision may choose (an index
        may answer from a local copy when it holds the whole truth for them). `hashes`: the
        prompt's block hashes as its sender computed them, used instead of hashing `token_ids`
        when computed with this index's block config; with another config and no `token_ids`,
        no matches (cache-blind routing)."""
        ...

    async def record_routing(self, replica_id: str, hashes: Sequence[int]) -> int:
        """Blocks the registry predicted the replica held before this routing."""
        ...

    async def report_reuse(
        self,
        replica_id: str,
        hashes: Sequence[int],
        reported: int,
        prompt_tokens: int,
        predicted: int,
    ) -> None: ...

    async def drop_replica(self, replica_id: str) -> None: ...


def token_bytes(token_ids: Sequence[int]) -> bytes:
    """The prompt as little-endian uint32s (the bytes block hashes cover): the Admit's packed
    prompt as it came (`prompt_tokens_le32`, viewed by `kvblocks.tokens_from_bytes`), else
    `struct.pack` over the sequence, the cheapest way out of a protobuf repeated field (about
    half of `array("I", ...)`'s cost, ~0.9 ms for a 32k-token prompt)."""
    if isinstance(token_ids, memoryview):
        return kv_token_bytes(token_ids)
    return struct.pack(f"<{len(token_ids)}I", *token_ids)


class StreamReset(Exception):
    """The lookup's LookupStream ended because the registry refused another lookup on it
    (INVALID_ARGUMENT: that prompt, not this one nor the registry): ask again, alone."""


class _LookupStream:
    """One open LookupStream call. Lookups are queued for its one writer task (a caller never
    writes itself: a write cancelled with its caller would cancel the whole call), each with its
    own `request_id`, and each answer resolves the waiter of its id (one whose lookup gave up, at
    its deadline or cancelled, is gone: its answer is dropped). Until the registry has answered
    once, lookups go one at a time, so a registry that refuses the stream answers with its status
    (UNIMPLEMENTED), not with the errors of writes to a dead call. When the call ends, every
    waiter fails with its status; the owner opens a new one (and closes this one when a lookup on
    it timed out: a stalled call is not reused). Except when the registry refused a request
    (INVALID_ARGUMENT ends the call): it answers in order, so that is the first request written
    and not answered, which alone fails with the status; the others fail with `StreamReset`."""

    def __init__(self, stub: pb_grpc.KvRegistryServiceAsyncStub, max_waiting: int) -> None:
        # Requests are written one by one (`write`), not from an iterator.
        self._call = stub.LookupStream()  # type: ignore[call-arg]
        self._waiting: dict[int, asyncio.Future[pb.LookupResponse]] = {}
        # Ids of the requests written (or being written) and not answered, whether or not their
        # lookup still waits: the first is the one the registry is on.
        self._unanswered: set[int] = set()
        self._outbox: asyncio.Queue[pb.LookupRequest] = asyncio.Queue()
        self._max_waiting = max_waiting
        self._next_id = 1
        self._first = asyncio.Lock()  # held by a lookup until the registry first answers
        self._answered = False
        self.error: grpc.aio.AioRpcError | None = None  # why the call ended
        loop = asyncio.get_running_loop()
        self._writer = loop.create_task(self._write())
        self._reader = loop.create_task(self._read())

    @property
    def open(self) -> bool:
        return self.error is None

    @property
    def full(self) -> bool:
        return len(self._waiting) >= self._max_waiting

    async def lookup(
        self, hashes: Sequence[int], trace_context: Mapping[str, str], timeout_s: float
    ) -> pb.LookupResponse:
        """The answer, or the call's AioRpcError, or TimeoutError after `timeout_s` (waiting
        for a new call's first answer included)."""
        async with asyncio.timeout(timeout_s):
            if not self._answered:
                async with self._first:
                    if not self._answered:
                        response = await self._ask(hashes, trace_context)
                        self._answered = True
                        return response
            return await self._ask(hashes, trace_context)

    async def _ask(
        self, hashes: Sequence[int], trace_context: Mapping[str, str]
    ) -> pb.LookupResponse:
        if self.error is not None:
            if self.error.code() == grpc.StatusCode.INVALID_ARGUMENT:
                raise StreamReset  # another request's refusal ended it
            raise _again(self.error)
        rid = self._next_id
        self._next_id += 1
        answer: asyncio.Future[pb.LookupResponse] = asyncio.get_running_loop().create_future()
        self._waiting[rid] = answer
        self._outbox.put_nowait(
            pb.LookupRequest(block_hashes=hashes, request_id=rid, trace_context=trace_context)
        )
        try:
            return await answer
        finally:
            self._waiting.pop(rid, None)

    async def _write(self) -> None:
        # A call that ended refuses the write; its reader fails the waiters with its status.
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
            while True:
                request = await self._outbox.get()
                self._unanswered.add(
                    request.request_id
                )  # its answer may come before the write returns
                await self._call.write(request)

    async def _read(self) -> None:
        try:
            while True:
                response = await self._call.read()
                if response is grpc.aio.EOF:  # type: ignore[attr-defined]
                    code = await self._call.code()
                    if code == grpc.StatusCode.OK:
                        code = grpc.StatusCode.UNAVAILABLE  # ended without an error: go elsewhere
                    raise _ended(code, await self._call.details() or "LookupStream ended")
                assert isinstance(response, pb.LookupResponse)
                self._unanswered.discard(response.request_id)
                answer = self._waiting.pop(response.request_id, None)
                if answer is not None and not answer.done():
                    answer.set_result(response)
        except grpc.aio.AioRpcError as err:
            self._fail(err)
        except asyncio.CancelledError:
            self._fail(_ended(grpc.StatusCode.CANCELLED, "LookupStream closed"))
            raise
        except Exception as err:  # e.g. an answer that does not parse: end this call
            log.warning("LookupStream broke", exc_info=True)
            self._fail(_ended(grpc.StatusCode.INTERNAL, f"LookupStream broke: {err!r}"))
        finally:
            self._call.cancel()
            self._writer.cancel()

    def _fail(self, err: grpc.aio.AioRpcError) -> None:
        self.error = err
        waiting, self._waiting = self._waiting, {}
        refused = None
        if err.code() == grpc.StatusCode.INVALID_ARGUMENT and self._unanswered:
            refused = min(self._unanswered)
        for rid, answer in waiting.items():
            if answer.done():
                continue
            if err.code() != grpc.StatusCode.INVALID_ARGUMENT or rid == refused:
                answer.set_exception(_again(err))
            else:
                answer.set_exception(StreamReset())

    async def close(self) -> None:
        self._reader.cancel()
        self._writer.cancel()
        for task in (self._reader, self._writer):
            with contextlib.suppress(asyncio.CancelledError):
                await task


# An older registry, a mesh policy, or another block identity: watching again would not help.
_NO_WATCH = NOT_OFFERED | {grpc.StatusCode.INVALID_ARGUMENT}
# How a registry ends the watch of a copy that fell behind (`kv_registry.servicer.Watcher`).
_FELL_BEHIND = frozenset({grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.CANCELLED})


async def _unless_closed(call: Awaitable[_T]) -> _T:
    """`call`'s result; its channel closed meanwhile (`refresh` removed the registry) raises
    UsageError, not the CancelledError grpc raises then, which would end the caller as if it
    were cancelled (an Admit never answered)."""
    try:
        return await call
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is None or task.cancelling():
            raise
        raise grpc.aio.UsageError("channel closed during the call") from None


def _ended(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details, None)


def _again(err: grpc.aio.AioRpcError) -> grpc.aio.AioRpcError:
    """A fresh error like `err`, for each waiter it fails (one instance raised many times would
    keep growing its traceback)."""
    return _ended(err.code(), err.details() or "LookupStream ended")


@dataclass(slots=True, eq=False)
class _Registry:
    endpoint: RegistryEndpoint
    channel: grpc.aio.Channel
    stub: pb_grpc.KvRegistryServiceAsyncStub
    down_until: float = 0.0  # monotonic; skipped until then after a failure
    no_watch_until: float = 0.0  # monotonic; refused WatchExact: another is watched until then
    down: bool = False  # the last call failed (logged once per outage)
    batches: bool = True  # answers UpdateBatch (False once it said UNIMPLEMENTED, until down)
    streams: bool = True  # answers LookupStream (False once it said UNIMPLEMENTED, until down)
    stream: _LookupStream | None = None  # the open LookupStream, once a lookup opened it

    @property
    def address(self) -> str:
        return self.endpoint.address


@dataclass(slots=True, eq=False)
class _Update:
    message: pb.RegistryUpdate
    # Resolved once sent (or dropped): the predicted blocks for a routing update, else 0.
    done: asyncio.Future[int]


class RegistryPrefixIndex:
    """Prefix lookups and approximate-mode updates over every kv_registry replica: the static
    `endpoints`, plus those `refresh()` finds behind `dns` (host:port of a headless Service)."""

    LOOKUP_ATTEMPTS = 2  # registries one lookup tries before it routes prefix-blind
    MAX_BATCH = 256  # updates in one UpdateBatch call
    MAX_STREAM_WAITING = 1024  # lookups awaiting answers on one stream; beyond, unary calls
    WATCH_REFUSED_RETRY_S = 60.0  # a refused watch, or a copy over its bound, is tried again
    # A copy that keeps falling behind or outgrowing its bound is tried again after twice as
    # long each time, up to this: each try costs the registry a snapshot and this loop its
    # application, exactly while it is loaded.
    WATCH_BACKOFF_MAX_S = 600.0

    def __init__(
        self,
        endpoints: Sequence[RegistryEndpoint],
        block_config: BlockConfig,
        timeout_s: float,
        *,
        dns: str | None = None,
        retry_s: float = kv_registries.RETRY_S,
        update_timeout_s: float = 1.0,
        max_pending: int = 4096,
        linger_s: float = 0.0,
        stream_lookups: bool = True,
        mirror: ExactMirror | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        """`mirror`: a copy of the registries' exact index to keep (WatchExact) and to answer
        lookups from where it covers every candidate replica; None: every lookup is a call."""
        if not endpoints and not dns:
            raise ValueError("no kv_registry to read from")
        self._static = list(endpoints)
        self._dns = dns
        self._config = block_config
        self._timeout_s = timeout_s
        self._retry_s = retry_s
        self.watch_wait_s = 0.0  # how long the watch loop waits before its next watch
        self._update_timeout_s = update_timeout_s
        self._stream_lookups = stream_lookups
        self._updates: LingerBatcher[_Update] = LingerBatcher(
            self._send_updates,
            max_batch=self.MAX_BATCH,
            max_queue=max_pending,
            linger_s=linger_s,
            on_drop=_dropped,
            name="kv_registry updates",
        )
        self._clock = clock
        self._registries: list[_Registry] = []
        self._preferred: _Registry | None = None
        self._set_endpoints(self._static)
        self._hashes = ChunkedHashes(block_config)
        self._mismatch_logged = False  # a caller's hashes of another block config, warned once
        self._mirror = mirror
        self._watcher: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def addresses(self) -> list[str]:
        """The registries known now, in preference order of a fresh start."""
        return [r.address for r in self._registries]

    @property
    def mirror(self) -> ExactMirror | None:
        """The copy of the exact index kept, if any."""
        return self._mirror

    @property
    def preferred(self) -> str | None:
        """The registry lookups go to first."""
        return self._preferred.address if self._preferred is not None else None

    async def refresh(self) -> None:
        """Re-resolve `dns` (no-op without it); keep what we had when resolution fails."""
        if self._dns is None:
            return
        found = await kv_registries.resolve_dns(self._dns)
        if found is not None:
            for gone in self._set_endpoints(kv_registries.merge(self._static, found)):
                await self._close(gone)

    def _set_endpoints(self, endpoints: Sequence[RegistryEndpoint]) -> list[_Registry]:
        current = {r.address: r for r in self._registries}
        keep: list[_Registry] = []
        for e in endpoints:
            reg = current.pop(e.address, None)
            if reg is None:
                # Keepalive: a peer lost without a reset would hold the watch (and the copy's
                # `synced`) forever; its ping times out instead and the watch starts over.
                channel = grpc.aio.insecure_channel(
                    e.address, options=[*e.channel_options(), *KEEPALIVE_OPTIONS]
                )
                reg = _Registry(e, channel, pb_grpc.KvRegistryServiceStub(channel))
                log.info("kv_registry replica added", extra={"registry": e.address})
            keep.append(reg)
        self._registries = keep
        if self._preferred is not None and self._preferred.address in current:
            self._preferred = None
        for gone in current.values():
            log.info("kv_registry replica removed", extra={"registry": gone.address})
        return list(current.values())

    def _up(self) -> list[_Registry]:
        """Registries not skipped now, the preferred one first."""
        now = self._clock()
        up = [r for r in self._registries if r.down_until <= now]
        pref = self._preferred
        if pref is not None and pref in up:
            up.remove(pref)
            up.insert(0, pref)
        return up

    def _failed(self, reg: _Registry, err: grpc.aio.AioRpcError, call: str) -> None:
        reg.down_until = self._clock() + self._retry_s
        reg.batches = True  # it may come back as another version
        reg.streams = True
        if self._preferred is reg:
            self._preferred = None
        if not reg.down:
            reg.down = True
            log.warning(
                "kv_registry replica failed; skipping it",
                extra={
                    "registry": reg.address,
                    "call": call,
                    "error": err.code().name,
                    "retry_s": self._retry_s,
                },
            )

    def _prompt_hashes(self, token_ids: Sequence[int], sent: PromptHashes | None) -> Sequence[int]:
        """The prompt's block hashes: as sent when computed with this index's config, else
        hashed here; none (cache-blind) for hashes of another config without the prompt."""
        if sent is not None:
            same = sent.under(self._config)
            if same is not None:
                return same
            metrics.record_kv_lookup("config_mismatch")
            if not self._mismatch_logged:
                self._mismatch_logged = True
                log.warning(
                    "a caller hashes prompts with another KV block config: its requests are "
                    "routed cache-blind (set the same LLMMESH_KV_BLOCK_SIZE and hash seed "
                    "everywhere)",
                    extra={"caller_config": str(sent.config), "config": str(self._config)},
                )
            if not token_ids:
                return ()
        return self._hashes(token_bytes(token_ids))

    def _answered(self, reg: _Registry) -> None:
        if reg.down:
            reg.down = False
            log.info("kv_registry replica answers again", extra={"registry": reg.address})

    async def lookup(
        self,
        token_ids: Sequence[int],
        replica_ids: Collection[str] = (),
        hashes: PromptHashes | None = None,
    ) -> PrefixMatches:
        blocks = self._prompt_hashes(token_ids, hashes)
        if not blocks:
            return NO_MATCHES
        mirror = self._mirror
        if mirror is not None:
            if (self._watcher is None or self._watcher.done()) and not self._closed:
                self._watcher = asyncio.get_running_loop().create_task(self._watch(mirror))
            if mirror.covers(replica_ids):
                metrics.record_kv_lookup("mirror")
                return PrefixMatches(len(blocks), mirror.lookup(blocks), blocks, exact=mirror.exact)
        metrics.record_kv_lookup("registry")
        trace_context = dict(inject_trace_metadata([]))
        for reg in self._up()[: self.LOOKUP_ATTEMPTS]:
            try:
                resp = await _unless_closed(self._lookup(reg, blocks, trace_context))
            except grpc.aio.AioRpcError as err:
                if err.code() == grpc.StatusCode.INVALID_ARGUMENT:
                    break  # this prompt (e.g. over the registry's max_prompt_blocks), not it
                self._failed(reg, err, "Lookup")
                continue
            except TimeoutError:
                self._failed(reg, _ended(grpc.StatusCode.DEADLINE_EXCEEDED, "lookup"), "Lookup")
                continue
            except grpc.aio.UsageError:  # its channel closed: `refresh` removed it meanwhile
                continue
            self._answered(reg)
            self._preferred = reg
            return PrefixMatches(
                resp.prompt_blocks,
                {m.replica_id: m.matched_blocks for m in resp.matches},
                blocks,
                exact=frozenset(
                    m.replica_id for m in resp.matches if m.source == pb.MATCH_SOURCE_EXACT
                ),
            )
        log.debug("prefix lookup failed on every registry tried")
        return PrefixMatches(len(blocks), {}, blocks)

    async def _watch(self, mirror: ExactMirror) -> None:
        """Keep `mirror` equal to a registry's exact index, until closed: WatchExact on the
        first registry up; when the watch ends, the copy is dropped and a watch starts again from
        a fresh snapshot `retry_s` later (the registry that failed is skipped for as long; one
        that refused WatchExact is not watched for `WATCH_REFUSED_RETRY_S`, another is), or
        `WATCH_REFUSED_RETRY_S` later when the copy outgrew its bound; a copy that ends so
        (fell behind, outgrew its bound) again before it was in sync waits twice as long each
        time (`WATCH_BACKOFF_MAX_S` at most)."""
        request = pb.WatchExactRequest(
            block_size=self._config.block_size, hash_seed=self._config.hash_seed
        )
        lapses = 0  # copies in a row that fell behind or outgrew the bound before in sync
        while not self._closed:
            wait = self._retry_s
            now = self._clock()
            up = [r for r in self._up() if r.no_watch_until <= now]
            if up:
                reg = up[0]
                try:
                    async for update in reg.stub.WatchExact(request):
                        apply_update(mirror, update)
                        metrics.set_kv_mirror(mirror.synced, mirror.blocks)
                        if mirror.synced:
                            lapses = 0
                    self._failed(
                        reg, _ended(grpc.StatusCode.UNAVAILABLE, "watch ended"), "WatchExact"
                    )
                except grpc.aio.AioRpcError as err:
                    if err.code() in _NO_WATCH:
                        # Another registry (a newer version, other mesh policy) may serve it.
                        log.warning(
                            "kv_registry refuses WatchExact; watching another, if any",
                            extra={"registry": reg.address, "error": err.code().name},
                        )
                        reg.no_watch_until = self._clock() + self.WATCH_REFUSED_RETRY_S
                    elif err.code() in _FELL_BEHIND:
                        # This copy fell behind the registry's changes (the registry cancels a
                        # watch it could not write to); the registry is fine (lookups and
                        # updates go on to it): a fresh snapshot `retry_s` later.
                        lapses += 1
                        wait = self._lapse_wait(self._retry_s, lapses)
                        log.warning(
                            "copy of kv_registry's exact index fell behind; watching again",
                            extra={"registry": reg.address, "in_s": wait},
                        )
                    else:
                        self._failed(reg, err, "WatchExact")
                except (MirrorFull, UnknownChange) as exc:
                    lapses += 1
                    wait = self._lapse_wait(self.WATCH_REFUSED_RETRY_S, lapses)
                    log.error(
                        "copy of kv_registry's exact index dropped; lookups go to kv_registry",
                        extra={"registry": reg.address, "error": str(exc), "retry_in_s": wait},
                    )
                except grpc.aio.UsageError:
                    pass  # its channel closed: `refresh` removed it
                except asyncio.CancelledError:
                    task = asyncio.current_task()
                    if task is None or task.cancelling():
                        raise  # closed
                    # else the call was cancelled by its channel's closing (`refresh` removed it)
                finally:
                    mirror.reset()
                    metrics.set_kv_mirror(False, 0)
            self.watch_wait_s = wait
            await asyncio.sleep(wait)

    def _lapse_wait(self, first_s: float, lapses: int) -> float:
        return min(first_s * (1 << min(lapses - 1, 32)), max(first_s, self.WATCH_BACKOFF_MAX_S))

    async def _lookup(
        self, reg: _Registry, hashes: Sequence[int], trace_context: dict[str, str]
    ) -> pb.LookupResponse:
        """One registry's answer within the lookup's budget: over its LookupStream (opened on
        first use, reopened after it ended or stalled), or a unary Lookup where streams are off,
        refused by the registry, or full."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout_s
        if self._stream_lookups and reg.streams:
            stream = reg.stream
            if stream is None or not stream.open:
                stream = reg.stream = _LookupStream(reg.stub, self.MAX_STREAM_WAITING)
            if not stream.full:
                try:
                    return await stream.lookup(hashes, trace_context, self._timeout_s)
                except TimeoutError:
                    if reg.stream is stream:  # stalled: the next lookup opens a new call
                        reg.stream = None
                        await stream.close()
                    raise
                except StreamReset:
                    pass  # asked again below, alone
                except grpc.aio.AioRpcError as err:
                    if err.code() not in NOT_OFFERED:  # LookupStream refused as such
                        raise
                    reg.streams = False  # unary from now on (until the registry fails)
                    log.warning(
                        "kv_registry refuses LookupStream; unary lookups",
                        extra={"registry": reg.address, "error": err.code().name},
                    )
        return await reg.stub.Lookup(
            pb.LookupRequest(block_hashes=hashes),
            timeout=max(deadline - loop.time(), 1e-3),
            metadata=tuple(trace_context.items()),
        )

    # -- approximate-mode updates: queued, sent in batches ------------------------------------
    @property
    def pending(self) -> int:
        """Updates queued and not yet sent."""
        return self._updates.queued

    def _enqueue(self, message: pb.RegistryUpdate) -> asyncio.Future[int]:
        update = _Update(message, asyncio.get_running_loop().create_future())
        self._updates.put(update)
        return update.done

    async def _send_updates(self, batch: list[_Update]) -> None:
        """One batch; each update's future gets its answer (0 when there is none)."""
        predicted: list[int] = []
        try:
            predicted = await self._send_batch([u.message for u in batch])
        finally:
            answers = iter(predicted)
            for u in batch:
                routing = u.message.WhichOneof("kind") == "routing"
                _resolve(u.done, next(answers, 0) if routing else 0)

    async def _send_batch(self, updates: list[pb.RegistryUpdate]) -> list[int]:
        """`updates` to every registry not skipped, concurrently; the predicted blocks of the
        routing updates from the first that answered, preferred first ([] if none did)."""
        regs = self._up()
        if not regs:
            return []
        req = pb.UpdateBatchRequest(updates=updates)

        async def one(reg: _Registry) -> list[int] | None:
            try:
                if reg.batches:
                    try:
                        resp = await _unless_closed(
                            reg.stub.UpdateBatch(req, timeout=self._update_timeout_s)
                        )
                    except grpc.aio.AioRpcError as err:
                        if err.code() != grpc.StatusCode.UNIMPLEMENTED:
                            self._failed(reg, err, "UpdateBatch")
                            return None
                        reg.batches = False
                    else:
                        self._answered(reg)
                        return list(resp.predicted_blocks)
                return await _unless_closed(self._send_each(reg, updates))
            except grpc.aio.UsageError:  # its channel closed: `refresh` removed it meanwhile
                return None

        results = await asyncio.gather(*(one(r) for r in regs))
        return next((r for r in results if r is not None), [])

    async def _send_each(
        self, reg: _Registry, updates: list[pb.RegistryUpdate]
    ) -> list[int] | None:
        """The updates one RPC each, in order (a registry without UpdateBatch); None when the
        registry failed."""
        predicted: list[int] = []
        timeout = self._update_timeout_s
        for u in updates:
            kind = u.WhichOneof("kind")
            try:
                if kind == "routing":
                    resp = await reg.stub.RecordRouting(u.routing, timeout=timeout)
                    predicted.append(int(resp.predicted_blocks))
                elif kind == "reuse":
                    await reg.stub.ReportReuse(u.reuse, timeout=timeout)
                elif kind == "drop":
                    await reg.stub.DropReplica(u.drop, timeout=timeout)
            except grpc.aio.AioRpcError as err:
                if err.code() == grpc.StatusCode.INVALID_ARGUMENT:
                    if kind == "routing":
                        predicted.append(0)
                    continue
                self._failed(reg, err, kind or "update")
                return None
        self._answered(reg)
        return predicted

    async def record_routing(self, replica_id: str, hashes: Sequence[int]) -> int:
        return await self._enqueue(
            pb.RegistryUpdate(
                routing=pb.RecordRoutingRequest(replica_id=replica_id, block_hashes=hashes)
            )
        )

    async def report_reuse(
        self,
        replica_id: str,
        hashes: Sequence[int],
        reported: int,
        prompt_tokens: int,
        predicted: int,
    ) -> None:
        await self._enqueue(
            pb.RegistryUpdate(
                reuse=pb.ReportReuseRequest(
                    replica_id=replica_id,
                    block_hashes=hashes,
                    reported_reused_blocks=reported,
                    prompt_tokens=prompt_tokens,
                    predicted_blocks=predicted,
                )
            )
        )

    async def drop_replica(self, replica_id: str) -> None:
        await self._enqueue(pb.RegistryUpdate(drop=pb.DropReplicaRequest(replica_id=replica_id)))

    async def close(self) -> None:
        self._closed = True
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        for update in self._updates.cancel():
            _resolve(update.done, 0)
        for reg in self._registries:
            await self._close(reg)

    @staticmethod
    async def _close(reg: _Registry) -> None:
        if reg.stream is not None:
            await reg.stream.close()
        await reg.channel.close(None)


class UnknownChange(Exception):
    """A WatchExact change of a kind this version does not know."""


def apply_update(mirror: ExactMirror, update: pb.ExactIndexUpdate) -> None:
    """One WatchExact message, applied in order."""
    for c in update.changes:
        kind = c.kind
        if kind == pb.ExactChange.KIND_STORED:
            mirror.stored(c.replica_id, c.block_hashes)
        elif kind == pb.ExactChange.KIND_REMOVED:
            mirror.removed(c.replica_id, c.block_hashes)
        elif kind == pb.ExactChange.KIND_CLEARED:
            mirror.cleared(c.replica_id)
        elif kind == pb.ExactChange.KIND_GONE:
            mirror.gone(c.replica_id)
        else:  # a kind this orchestrator does not know: it cannot keep an equal copy
            raise UnknownChange(f"change kind {kind} for {c.replica_id!r}")
    if update.synced:
        mirror.synced = True


def _dropped(update: _Update) -> None:
    """The queue was full: the oldest update is dropped unsent."""
    _resolve(update.done, 0)
    metrics.record_kv_update_dropped()


def _resolve(fut: asyncio.Future[int], value: int) -> None:
    if not fut.done():
        fut.set_result(value)


def registry_index(
    settings: OrchestratorSettings, block_config: BlockConfig
) -> RegistryPrefixIndex | None:
    """The prefix index the settings configure; None (prefix-blind routing) without a registry."""
    endpoints = kv_registries.static_endpoints(
        settings.kv_registry_address, settings.kv_registry_addresses
    )
    if not endpoints and not settings.kv_registry_dns:
        return None
    return RegistryPrefixIndex(
        endpoints,
        block_config,
        settings.kv_lookup_timeout_s,
        dns=settings.kv_registry_dns,
        retry_s=settings.kv_registry_retry_s,
        max_pending=settings.kv_update_queue,
        linger_s=settings.kv_update_linger_s,
        stream_lookups=settings.kv_lookup_stream,
        mirror=ExactMirror(settings.kv_mirror_max_blocks) if settings.kv_mirror else None,
    )
