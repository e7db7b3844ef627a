"""Shared in-process fakes for the gateway core's two collaborators: admission (the
`AdmissionClient` protocol, in domain types) and the engine (`EngineClient`)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import trace

from llmmesh.common.errors import ServiceError
from llmmesh.common.topology import ReplicaAddress
from llmmesh.redis_server import RedisServer
from services.gateway.admission import AdmissionRequest, AdmissionStatus, Lease, LeaseReport
from services.gateway.models import ServedModel
from services.gateway.settings import ModelSettings
from services.gateway.triton_stream import EngineChunk, EngineRequest
from services.gateway.usage import UsageRecord

MODEL = "smollm2"


def fake_replica(n: int, pool: str = "pool-a") -> ReplicaAddress:
    """The replica of the n-th lease (1-based)."""
    return ReplicaAddress(
        id=f"r{n}",
        grpc_address=f"127.0.0.1:{n}",
        pool=pool,
        model_version="v7",
        authority=f"replica-{n}.triton:8001",
    )


class FakeAdmission:
    """Grants lease `lease-n` on `fake_replica(n)` (in pool `pools[n - 1]` when given) for the
    n-th Admit, or raises `reject`. Records every request, the caller's trace id at the time,
    and every report."""

    def __init__(
        self,
        reject: ServiceError | None = None,
        queue_ms: float = 0.0,
        pools: Sequence[str] = (),
    ) -> None:
        self.reject = reject
        self.queue_ms = queue_ms
        self.pools = pools
        self.admits: list[AdmissionRequest] = []
        self.timeouts: list[float] = []
        self.admit_trace_ids: list[str] = []  # 32 hex digits; all zeros outside a span
        self.reports: list[LeaseReport] = []
        self._reported = asyncio.Event()
        # The replica view `status` answers (or raises); `status_gate`, when set, holds every
        # call until it is set, so tests can see concurrent readiness checks share one call.
        self.view: AdmissionStatus | ServiceError = AdmissionStatus(1, 1, 0)
        self.status_gate: asyncio.Event | None = None
        self.status_calls = 0
        self.status_entered = asyncio.Event()  # set once a call reached the fake

    async def admit(self, request: AdmissionRequest, *, timeout_s: float) -> Lease:
        self.admits.append(request)
        self.timeouts.append(timeout_s)
        span = trace.get_current_span().get_span_context()
        self.admit_trace_ids.append(format(span.trace_id, "032x"))
        if self.reject is not None:
            raise self.reject
        n = len(self.admits)
        replica = fake_replica(n, *self.pools[n - 1 : n])
        return Lease(lease_id=f"lease-{n}", replica=replica, queue_ms=self.queue_ms)

    def complete(self, report: LeaseReport) -> None:
        self.reports.append(report)
        self._reported.set()

    async def drain(self) -> None:
        pass

    async def status(self, *, timeout_s: float) -> AdmissionStatus:
        self.status_calls += 1
        self.status_entered.set()
        if self.status_gate is not None:
            await self.status_gate.wait()
        if isinstance(self.view, ServiceError):
            raise self.view
        return self.view

    async def wait_reports(self, n: int) -> list[LeaseReport]:
        """The reports once there are at least n (a stream closed by its consumer reports when
        its generator is finalized)."""
        while len(self.reports) < n:
            self._reported.clear()
            await self._reported.wait()
        return self.reports


class Hang:
    """A script item: the replica stops sending (the stream stays open) until `release` is set
    (never, unless a test sets it)."""

    def __init__(self) -> None:
        self.release = asyncio.Event()


class FakeEngine:
    """Plays one scripted chunk list per stream call, in order; an exception in a script is
    raised at that point, a `Hang` waits there. Counts streams cancelled by the caller, and
    those it closed before their end."""

    def __init__(self, scripts: Sequence[Sequence[EngineChunk | Exception | Hang]]):
        self.scripts = scripts
        self.requests: list[EngineRequest] = []
        self.targets: list[tuple[str, str]] = []  # (address, authority) per call
        self.metadata: list[Sequence[tuple[str, str]]] = []
        self.cancelled = 0
        self.closed = 0

    async def stream(
        self,
        address: str,
        authority: str,
        request: EngineRequest,
        *,
        timeout_s: float | None,
        metadata: Sequence[tuple[str, str]] = (),
    ) -> AsyncGenerator[EngineChunk, None]:
        self.requests.append(request)
        self.targets.append((address, authority))
        self.metadata.append(metadata)
        try:
            for item in self.scripts[len(self.requests) - 1]:
                if isinstance(item, Exception):
                    raise item
                if isinstance(item, Hang):
                    await item.release.wait()
                    continue
                yield item
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        except GeneratorExit:
            self.closed += 1  # the caller stopped reading before the script's end
            raise


def chunk(*ids: int, final: bool = False, reused: int | None = None) -> EngineChunk:
    return EngineChunk(list(ids), final, reused)


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A private redis-server for the module (llmmesh/redis_server.py)."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start_blocking()
    try:
        yield server
    finally:
        server.stop()


class Sink:
    """A usage sink that keeps the records it is given (the core's `UsageSink`)."""

    def __init__(self) -> None:
        self.records: list[UsageRecord] = []

    def submit(self, record: UsageRecord) -> None:
        self.records.append(record)


# Token ids of `metaspace_model`'s vocabulary.
METASPACE_VOCAB = {
    "<unk>": 0,
    "</s>": 1,
    "▁The": 2,
    "▁capital": 3,
    "▁is": 4,
    "▁Paris": 5,
    ".": 6,
    "▁Hello": 7,
}


def metaspace_model(directory: Path, name: str, bos: bool = False, **settings: Any) -> ServedModel:
    """A model with a SentencePiece-style tokenizer (Llama 2, Mistral): words carry their
    leading space as "▁", and the decoder drops the space that starts a text. End id: "</s>".
    `bos`: its post-processor puts "<s>" (id 8) before a text, as Llama's and Mistral's do."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = {**METASPACE_VOCAB, "<s>": 8} if bos else METASPACE_VOCAB
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    if bos:
        tok.add_special_tokens(["<s>"])
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", 8)]
        )
    path = directory / "tokenizer.json"
    tok.save(str(path))
    return ServedModel.load(
        ModelSettings(name=name, tokenizer_path=path, end_id=METASPACE_VOCAB["</s>"], **settings)
    )
