"""The Triton replica probe's verdicts (llmmesh/triton/launcher.py): the pool manifest's exec
program (`generate_probe_command`, readiness and liveness) and the local supervisors'
`generate_probe` agree on one rule: a 2xx answer or a full queue's refusal is alive; a dead
backend's error is not; no answer in time passes readiness only. Driven against a small HTTP
server that answers what Triton would."""

from __future__ import annotations

import asyncio
import dataclasses
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Literal

import pytest
import pytest_asyncio
from aiohttp import web

from llmmesh.common.topology import TRITON_HTTP_PORT
from llmmesh.localmesh import EMULATOR_REPOSITORY
from llmmesh.triton.launcher import (
    GENERATE_PROBE_PATH,
    TRITON_LIVENESS,
    TRITON_READINESS,
    BackendDead,
    LivenessProbe,
    TritonPorts,
    TritonServer,
    generate_probe_command,
)

PROBE = LivenessProbe(period_s=1.0, timeout_s=5.0, request_timeout_s=4.0, failure_threshold=1)

# (status, body) Triton answers, and whether the replica is alive.
ANSWERS = [
    (200, '{"text_output":"x"}', True),
    (400, '{"error":"RESOURCE_EXHAUSTED: 128 requests already wait for a batch slot"}', True),
    (503, '{"error":"Exceeds maximum queue size"}', True),
    (400, '{"error":"Stub process \'tensorrt_llm_0_0\' is not healthy."}', False),
    (400, '{"error":"Request for unknown model: \'tensorrt_llm\' is not found"}', False),
    (500, '{"error":"internal"}', False),
]


@dataclass
class Fake:
    port: int
    answer: tuple[int, str] = (200, "{}")
    hold: asyncio.Event | None = None  # set: the answer waits for it (a queued request)


@pytest_asyncio.fixture
async def fake() -> AsyncIterator[Fake]:
    state = Fake(0)

    async def generate(request: web.Request) -> web.Response:
        await request.read()
        if state.hold is not None:
            await state.hold.wait()
        status, body = state.answer
        return web.Response(status=status, text=body, content_type="application/json")

    app = web.Application()
    app.router.add_post(GENERATE_PROBE_PATH, generate)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    state.port = runner.addresses[0][1]
    yield state
    if state.hold is not None:
        state.hold.set()  # a request still held would hold the cleanup too
    await runner.cleanup()


async def run_probe(fake: Fake, probe: LivenessProbe, queued: Literal["pass", "fail"]) -> bool:
    """The manifest's exec probe (`generate_probe_command`) against the fake: passed?"""
    _, c, script, *args = generate_probe_command(probe, queued)
    local = script.replace(f"127.0.0.1:{TRITON_HTTP_PORT}", f"127.0.0.1:{fake.port}")
    assert local != script
    proc = await asyncio.create_subprocess_exec(
        sys.executable, c, local, *args, stderr=asyncio.subprocess.PIPE
    )
    _, err = await asyncio.wait_for(proc.communicate(), 90)
    assert proc.returncode in (0, 1), err.decode()[-500:]  # an exit, not a crash
    return proc.returncode == 0


@pytest.mark.parametrize(("status", "body", "alive"), ANSWERS)
async def test_the_manifest_probe_program_and_the_local_probe_agree(
    fake: Fake, status: int, body: str, alive: bool
) -> None:
    fake.answer = (status, body)
    assert await run_probe(fake, TRITON_READINESS, "pass") is alive
    assert await run_probe(fake, TRITON_LIVENESS, "fail") is alive

    # Never started: only its probe, against the fake's port.
    server = TritonServer(EMULATOR_REPOSITORY, TritonPorts(grpc=0, http=fake.port, metrics=0))
    if alive:
        assert await server.generate_probe(PROBE)
    else:
        with pytest.raises(RuntimeError, match=f"HTTP {status}") as raised:
            await server.generate_probe(PROBE)
        # Only a dead stub's answer is fatal at once (it does not heal).
        assert isinstance(raised.value, BackendDead) is ("is not healthy" in body)


async def test_a_request_still_queued_passes_readiness_and_fails_liveness(fake: Fake) -> None:
    """A saturated engine admits the probe's request only as a batch slot frees: readiness
    (9 s) passes one still queued then; liveness waits longer than a queue's drain, so no
    answer by then is a hung engine (the local supervisors' probe too)."""
    fake.hold = asyncio.Event()  # never answered while the probes run
    quick = {
        "pass": dataclasses.replace(TRITON_READINESS, request_timeout_s=0.3),
        "fail": dataclasses.replace(TRITON_LIVENESS, request_timeout_s=0.3),
    }
    assert await run_probe(fake, quick["pass"], "pass")
    assert not await run_probe(fake, quick["fail"], "fail")
    server = TritonServer(EMULATOR_REPOSITORY, TritonPorts(grpc=0, http=fake.port, metrics=0))
    with pytest.raises(RuntimeError, match="no answer within"):
        await server.generate_probe(dataclasses.replace(PROBE, request_timeout_s=0.3))
    assert TRITON_LIVENESS.request_timeout_s > TRITON_READINESS.request_timeout_s
