"""Overload on the engine and admission side (services/orchestrator/OVERLOAD.md), small and fast:

- a real tritonserver running the emulator with a tiny waiting queue refuses a burst beyond it
  with the engine's queue-full error, which the gateway's classification reads as back-pressure,
  and keeps serving (no stub death, nothing in its log);
- a burst well beyond a one-replica mesh's capacity gets RESOURCE_EXHAUSTED with a retry-after
  for everything it does not serve, queues no class beyond its share, serves every interactive
  request, and leaves the engine without an error.
"""

from __future__ import annotations

import asyncio
import collections
from pathlib import Path

import grpc
import pytest

from llmmesh.common.settings import to_env
from llmmesh.emulator.settings import EmulatorSettings
from llmmesh.generated.gateway.v1 import gateway_pb2 as gpb
from llmmesh.localmesh import EMULATOR_REPOSITORY, MODEL_NAME
from llmmesh.triton.launcher import TritonPorts, TritonServer
from services.gateway.faults import FaultKind, FaultReason
from services.gateway.triton_stream import EngineRequest, TritonPool, TritonStreamError
from tests.integration.conftest import start_mesh

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="session")]


def _engine_request(i: int, max_tokens: int) -> EngineRequest:
    return EngineRequest(
        request_id=f"burst-{i}",
        model="tensorrt_llm",
        input_ids=[100 + i, 7, 8, 9],
        max_tokens=max_tokens,
        end_id=2,
        temperature=0.0,
        top_p=1.0,
        top_k=1,
        seed=i,
    )


async def _outcome(pool: TritonPool, address: str, i: int, max_tokens: int) -> str:
    try:
        async for _ in pool.stream(address, "", _engine_request(i, max_tokens), timeout_s=60):
            pass
    except TritonStreamError as err:
        return f"{err.fault.kind}:{err.fault.reason}"
    return "ok"


async def test_a_full_engine_queue_refuses_with_back_pressure_and_keeps_serving(
    tmp_path: Path,
) -> None:
    log = tmp_path / "triton.log"
    settings = EmulatorSettings(
        replica_id="overload", max_batch_size=1, max_queue_size=2, time_scale=1.0
    )
    server = TritonServer(
        EMULATOR_REPOSITORY, TritonPorts.free(), env=to_env(settings), log_path=log
    )
    await server.start(ready_timeout_s=60)
    pool = TritonPool()
    try:
        outcomes = collections.Counter(
            await asyncio.gather(*(_outcome(pool, server.grpc_address, i, 16) for i in range(12)))
        )
        full = f"{FaultKind.BACK_PRESSURE}:{FaultReason.QUEUE_FULL}"
        # one running and at most two waiting at any time: most of the burst is refused at
        # once, each refusal the engine's queue-full error, nothing else
        assert set(outcomes) == {"ok", full}, outcomes
        assert outcomes[full] >= 12 - 3 * 2, outcomes
        # the replica is not harmed: it serves the next request
        assert await _outcome(pool, server.grpc_address, 99, 4) == "ok"
    finally:
        await pool.close()
        rc = await server.stop()
    text = log.read_text()
    assert rc == 0, text[-4000:]
    assert "Stub process" not in text
    assert "Traceback" not in text


async def _generate(
    stub: object, i: int, priority: int, max_tokens: int = 24, first: asyncio.Event | None = None
) -> tuple[int, str, bool]:
    """One request's outcome: (priority, status code name, whether a retry-after came with a
    refusal). `first` is set at its first token."""
    req = gpb.GenerateRequest(
        model=MODEL_NAME,
        token_ids=gpb.TokenIds(ids=[200 + i, 11, 12, 13]),
        sampling=gpb.SamplingParams(max_tokens=max_tokens, temperature=0.0, seed=i),
        priority=priority,  # type: ignore[arg-type]
        request_id=f"overload-{i}",
    )
    try:
        async for _ in stub.Generate(req, timeout=60):  # type: ignore[attr-defined]
            if first is not None:
                first.set()
    except grpc.aio.AioRpcError as err:
        trailers: dict[str, str] = dict(err.trailing_metadata() or ())  # type: ignore[arg-type]
        return priority, err.code().name, float(trailers.get("retry-after", 0)) > 0
    return priority, "OK", False


async def test_a_burst_beyond_capacity_is_shed_with_retry_after_within_class_limits(
    tokenizer_path: Path,
) -> None:
    """Two long requests (400 tokens, seconds at this time scale) hold the one replica's 2
    batch slots (its lease cap); a burst of 30 then arrives while they run, so every request of the burst goes through the admission
    queue of 8 (interactive 8, standard 4, batch 2: OVERLOAD.md) and none leaves it before the
    burst is in. Whatever order the burst's requests reach the orchestrator in, the queue keeps
    at most its class limit of each class and every interactive request; the rest is refused
    with a retry-after."""
    m = await start_mesh(
        tokenizer_path,
        replicas=1,
        time_scale=1.0,
        emulator_env={"LLMMESH_EMULATOR_MAX_BATCH_SIZE": "2"},
        orchestrator_env={
            "LLMMESH_ORCHESTRATOR_MAX_QUEUE": "8",
            "LLMMESH_ORCHESTRATOR_MAX_IN_FLIGHT_PER_REPLICA": "2",
        },
    )
    try:
        inter, std, batch = gpb.PRIORITY_INTERACTIVE, gpb.PRIORITY_STANDARD, gpb.PRIORITY_BATCH
        started = [asyncio.Event(), asyncio.Event()]
        fillers = [
            asyncio.ensure_future(_generate(m.gateway, 100 + k, std, 400, started[k]))
            for k in range(2)
        ]
        await asyncio.gather(*(e.wait() for e in started))  # both slots leased and decoding
        mix = [inter] * 6 + [std] * 12 + [batch] * 12
        order = [mix[(i * 7) % len(mix)] for i in range(len(mix))]  # interleaved classes
        results = await asyncio.gather(*(_generate(m.gateway, i, p) for i, p in enumerate(order)))
        assert [r[1] for r in await asyncio.gather(*fillers)] == ["OK", "OK"]
        by_class: dict[int, collections.Counter[str]] = collections.defaultdict(collections.Counter)
        for prio, code, retry_after in results:
            by_class[prio][code] += 1
            if code != "OK":
                assert code == "RESOURCE_EXHAUSTED", results
                assert retry_after, results
        assert by_class[inter] == {"OK": 6}, by_class
        assert by_class[std]["OK"] <= 4, by_class
        assert by_class[batch]["OK"] <= 2, by_class
        assert sum(c["OK"] for c in by_class.values()) <= 8, by_class
        engine_log = (m.mesh.workdir / f"{m.mesh.replica_ids[0]}.triton.log").read_text()
        assert "Stub process" not in engine_log
        assert "Traceback" not in engine_log
    finally:
        await m.close()
        await m.mesh.stop()
