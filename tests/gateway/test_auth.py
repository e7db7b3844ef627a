"""Tenants, API keys and per-tenant limits: config validation, key checks, token buckets, and
the core applying them (tenant and priority to Admit, isolation between tenants under load)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pydantic
import pytest

from llmmesh.common.errors import Reason, ResourceExhausted, Unauthenticated
from llmmesh.common.topology import Priority
from services.gateway.admission import AdmissionRequest, Lease, Outcome
from services.gateway.auth import Authenticator, PriorityClass, TenantsFile, bearer_token, hash_key
from services.gateway.core import Completion, GatewayCore, GenerationRequest, Sampling
from services.gateway.errors import RateLimited
from services.gateway.limits import TenantLimits, TokenBucket
from services.gateway.models import ServedModel
from services.gateway.settings import GatewaySettings, ModelSettings
from services.gateway.triton_stream import EngineChunk, EngineRequest, TritonStreamError
from services.gateway.usage import UsageRecord
from tests.gateway.conftest import MODEL, FakeAdmission, FakeEngine


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def tenants(*entries: dict[str, Any]) -> TenantsFile:
    return TenantsFile.model_validate({"tenants": list(entries)})


def tenant(name: str, key: str, **kw: Any) -> dict[str, Any]:
    return {"name": name, "api_keys_sha256": [hash_key(key)], **kw}


# -- configuration --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        {"tenants": []},
        {"tenants": [{"name": "a", "api_keys_sha256": []}]},
        {"tenants": [{"name": "a", "api_keys_sha256": ["abc"]}]},
        {"tenants": [{"name": "", "api_keys_sha256": [hash_key("k")]}]},
        {"tenants": [tenant("a", "k", priority="urgent")]},
        {"tenants": [tenant("a", "k", requests_per_minute=0)]},
        {"tenants": [tenant("a", "k", tokens_per_minute=-5)]},
        {"tenants": [tenant("a", "k", api_key="plaintext")]},
        {"tenants": [tenant("a", "k"), tenant("a", "other")]},
        {"tenants": [tenant("a", "k"), tenant("b", "k")]},
        {"tenant": [tenant("a", "k")]},
    ],
)
def test_invalid_tenants_files_are_refused(data: dict[str, Any]) -> None:
    with pytest.raises(pydantic.ValidationError):
        TenantsFile.model_validate(data)


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_tenants_file_formats(tmp_path: Path, suffix: str) -> None:
    data = {"tenants": [tenant("acme", "sk-1", priority="interactive", requests_per_minute=5)]}
    path = tmp_path / f"tenants{suffix}"
    path.write_text(json.dumps(data))  # JSON is valid YAML too
    auth = Authenticator.from_file(path)
    t = auth.authenticate("sk-1")
    assert (t.name, t.priority) == ("acme", PriorityClass.INTERACTIVE)


@pytest.mark.parametrize(
    ("header", "token"),
    [
        (None, None),
        ("", None),
        ("Bearer sk-1", "sk-1"),
        ("bearer   sk-1 ", "sk-1"),
        ("Bearer", None),
        ("Basic dXNlcjpwYXNz", None),
        ("sk-1", None),
    ],
)
def test_bearer_token(header: str | None, token: str | None) -> None:
    assert bearer_token(header) == token


def test_keys_map_to_their_tenant_and_unknown_keys_fail() -> None:
    auth = Authenticator(
        tenants(
            {"name": "a", "api_keys_sha256": [hash_key("ka1"), hash_key("ka2").upper()]},
            tenant("b", "kb"),
        )
    )
    assert auth.authenticate("ka1").name == "a"
    assert auth.authenticate("ka2").name == "a"
    assert auth.authenticate("kb").name == "b"
    for bad in (None, "", "kc", "ka1 ", "x" * 10_000, "\ud800"):
        with pytest.raises(Unauthenticated):
            auth.authenticate(bad)


# -- token buckets --------------------------------------------------------------------------


def test_bucket_refills_continuously() -> None:
    clock = Clock()
    b = TokenBucket(60, clock)
    assert b.level() == 60
    b.take(60)
    assert b.wait_s(1) == pytest.approx(1.0)
    clock.now += 30
    assert b.level() == pytest.approx(30)
    clock.now += 100
    assert b.level() == 60  # capped
    assert b.wait_s(61) == float("inf")


def test_requests_limit_and_retry_after() -> None:
    clock = Clock()
    lim = TenantLimits("a", requests_per_minute=2, tokens_per_minute=None, clock=clock)
    lim.admit(10)
    lim.admit(10)
    with pytest.raises(RateLimited) as info:
        lim.admit(10)
    assert info.value.limit == "requests"
    assert info.value.retry_after_s == pytest.approx(30.0)
    snap = info.value.snapshot
    assert snap is not None
    assert snap.requests is not None
    assert (snap.requests.limit, snap.requests.remaining) == (2, 0)
    assert snap.tokens is None
    clock.now += 30
    lim.admit(10)


def test_completion_tokens_overdraw_and_block_the_next_request() -> None:
    clock = Clock()
    lim = TenantLimits("a", requests_per_minute=None, tokens_per_minute=600, clock=clock)
    lim.admit(100)
    lim.charge(700)  # a stream is never cut: the bucket goes to -200
    with pytest.raises(RateLimited) as info:
        lim.admit(10)
    assert info.value.limit == "tokens"
    assert info.value.retry_after_s == pytest.approx(21.0)  # (200 + 10) / 10 per second
    clock.now += 21
    lim.admit(10)


def test_prompt_over_the_whole_budget_has_no_retry_after() -> None:
    lim = TenantLimits("a", requests_per_minute=None, tokens_per_minute=100, clock=Clock())
    with pytest.raises(RateLimited) as info:
        lim.admit(101)
    assert info.value.retry_after_s is None


def test_refused_admission_takes_nothing_and_refund_gives_back() -> None:
    lim = TenantLimits("a", requests_per_minute=1, tokens_per_minute=100, clock=Clock())
    with pytest.raises(RateLimited):
        lim.admit(101)
    lim.admit(50)
    lim.refund(50)
    lim.admit(100)


# -- through the core -----------------------------------------------------------------------


class CountingEngine:
    """Every request streams `n` tokens."""

    def __init__(self, token: int, n: int):
        self.token = token
        self.n = n

    async def stream(
        self,
        address: str,
        authority: str,
        request: EngineRequest,
        *,
        timeout_s: float | None,
        metadata: Any = (),
    ) -> Any:
        for _ in range(min(self.n, request.max_tokens)):
            await asyncio.sleep(0)  # interleave concurrent streams
            yield EngineChunk([self.token], False)
        yield EngineChunk([], True)


@pytest.fixture(scope="module")
def model(tokenizer_path: Path) -> ServedModel:
    return ServedModel.load(ModelSettings(name=MODEL, tokenizer_path=tokenizer_path))


def make_core(
    model: ServedModel,
    auth: Authenticator | None,
    n_tokens: int = 4,
    orch: FakeAdmission | None = None,
) -> tuple[GatewayCore, FakeAdmission]:
    orch = orch or FakeAdmission()
    engine = CountingEngine(model.encode(" a")[0], n_tokens)
    core = GatewayCore(GatewaySettings(models=[model.settings]), [model], orch, engine, 32, auth)
    return core, orch


async def run(core: GatewayCore, key: str | None, **kw: Any) -> Completion:
    req = GenerationRequest(
        model=MODEL,
        request_id="r",
        prompt_text="Hello",
        api_key=key,
        sampling=Sampling(max_tokens=4),
        **kw,
    )
    events = [ev async for ev in core.generate(req, 10.0)]
    final = events[-1]
    assert isinstance(final, Completion)
    return final


async def test_auth_off_keeps_the_request_tenant_and_priority(model: ServedModel) -> None:
    core, orch = make_core(model, None)
    await run(core, None, tenant="user-7", priority=Priority.BATCH)
    assert orch.admits[0].tenant == "user-7"
    assert orch.admits[0].priority is Priority.BATCH


@pytest.mark.parametrize(
    ("name", "priority"),
    [
        ("interactive", Priority.INTERACTIVE),
        ("standard", Priority.STANDARD),
        ("batch", Priority.BATCH),
    ],
)
def test_priority_class_of_the_tenants_file_is_an_admission_priority(
    name: str, priority: Priority
) -> None:
    assert PriorityClass(name).priority is priority


async def test_tenant_and_priority_class_reach_admission(model: ServedModel) -> None:
    auth = Authenticator(tenants(tenant("acme", "sk-acme", priority="interactive")))
    core, orch = make_core(model, auth)
    await run(core, "sk-acme", tenant="spoofed")
    assert orch.admits[0].tenant == "acme"
    assert orch.admits[0].priority is Priority.INTERACTIVE


@pytest.mark.parametrize("key", [None, "wrong"])
async def test_missing_or_unknown_key_is_refused_before_anything(
    model: ServedModel, key: str | None
) -> None:
    auth = Authenticator(tenants(tenant("acme", "sk-acme")))
    core, orch = make_core(model, auth)
    with pytest.raises(Unauthenticated):
        await run(core, key)
    assert orch.admits == []


async def test_one_tenant_cannot_spend_anothers_quota_under_concurrent_load(
    model: ServedModel,
) -> None:
    clock = Clock()  # frozen: no refill during the test
    auth = Authenticator(
        tenants(
            tenant("greedy", "sk-g", requests_per_minute=5),
            tenant("polite", "sk-p", requests_per_minute=5),
        ),
        clock=clock,
    )
    core, orch = make_core(model, auth)
    greedy = [run(core, "sk-g") for _ in range(40)]
    polite = [run(core, "sk-p") for _ in range(5)]
    results = await asyncio.gather(*greedy, *polite, return_exceptions=True)
    g, p = results[:40], results[40:]
    assert sum(isinstance(r, Completion) for r in g) == 5
    assert all(isinstance(r, RateLimited) for r in g if not isinstance(r, Completion))
    assert all(isinstance(r, Completion) for r in p)
    assert sum(a.tenant == "polite" for a in orch.admits) == 5
    assert sum(a.tenant == "greedy" for a in orch.admits) == 5


async def test_completion_tokens_of_one_tenant_do_not_drain_another(model: ServedModel) -> None:
    clock = Clock()
    auth = Authenticator(
        tenants(
            tenant("a", "sk-a", tokens_per_minute=60),
            tenant("b", "sk-b", tokens_per_minute=60),
        ),
        clock=clock,
    )
    core, _ = make_core(model, auth, n_tokens=4)
    # Each request: ~1-2 prompt tokens + 4 completion tokens; a's budget runs out first.
    served_a = 0
    refused: RateLimited | None = None
    while refused is None:
        try:
            await run(core, "sk-a")
            served_a += 1
        except RateLimited as err:
            refused = err
    assert refused.limit == "tokens"
    assert 5 <= served_a <= 12
    for _ in range(served_a):
        await run(core, "sk-b")


async def test_orchestrator_rejection_refunds_the_tenant(model: ServedModel) -> None:
    auth = Authenticator(tenants(tenant("a", "sk-a", requests_per_minute=1)), clock=Clock())
    queue_full = ResourceExhausted("queue full", retry_after_s=1.0, reason=Reason.QUEUE_FULL)
    core, _ = make_core(model, auth, orch=FakeAdmission(reject=queue_full))
    for _ in range(3):
        with pytest.raises(ResourceExhausted) as info:
            await run(core, "sk-a")
        assert not isinstance(info.value, RateLimited)  # the queue, not the tenant limit


async def test_a_fault_of_the_gateways_own_refunds_the_tenant(model: ServedModel) -> None:
    """Not only refusals: a request that failed for a reason of this gateway's (a bug, here an
    admission client raising what no ServiceError is) was never served either."""
    auth = Authenticator(tenants(tenant("a", "sk-a", requests_per_minute=1)), clock=Clock())
    bug = RuntimeError("a bug")
    core, _ = make_core(model, auth, orch=FakeAdmission(reject=bug))  # type: ignore[arg-type]
    for _ in range(3):
        with pytest.raises(RuntimeError):
            await run(core, "sk-a")
    limits = auth.authenticate("sk-a").limits
    assert limits.requests is not None
    assert limits.requests.level() == 1.0


async def test_a_fault_of_the_gateways_own_after_the_lease_refunds_what_usage_does_not_bill(
    model: ServedModel,
) -> None:
    """A bug after the lease, before any token (the stream raising what no ServiceError is):
    the request was not served, so the tenant gets its budget back, as its usage record bills
    no prompt (the refund and the record judged it differently)."""
    auth = Authenticator(tenants(tenant("a", "sk-a", requests_per_minute=1)), clock=Clock())
    records: list[UsageRecord] = []

    class Usage:
        def submit(self, record: UsageRecord) -> None:
            records.append(record)

    engine = FakeEngine([[RuntimeError("a bug")]] * 3)
    core = GatewayCore(
        GatewaySettings(models=[model.settings]),
        [model],
        FakeAdmission(),
        engine,
        32,
        auth,
        usage=Usage(),
    )
    for _ in range(3):
        with pytest.raises(RuntimeError):
            await run(core, "sk-a")
    assert len(engine.requests) == 3  # each was leased and sent
    limits = auth.authenticate("sk-a").limits
    assert limits.requests is not None
    assert limits.requests.level() == 1.0
    assert [r.prompt_tokens for r in records] == [0, 0, 0]


async def test_requests_refused_in_their_slot_do_not_hasten_the_concurrency_retry_after(
    model: ServedModel,
) -> None:
    clock = Clock()
    auth = Authenticator(
        tenants(tenant("a", "sk-a", requests_per_minute=1, max_concurrent_requests=2)),
        clock=clock,
    )
    core, _ = make_core(model, auth)
    await run(core, "sk-a")  # one generation ran and freed its slot
    for _ in range(50):
        with pytest.raises(RateLimited):
            await run(core, "sk-a")
    concurrency = auth.authenticate("sk-a").limits.concurrency
    assert concurrency is not None
    # One slot freed in the last 5 s: about 5 s; fifty more counted as freed gave 0.2 s.
    assert concurrency.retry_after_s() == pytest.approx(5.0, rel=0.05)


class HangingFirst(FakeAdmission):
    """The first Admit waits until cancelled (a queue); later ones are granted."""

    def __init__(self) -> None:
        super().__init__()
        self.waiting = asyncio.Event()

    async def admit(self, request: AdmissionRequest, *, timeout_s: float) -> Lease:
        if not self.admits:
            self.admits.append(request)
            self.waiting.set()
            await asyncio.Event().wait()
        return await super().admit(request, timeout_s=timeout_s)


async def test_a_caller_gone_while_queued_keeps_its_budget(model: ServedModel) -> None:
    auth = Authenticator(tenants(tenant("a", "sk-a", requests_per_minute=1)), clock=Clock())
    orch = HangingFirst()
    core, _ = make_core(model, auth, orch=orch)
    queued = asyncio.create_task(run(core, "sk-a"))
    await orch.waiting.wait()
    queued.cancel()
    with pytest.raises(asyncio.CancelledError):
        await queued
    # Its one request a minute was given back: the next request is served.
    assert (await run(core, "sk-a")).completion_tokens == 4


class HangingSecond(FakeAdmission):
    """The first Admit is granted; the second (the request admitted again after its replica
    failed) waits until cancelled."""

    def __init__(self) -> None:
        super().__init__()
        self.waiting = asyncio.Event()

    async def admit(self, request: AdmissionRequest, *, timeout_s: float) -> Lease:
        if self.admits:
            self.admits.append(request)
            self.waiting.set()
            await asyncio.Event().wait()
        return await super().admit(request, timeout_s=timeout_s)


async def test_a_caller_gone_while_admitted_again_after_its_replica_failed_keeps_its_budget(
    model: ServedModel,
) -> None:
    """Its replica failed before any token, and the caller left while the request waited to be
    admitted elsewhere: no replica served it (the only lease failed), so the tenant gets its
    budget back and the usage record bills no prompt, as when the caller leaves during its
    first admission."""
    auth = Authenticator(tenants(tenant("a", "sk-a", requests_per_minute=1)), clock=Clock())
    records: list[UsageRecord] = []

    class Usage:
        def submit(self, record: UsageRecord) -> None:
            records.append(record)

    orch = HangingSecond()
    engine = FakeEngine([[TritonStreamError("reset", replica_fault=True)]])
    core = GatewayCore(
        GatewaySettings(models=[model.settings]), [model], orch, engine, 32, auth, usage=Usage()
    )
    failing = asyncio.create_task(run(core, "sk-a"))
    await orch.waiting.wait()
    failing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await failing
    assert [r.outcome for r in orch.reports] == [Outcome.REPLICA_ERROR]
    assert [r.prompt_tokens for r in records] == [0]
    limits = auth.authenticate("sk-a").limits
    assert limits.requests is not None
    assert limits.requests.level() == 1.0
