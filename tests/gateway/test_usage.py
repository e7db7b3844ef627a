"""Usage records: the JSON-lines log (bounded queue, drops counted, fsync on close) and the
core's one record per request, keyed or not, over in-process fakes."""

from __future__ import annotations

import errno
import json
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY

from llmmesh.common.errors import Reason, ResourceExhausted
from services.gateway.admission import AdmissionRequest, Lease
from services.gateway.auth import Authenticator, TenantsFile, hash_key
from services.gateway.core import GatewayCore, GenerationRequest, Sampling
from services.gateway.errors import RequestIdConflict
from services.gateway.models import ServedModel
from services.gateway.settings import GatewaySettings, ModelSettings
from services.gateway.triton_stream import TritonStreamError
from services.gateway.usage import UsageLog, UsageRecord
from tests.gateway.conftest import MODEL, FakeAdmission, FakeEngine, Sink, chunk


@pytest.fixture(scope="module")
def model(tokenizer_path: Path) -> ServedModel:
    return ServedModel.load(ModelSettings(name=MODEL, tokenizer_path=tokenizer_path))


def record(i: int) -> UsageRecord:
    return UsageRecord(
        time=1.0 + i,
        request_id=f"r{i}",
        tenant="acme",
        model="m",
        outcome="success",
        prompt_tokens=3,
        completion_tokens=i,
        cached_prompt_tokens=0,
        ttft_ms=1.5,
        duration_ms=9.0,
        replica="r0",
    )


def logged(result: str) -> float:
    value = REGISTRY.get_sample_value("llmmesh_gateway_usage_log_records_total", {"result": result})
    return value or 0.0


async def test_log_appends_json_lines_and_keeps_everything_queued_on_close(
    tmp_path: Path,
) -> None:
    path = tmp_path / "usage" / "usage.jsonl"
    path.parent.mkdir()
    path.write_bytes(b'{"earlier": true}\n')  # append-only: never truncated
    log = UsageLog(path, queue_size=1000)
    await log.start()
    for i in range(500):
        log.submit(record(i))
    await log.close()
    lines = path.read_bytes().splitlines()
    assert json.loads(lines[0]) == {"earlier": True}
    rows = [json.loads(line) for line in lines[1:]]
    assert [r["request_id"] for r in rows] == [f"r{i}" for i in range(500)]
    assert rows[7]["completion_tokens"] == 7
    assert rows[7]["tenant"] == "acme"


async def test_a_full_queue_drops_and_counts_without_blocking(tmp_path: Path) -> None:
    log = UsageLog(tmp_path / "usage.jsonl", queue_size=4)
    await log.start()
    dropped = logged("dropped")
    # No await between the submits: the writer cannot run, the queue holds 4.
    for i in range(10):
        log.submit(record(i))
    assert logged("dropped") == dropped + 6
    await log.close()
    assert len((tmp_path / "usage.jsonl").read_bytes().splitlines()) == 4
    log.submit(record(99))  # after close: counted, not lost silently
    assert logged("dropped") == dropped + 7


class FullDiskOnce:
    """The log's file, whose first write stores a few bytes and then fails as a full disk."""

    def __init__(self, f: Any) -> None:
        self._f = f
        self.failed = False

    def fileno(self) -> int:
        return int(self._f.fileno())

    def write(self, data: memoryview) -> int:
        if not self.failed:
            self.failed = True
            self._f.write(data[:10])
            raise OSError(errno.ENOSPC, "No space left on device")
        return int(self._f.write(data))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)


async def test_a_write_that_fails_part_way_leaves_no_half_record(tmp_path: Path) -> None:
    """The bytes a failed write had stored stayed, with no line end: the next record was
    glued onto them and neither could be read. A line an earlier process left unfinished is
    ended before the first record is appended."""
    path = tmp_path / "usage.jsonl"
    path.write_bytes(b'{"earlier": true}\n{"torn": ')  # a process died mid-write
    log = UsageLog(path, queue_size=100)
    await log.start()
    assert log._file is not None
    log._file = FullDiskOnce(log._file)  # type: ignore[assignment]
    errors = logged("write_error")
    log.submit(record(1))
    await log._queue.join()  # its batch was written (and failed) before the next is queued
    assert logged("write_error") == errors + 1
    log.submit(record(2))
    await log.close()
    lines = path.read_bytes().splitlines()
    assert lines[:2] == [b'{"earlier": true}', b'{"torn": ']
    assert [json.loads(line)["request_id"] for line in lines[2:]] == ["r2"]


async def test_core_writes_one_record_per_generation(model: ServedModel) -> None:
    ids = model.encode(" one two three")
    engine = FakeEngine([[chunk(t) for t in ids] + [chunk(final=True)]])
    orch = FakeAdmission()
    sink = Sink()
    core = GatewayCore(
        GatewaySettings(models=[model.settings]), [model], orch, engine, 32, usage=sink
    )
    req = GenerationRequest(
        model=MODEL,
        request_id="key-1",
        prompt_text="Hello",
        sampling=Sampling(max_tokens=len(ids)),
        keyed=True,
    )
    first = [ev async for ev in core.generate(req, 10.0)]
    again = [ev async for ev in core.generate(req, 10.0)]  # replayed, not generated
    assert first == again
    assert len(engine.requests) == 1
    other = GenerationRequest(model=MODEL, request_id="key-1", prompt_text="Bye", keyed=True)
    with pytest.raises(RequestIdConflict):
        await anext(core.generate(other, 10.0))
    await core.close()
    assert [(r.request_id, r.outcome) for r in sink.records] == [
        ("key-1", "success"),
        ("key-1", "invalid"),
    ]
    ok = sink.records[0]
    assert ok.prompt_tokens == len(model.encode("Hello"))
    assert ok.completion_tokens == len(ids)
    assert ok.ttft_ms is not None
    assert 0 <= ok.ttft_ms <= ok.duration_ms
    assert ok.replica == "r1"
    assert [r.lease_id for r in orch.reports] == ["lease-1"]


async def test_a_request_no_replica_served_bills_no_prompt(model: ServedModel) -> None:
    """Refused at admission (the queue full): its tenant's charge is refunded, and its record
    billed the prompt all the same, once per refusal a retrying client met."""
    queue_full = ResourceExhausted("queue full", retry_after_s=1.0, reason=Reason.QUEUE_FULL)
    sink = Sink()
    core = GatewayCore(
        GatewaySettings(models=[model.settings]),
        [model],
        FakeAdmission(reject=queue_full),
        FakeEngine([]),
        32,
        usage=sink,
    )
    req = GenerationRequest(model=MODEL, request_id="r", prompt_text="Hello", keyed=False)
    with pytest.raises(ResourceExhausted):
        await anext(core.generate(req, 10.0))
    await core.close()
    [refused] = sink.records
    assert refused.outcome != "success"
    assert (refused.prompt_tokens, refused.completion_tokens, refused.replica) == (0, 0, "")


class GrantsOnce(FakeAdmission):
    """The first Admit is granted; the next (the retry after its replica failed) refused."""

    async def admit(self, request: AdmissionRequest, *, timeout_s: float) -> Lease:
        if self.admits:
            self.admits.append(request)
            raise ResourceExhausted("queue full", retry_after_s=1.0, reason=Reason.QUEUE_FULL)
        return await super().admit(request, timeout_s=timeout_s)


async def test_a_request_whose_replica_failed_before_any_token_is_neither_billed_nor_charged(
    model: ServedModel,
) -> None:
    """Its lease was granted, its replica failed before the first token, and no other replica
    took it: the client got a refusal to retry, and the record billed its prompt and its tenant
    kept the charge (the rule was 'a lease was granted'), once per retry."""
    auth = Authenticator(
        TenantsFile.model_validate(
            {
                "tenants": [
                    {"name": "a", "api_keys_sha256": [hash_key("sk-a")], "requests_per_minute": 1}
                ]
            }
        ),
        clock=lambda: 1000.0,
    )
    failed = TritonStreamError("replica gone", replica_fault=True)
    sink = Sink()
    core = GatewayCore(
        GatewaySettings(models=[model.settings]),
        [model],
        GrantsOnce(),
        FakeEngine([[failed]]),
        32,
        auth,
        usage=sink,
    )
    req = GenerationRequest(model=MODEL, request_id="r", prompt_text="Hello", api_key="sk-a")
    with pytest.raises(ResourceExhausted):
        await anext(core.generate(req, 10.0))
    await core.close()
    [record] = sink.records
    assert (record.prompt_tokens, record.completion_tokens) == (0, 0)
    limits = auth.authenticate("sk-a").limits
    assert limits.requests is not None
    assert limits.requests.level() == 1.0  # refunded: the next request is not rate-limited
