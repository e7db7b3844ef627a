"""Usage records: one per finished request, for billing and audit.

Every request the gateway answers (success or not) ends in one `UsageRecord`: request id,
tenant, model, outcome, prompt/completion/cached tokens, time to first token, duration, replica.
The same accounting feeds the Prometheus metrics in `metrics.py`
(`llmmesh_gateway_requests_total{model,outcome,tenant}`, the token counters and the latency
histograms) and, when `LLMMESH_GATEWAY_USAGE_LOG_PATH` is set, an append-only JSON-lines file.

The file is written by one background task fed by a bounded queue (`usage_queue_size`):
`submit` never blocks the event loop. When the queue is full the record is left out of the
file, counted in `llmmesh_gateway_usage_log_records_total{result="dropped"}` and logged (its
metrics are counted regardless); a failed write (a full disk) is cut back to the last whole
record and counted as `write_error` (its records are lost, the file stays one record a line). `close` (after the
fronts drained, on graceful shutdown) writes everything queued, then flushes and fsyncs the
file, so no record of a finished request is lost.

A keyed request (client request id) that re-attaches to an existing generation is not a new
request: the generation has one record, under its id.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import BinaryIO

from services.gateway import metrics

log = logging.getLogger(__name__)

_BATCH = 512


@dataclass(frozen=True, slots=True)
class UsageRecord:
    time: float  # Unix time the request finished
    request_id: str
    tenant: str  # authenticated tenant; "" without authentication
    model: str  # "unknown" when the request named no served model
    outcome: str  # llmmesh_gateway_requests_total's outcome label
    prompt_tokens: int  # billed: 0 for a request no replica served (its charge refunded)
    completion_tokens: int
    cached_prompt_tokens: int
    ttft_ms: float | None  # None when no token was produced
    duration_ms: float
    replica: str  # "" when no replica served it

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), ensure_ascii=False, separators=(",", ":")).encode(
            "utf-8", "surrogatepass"
        )


class UsageLog:
    """Append-only JSON-lines file of usage records (module docstring)."""

    def __init__(self, path: Path, queue_size: int):
        self.path = path
        self._queue: asyncio.Queue[UsageRecord] = asyncio.Queue(maxsize=queue_size)
        self._file: BinaryIO | None = None
        self._writer: asyncio.Task[None] | None = None
        self._closed = False
        self._unended = False  # the file's last line is unfinished: the next write ends it

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = await asyncio.to_thread(self._open)
        self._writer = asyncio.get_running_loop().create_task(self._write_loop())

    def _open(self) -> BinaryIO:
        """The log for appending; a last line an earlier process left unfinished (it died in
        a write) is ended, so the first record written now starts a line of its own."""
        f = self.path.open("ab", buffering=0)
        try:
            size = os.fstat(f.fileno()).st_size
            if size:
                with self.path.open("rb") as r:
                    r.seek(size - 1)
                    self._unended = r.read(1) != b"\n"
        except OSError:
            f.close()
            raise
        return f

    def submit(self, record: UsageRecord) -> None:
        """Queue a record for the file; never blocks."""
        if self._closed:
            self._drop(record, "the usage log is closed")
            return
        try:
            self._queue.put_nowait(record)
        except asyncio.QueueFull:
            self._drop(record, "the usage log queue is full")

    @staticmethod
    def _drop(record: UsageRecord, why: str) -> None:
        metrics.record_usage_log("dropped")
        log.warning(
            "usage record not logged: %s", why, extra={"usage_request_id": record.request_id}
        )

    async def _write_loop(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while len(batch) < _BATCH and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            data = b"".join(r.to_json() + b"\n" for r in batch)
            try:
                await asyncio.to_thread(self._write, data)
                metrics.record_usage_log("written", len(batch))
            except OSError:
                log.exception("usage log write failed", extra={"path": str(self.path)})
                metrics.record_usage_log("write_error", len(batch))
            finally:
                for _ in batch:
                    self._queue.task_done()

    def _write(self, data: bytes) -> None:
        """All of `data`, or none of it: a write that fails part-way (a full disk) is cut
        back, so no record is left half-written for the next one to run into."""
        assert self._file is not None
        end = os.fstat(self._file.fileno()).st_size
        if self._unended:  # ended with the first batch: a full disk does not stop the start
            data = b"\n" + data
        view = memoryview(data)
        try:
            while view:
                view = view[self._file.write(view) or 0 :]
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(self._file.fileno(), end)
            raise
        self._unended = False

    async def close(self) -> None:
        """Write what is queued, fsync, close. Records submitted afterwards are dropped
        (counted)."""
        self._closed = True
        if self._writer is not None:
            await self._queue.join()
            self._writer.cancel()
            await asyncio.gather(self._writer, return_exceptions=True)
            self._writer = None
        if self._file is not None:
            f, self._file = self._file, None
            await asyncio.to_thread(_sync_and_close, f)


def _sync_and_close(f: BinaryIO) -> None:
    try:
        f.flush()
        os.fsync(f.fileno())
    finally:
        f.close()
