from __future__ import annotations

import asyncio
import contextlib
import socket

import pydantic
import pytest

from llmmesh.common import discovery
from llmmesh.common.discovery import DiscoveredPod, DnsTarget
from services.orchestrator.__main__ import every
from services.orchestrator.discovery import Discovery, discover, replicas_from_pods
from services.orchestrator.settings import OrchestratorSettings, ReplicaSpec


def test_replicas_from_pods_ids_and_authority() -> None:
    t = DnsTarget(host="triton.svc", pool="short", model_version="v2")
    specs = replicas_from_pods([DiscoveredPod(t, "10.0.0.2")])
    assert [(s.id, s.grpc_address, s.authority, s.pool, s.model_version) for s in specs] == [
        ("short-v2-10.0.0.2", "10.0.0.2:8001", "triton.svc:8001", "short", "v2")
    ]


async def test_discover_resolves_localhost_and_skips_unresolvable() -> None:
    settings = OrchestratorSettings(
        replicas=[ReplicaSpec(id="static", grpc_address="127.0.0.1:1")],
        replica_dns=[
            DnsTarget(host="localhost", port=8001),
            DnsTarget(host="does-not-exist.invalid"),
        ],
    )
    specs = await discover(settings)
    assert specs[0].id == "static"
    assert "127.0.0.1:8001" in {s.grpc_address for s in specs[1:]}


class FakeResolver:
    """Answers each host from `answers`: a list of IPs, or an exception to raise."""

    def __init__(self) -> None:
        self.answers: dict[str, list[str] | BaseException] = {}

    async def __call__(self, host: str, port: int) -> list[str]:
        answer = self.answers[host]
        if isinstance(answer, BaseException):
            raise answer
        return answer


@pytest.fixture
def resolver(monkeypatch: pytest.MonkeyPatch) -> FakeResolver:
    fake = FakeResolver()
    monkeypatch.setattr(discovery, "resolve_ipv4", fake)
    return fake


async def test_a_dns_hiccup_keeps_the_pods_a_service_listed_last(resolver: FakeResolver) -> None:
    """A failed resolution (SERVFAIL, a timeout) said the Service had no pods: every replica of
    the pool was removed from routing until the next round."""
    settings = OrchestratorSettings(
        replica_dns=[DnsTarget(host="short.svc", pool="short"), DnsTarget(host="long.svc")]
    )
    discover = Discovery(settings)
    resolver.answers = {"short.svc": ["10.0.0.1", "10.0.0.2"], "long.svc": ["10.0.1.1"]}
    first = {s.id for s in await discover()}
    assert len(first) == 3
    for transient in (
        socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution"),
        TimeoutError(),
        OSError("resolver gone"),
    ):
        resolver.answers["short.svc"] = transient
        resolver.answers["long.svc"] = ["10.0.1.2"]  # the others still move
        assert {s.id for s in await discover()} == {
            "short-v1-10.0.0.1",
            "short-v1-10.0.0.2",
            "default-v1-10.0.1.2",
        }
    # The DNS answering that the name has no address (no ready pod, or none at all): none.
    resolver.answers["short.svc"] = socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    assert {s.id for s in await discover()} == {"default-v1-10.0.1.2"}
    resolver.answers["short.svc"] = socket.gaierror(socket.EAI_AGAIN, "again")
    assert {s.id for s in await discover()} == {"default-v1-10.0.1.2"}  # its last answer: none


def test_a_host_that_is_no_dns_name_is_refused_at_start() -> None:
    with pytest.raises(pydantic.ValidationError, match="not a DNS name"):
        DnsTarget(host="a..b.svc")


async def test_upkeep_goes_on_after_a_failed_round(caplog: pytest.LogCaptureFixture) -> None:
    rounds: list[int] = []
    done = asyncio.Event()

    async def step() -> None:
        rounds.append(len(rounds))
        if len(rounds) == 1:
            raise UnicodeError("a bug in one round")
        if len(rounds) == 3:
            done.set()

    task = asyncio.create_task(every(0.0, step))
    try:
        await asyncio.wait_for(done.wait(), 5)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert rounds[:3] == [0, 1, 2]
    assert "periodic upkeep failed" in caplog.text
