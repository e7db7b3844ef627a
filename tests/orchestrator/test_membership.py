"""Registered replicas (RegisterReplica / DrainReplica / DeregisterReplica), the activator for
scale-from-zero pools, and the per-pool gauges: core and servicer over a real channel."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest
import pytest_asyncio
from prometheus_client import REGISTRY

from llmmesh.common import metric_names as names
from llmmesh.generated.orchestrator.v1 import orchestrator_pb2 as pb
from llmmesh.generated.orchestrator.v1 import orchestrator_pb2_grpc as pb_grpc
from services.orchestrator.director import Orchestrator
from services.orchestrator.domain import Outcome
from services.orchestrator.errors import (
    NoReplicaReady,
    QueueFull,
    QueueTimeout,
    ReplicaConflict,
    UnknownReplica,
)
from services.orchestrator.policy import Policy, PoolPolicy, ScaleFromZeroPolicy
from services.orchestrator.scheduling.contracts import ReplicaLoad
from services.orchestrator.settings import ReplicaSpec
from tests.helpers import ManualClock, eventually
from tests.orchestrator.serving import serve
from tests.orchestrator.test_core import FakeProbe, assert_queued, req, settings
from tests.orchestrator.test_views import view


def spec(rid: str, pool: str = "default", version: str = "v1") -> ReplicaSpec:
    return ReplicaSpec(id=rid, grpc_address="127.0.0.1:7000", pool=pool, model_version=version)


def sfz_policy(timeout_s: float, pool: str = "auto", **kw: object) -> Policy:
    return Policy(
        scale_from_zero={
            pool: ScaleFromZeroPolicy(
                activation_timeout_s=timeout_s, model_version="v1", models=["tensorrt_llm"]
            )
        },
        **kw,
    )


def gauge(name: str, pool: str, version: str = "v1") -> float:
    value = REGISTRY.get_sample_value(name, {"pool": pool, "model_version": version})
    return 0.0 if value is None else value


async def test_registered_replica_is_routed_only_once_its_probe_passes() -> None:
    probe = FakeProbe()
    core = Orchestrator(settings(n=0), probe)
    reg = await core.register_replica(spec("a0"))
    assert (reg.ready, reg.created) == (False, True)
    with pytest.raises(NoReplicaReady):
        await core.admit(req(), 1.0)
    probe.ready_ids.add("a0")
    reg = await core.register_replica(spec("a0"))  # idempotent: probes again
    assert (reg.ready, reg.created) == (True, False)
    assert (await core.admit(req(), 1.0)).replica.id == "a0"
    assert [st.spec.id for st in core.replicas() if st.registered] == ["a0"]


@pytest.mark.parametrize(
    ("existing", "new", "leased", "error"),
    [
        ("static", spec("r0"), False, ReplicaConflict),  # id of a static replica
        ("registered", spec("a0", pool="other"), True, ReplicaConflict),  # spec change, leases
        ("registered", spec("a0", pool="other"), False, None),  # spec change, idle: replaced
    ],
)
async def test_register_conflicts(
    existing: str, new: ReplicaSpec, leased: bool, error: type[Exception] | None
) -> None:
    probe = FakeProbe()
    core = Orchestrator(settings(n=1 if existing == "static" else 0), probe)
    probe.ready_ids = {"r0", "a0"}
    if existing == "registered":
        await core.register_replica(spec("a0"))
    await core.probe_once()
    if leased:
        await core.admit(req(), 1.0)
    if error is None:
        await core.register_replica(new)
        assert next(st.spec for st in core.replicas() if st.spec.id == new.id) == new
    else:
        with pytest.raises(error):
            await core.register_replica(new)


async def test_drain_stops_new_work_then_reports_drained_when_leases_end() -> None:
    probe = FakeProbe()
    probe.ready_ids = {"a0", "a1"}
    core = Orchestrator(settings(n=0, cap=4), probe)
    for rid in ("a0", "a1"):
        await core.register_replica(spec(rid))
    leases = [await core.admit(req(str(i)), 1.0) for i in range(4)]
    on_a0 = [lease for lease in leases if lease.replica.id == "a0"]
    assert on_a0, "least-outstanding spreads four leases over both replicas"

    now = await core.drain_replica("a0", 0)
    assert (now.in_flight, now.drained) == (len(on_a0), False)
    waiting = asyncio.create_task(core.drain_replica("a0", 30))
    assert [(await core.admit(req(f"n{i}"), 1.0)).replica.id for i in range(2)] == ["a1", "a1"]
    for lease in on_a0:
        assert not waiting.done()
        core.complete(lease.lease_id, Outcome.SUCCESS)
    result = await waiting
    assert (result.in_flight, result.drained) == (0, True)
    assert next(st for st in core.replicas() if st.spec.id == "a0").draining
    # Registering again cancels the drain.
    await core.register_replica(spec("a0"))
    assert not next(st for st in core.replicas() if st.spec.id == "a0").draining


async def test_drain_waits_only_as_long_as_asked() -> None:
    probe = FakeProbe()
    probe.ready_ids = {"a0"}
    core = Orchestrator(settings(n=0), probe)
    await core.register_replica(spec("a0"))
    await core.admit(req(), 1.0)
    result = await core.drain_replica("a0", 0.05)
    assert (result.in_flight, result.drained) == (1, False)


async def test_deregister_reports_live_leases_which_still_complete() -> None:
    probe = FakeProbe()
    probe.ready_ids = {"a0", "r0"}
    core = Orchestrator(settings(n=1), probe)
    await core.register_replica(spec("a0"))
    await core.probe_once()
    leases = [await core.admit(req(str(i)), 1.0) for i in range(3)]
    on_a0 = sum(lease.replica.id == "a0" for lease in leases)
    assert core.deregister_replica("a0") == on_a0
    assert "a0" not in {st.spec.id for st in core.replicas()}
    assert all(core.complete(lease.lease_id, Outcome.SUCCESS) for lease in leases)
    with pytest.raises(UnknownReplica):
        core.deregister_replica("a0")


async def test_a_forgotten_replicas_series_go_and_come_back_with_it() -> None:
    probe = FakeProbe()
    probe.ready_ids = {"gone0"}
    core = Orchestrator(settings(n=0), probe)
    await core.register_replica(spec("gone0"))
    lease = await core.admit(req("x"), 1.0)
    labels = {"replica": "gone0", "pool": "default"}
    decided = {"model": "tensorrt_llm", **labels}
    assert REGISTRY.get_sample_value(names.ORCH_REPLICA_IN_FLIGHT, labels) == 1
    assert REGISTRY.get_sample_value(names.ORCH_DECISIONS, decided) == 1
    core.deregister_replica("gone0")
    assert REGISTRY.get_sample_value(names.ORCH_REPLICA_IN_FLIGHT, labels) == 1  # still leased
    assert core.complete(lease.lease_id, Outcome.SUCCESS)
    assert REGISTRY.get_sample_value(names.ORCH_REPLICA_IN_FLIGHT, labels) is None
    assert REGISTRY.get_sample_value(names.ORCH_DECISIONS, decided) is None
    await core.register_replica(spec("gone0"))
    assert REGISTRY.get_sample_value(names.ORCH_REPLICA_IN_FLIGHT, labels) == 0
    assert REGISTRY.get_sample_value(names.ORCH_DECISIONS, decided) == 0
    await core.admit(req("y"), 1.0)
    assert REGISTRY.get_sample_value(names.ORCH_REPLICA_IN_FLIGHT, labels) == 1


async def test_a_replica_whose_last_lease_failed_as_it_left_exports_nothing() -> None:
    # The usual end of a scaled-down pod: its last request fails on it after it left the set.
    probe = FakeProbe()
    probe.ready_ids = {"gone1"}
    core = Orchestrator(settings(n=0), probe)
    core.sync_replicas([spec("gone1")])
    await core.probe_once()
    lease = await core.admit(req("x"), 1.0)
    core.sync_replicas([])
    assert core.complete(lease.lease_id, Outcome.REPLICA_ERROR)
    if core._reprobes:  # a probe of it, had one been started, has ended
        await asyncio.wait(core._reprobes.values())
    labels = {"replica": "gone1", "pool": "default"}
    assert REGISTRY.get_sample_value(names.ORCH_REPLICA_HEALTHY, labels) is None
    assert REGISTRY.get_sample_value(names.ORCH_REPLICA_IN_FLIGHT, labels) is None


async def test_a_replicas_series_move_with_its_pool() -> None:
    probe = FakeProbe()
    probe.ready_ids = {"moved"}
    core = Orchestrator(settings(n=0), probe)
    core.sync_replicas([spec("moved", pool="p1")])
    await core.probe_once()
    core.sync_replicas([spec("moved", pool="p2")])
    await core.probe_once()
    core.sync_replicas([])
    for pool in ("p1", "p2"):
        labels = {"replica": "moved", "pool": pool}
        assert REGISTRY.get_sample_value(names.ORCH_REPLICA_HEALTHY, labels) is None


@pytest.mark.parametrize("leave", ["deregister", "sync"])
async def test_a_replicas_load_accounting_lives_as_long_as_its_state(leave: str) -> None:
    # Time stands still: two leases' prefill backlog shows until they end. A replica that
    # leaves and comes back while they run keeps it (they still run there); one that comes
    # back after they ended starts with nothing of its old accounting.
    probe = FakeProbe()
    probe.ready_ids = {"a0"}
    core = Orchestrator(settings(n=0), probe, clock=ManualClock())

    async def join() -> None:
        if leave == "deregister":
            await core.register_replica(spec("a0"))
        else:
            core.sync_replicas([spec("a0")])
            await core.probe_once()

    def part() -> None:
        if leave == "deregister":
            core.deregister_replica("a0")
        else:
            core.sync_replicas([])

    await join()
    leases = [await core.admit(req(str(i), prompt_len=2000), 1.0) for i in range(2)]
    before = view(core, "a0").load
    assert before is not None
    assert before.prefill_s > 0
    part()
    await join()
    back = view(core, "a0").load
    assert back is not None
    assert back.prefill_s == before.prefill_s
    part()
    assert core._load.stamp("a0") != -1  # its leases still run
    assert all(core.complete(lease.lease_id, Outcome.SUCCESS) for lease in leases)
    assert core._load.stamp("a0") == -1  # gone with its state
    await join()
    assert view(core, "a0").load == ReplicaLoad()


@pytest.mark.parametrize(
    ("call", "replica_id", "error"),
    [
        ("drain", "nope", UnknownReplica),
        ("deregister", "nope", UnknownReplica),
        ("deregister", "r0", ReplicaConflict),  # static replicas leave by configuration
    ],
)
async def test_membership_errors(call: str, replica_id: str, error: type[Exception]) -> None:
    core = Orchestrator(settings(n=1), FakeProbe())

    async def run() -> None:
        if call == "drain":
            await core.drain_replica(replica_id, 0)
        else:
            core.deregister_replica(replica_id)

    with pytest.raises(error, match="replica_id"):
        await run()


async def test_discovery_never_removes_registered_replicas() -> None:
    probe = FakeProbe()
    probe.ready_ids = {"a0", "d0"}
    core = Orchestrator(settings(n=0), probe)
    await core.register_replica(spec("a0"))
    core.sync_replicas([spec("d0")])
    core.sync_replicas([])
    assert {st.spec.id for st in core.replicas()} == {"a0"}


# -- activator ------------------------------------------------------------------------------
async def test_request_waits_for_a_scale_from_zero_pool_then_is_granted() -> None:
    probe = FakeProbe()
    core = Orchestrator(settings(n=0), probe, sfz_policy(30))
    queued_before = gauge("llmmesh_orchestrator_pool_queue_depth", "auto")
    waiting = asyncio.create_task(core.admit(req("w"), 30))
    await assert_queued(core, 1)
    assert gauge("llmmesh_orchestrator_pool_queue_depth", "auto") == queued_before + 1
    assert gauge("llmmesh_orchestrator_pool_ready_replicas", "auto") == 0
    probe.ready_ids.add("auto-0")
    await core.register_replica(spec("auto-0", pool="auto"))
    assert (await waiting).replica.id == "auto-0"
    assert gauge("llmmesh_orchestrator_pool_queue_depth", "auto") == queued_before
    assert gauge("llmmesh_orchestrator_pool_ready_replicas", "auto") == 1


@pytest.mark.parametrize(
    ("activation_s", "deadline_s", "error", "message"),
    [
        (0.05, 30.0, NoReplicaReady, "pool 'auto' has no ready replica; none became ready within"),
        (30.0, 0.05, QueueTimeout, "no replica slot"),  # the call's deadline comes first
    ],
)
async def test_activation_gives_up_at_the_earlier_of_timeout_and_deadline(
    activation_s: float, deadline_s: float, error: type[Exception], message: str
) -> None:
    s = settings(n=0)
    core = Orchestrator(s, FakeProbe(), sfz_policy(activation_s))
    queued_before = gauge("llmmesh_orchestrator_pool_queue_depth", "auto")
    with pytest.raises(error, match=message) as info:
        await core.admit(req(), deadline_s)
    if isinstance(info.value, NoReplicaReady):  # an HTTP client's 503 gets a Retry-After
        assert info.value.retry_after_s == s.health_interval_s  # one health round
    assert core.queue_depth == 0
    assert gauge("llmmesh_orchestrator_pool_queue_depth", "auto") == queued_before


LENGTH_POOLS = {"auto": PoolPolicy(max_prompt_tokens=10), "long": PoolPolicy(max_prompt_tokens=100)}


@pytest.mark.parametrize(
    ("request_kw", "policy", "waits"),
    [
        ({}, sfz_policy(30), True),
        ({"model": "other"}, sfz_policy(30), False),  # the pool does not serve the model
        ({"version": "v2"}, sfz_policy(30), False),  # nor that version
        ({"version": "v1"}, sfz_policy(30), True),
        ({}, Policy(), False),  # no pool declared: UNAVAILABLE at once, as before
        # A length-bucketed scale-from-zero pool the prompt does not fit.
        ({"prompt_len": 50}, sfz_policy(30, pools=LENGTH_POOLS), False),
        ({"prompt_len": 5}, sfz_policy(30, pools=LENGTH_POOLS), True),
    ],
)
async def test_which_requests_wait_for_activation(
    request_kw: dict[str, object], policy: Policy, waits: bool
) -> None:
    core = Orchestrator(settings(n=0), FakeProbe(), policy)
    task = asyncio.create_task(core.admit(req(**request_kw), 30))  # type: ignore[arg-type]
    await asyncio.sleep(0)  # one tick: the admit either queued or failed
    if waits:
        assert core.queue_depth == 1
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    else:
        with pytest.raises(NoReplicaReady):
            await task
    assert core.queue_depth == 0


async def test_activation_waiters_respect_the_queue_bound() -> None:
    core = Orchestrator(settings(n=0, queue=1), FakeProbe(), sfz_policy(30))
    first = asyncio.create_task(core.admit(req("a"), 30))
    await assert_queued(core, 1)
    with pytest.raises(QueueFull):
        await core.admit(req("b"), 30)
    first.cancel()
    await asyncio.gather(first, return_exceptions=True)


async def test_draining_the_last_replica_of_an_activator_pool_keeps_waiters() -> None:
    probe = FakeProbe()
    probe.ready_ids = {"auto-0"}
    core = Orchestrator(settings(n=0, cap=1), probe, sfz_policy(30))
    await core.register_replica(spec("auto-0", pool="auto"))
    held = await core.admit(req("held"), 1.0)
    waiting = asyncio.create_task(core.admit(req("w"), 30))
    await assert_queued(core, 1)
    await core.drain_replica("auto-0", 0)
    core.complete(held.lease_id, Outcome.SUCCESS)
    await assert_queued(core, 1)  # not granted on the draining replica, still waiting
    probe.ready_ids.add("auto-1")
    await core.register_replica(spec("auto-1", pool="auto"))
    assert (await waiting).replica.id == "auto-1"


async def test_queued_request_counts_under_its_replicas_pool_and_version() -> None:
    probe = FakeProbe()
    probe.ready_ids = {"p0"}
    core = Orchestrator(settings(n=0, cap=1), probe)
    await core.register_replica(spec("p0", pool="busy", version="v7"))
    await core.admit(req("held"), 1.0)
    queued_before = gauge("llmmesh_orchestrator_pool_queue_depth", "busy", "v7")
    waiting = asyncio.create_task(core.admit(req("w"), 30))
    await assert_queued(core, 1)
    assert gauge("llmmesh_orchestrator_pool_queue_depth", "busy", "v7") == queued_before + 1
    assert gauge("llmmesh_orchestrator_pool_ready_replicas", "busy", "v7") == 1
    waiting.cancel()
    await asyncio.gather(waiting, return_exceptions=True)
    assert gauge("llmmesh_orchestrator_pool_queue_depth", "busy", "v7") == queued_before


# -- servicer over a real channel -------------------------------------------------------------
@pytest_asyncio.fixture
async def served() -> AsyncIterator[tuple[pb_grpc.OrchestratorServiceAsyncStub, FakeProbe]]:
    probe = FakeProbe()
    core = Orchestrator(settings(n=1), probe, sfz_policy(30))
    async with serve(core) as stub:
        yield stub, probe


def pb_spec(rid: str = "auto-0", **kw: object) -> pb.ReplicaSpec:
    fields: dict[str, object] = {
        "id": rid,
        "grpc_address": "127.0.0.1:7001",
        "pool": "auto",
        "model_version": "v1",
        "models": ["tensorrt_llm"],
        **kw,
    }
    return pb.ReplicaSpec(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("replica", "field"),
    [
        (pb_spec(id=""), "replica.id"),
        (pb_spec(grpc_address="nohostport"), "replica.grpc_address"),
        (pb_spec(grpc_address="h:99999"), "replica.grpc_address"),
        (pb_spec(models=[]), "replica.models"),
        (pb_spec(pool=""), "replica.pool"),
        (pb_spec(model_version=""), "replica.model_version"),
    ],
)
async def test_register_bad_spec_is_invalid_argument_naming_the_field(
    served: tuple[pb_grpc.OrchestratorServiceAsyncStub, FakeProbe],
    replica: pb.ReplicaSpec,
    field: str,
) -> None:
    stub, _ = served
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.RegisterReplica(pb.RegisterReplicaRequest(replica=replica), timeout=5)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in (info.value.details() or "")


@pytest.mark.parametrize(
    ("call", "code"),
    [
        ("drain", grpc.StatusCode.NOT_FOUND),
        ("deregister", grpc.StatusCode.NOT_FOUND),
        ("deregister-static", grpc.StatusCode.FAILED_PRECONDITION),
    ],
)
async def test_membership_status_codes(
    served: tuple[pb_grpc.OrchestratorServiceAsyncStub, FakeProbe], call: str, code: grpc.StatusCode
) -> None:
    stub, _ = served

    async def run() -> None:
        if call == "drain":
            await stub.DrainReplica(pb.DrainReplicaRequest(replica_id="nope"), timeout=5)
        else:
            rid = "r0" if call == "deregister-static" else "nope"
            await stub.DeregisterReplica(pb.DeregisterReplicaRequest(replica_id=rid), timeout=5)

    with pytest.raises(grpc.aio.AioRpcError) as info:
        await run()
    assert info.value.code() == code


async def test_register_admit_drain_deregister_over_grpc(
    served: tuple[pb_grpc.OrchestratorServiceAsyncStub, FakeProbe],
) -> None:
    stub, probe = served
    admit = pb.AdmitRequest(
        request_id="w", model="tensorrt_llm", prompt_token_ids=[1, 2], max_tokens=4
    )
    waiting = stub.Admit(admit, timeout=30)  # the activator pool has no replica yet

    async def queued() -> bool:
        return (await stub.ListReplicas(pb.ListReplicasRequest(), timeout=5)).queue_depth == 1

    await eventually(queued, what="Admit waits for the scale-from-zero pool")
    probe.ready_ids.add("auto-0")
    reg = await stub.RegisterReplica(pb.RegisterReplicaRequest(replica=pb_spec()), timeout=5)
    assert (reg.ready, reg.created) == (True, True)
    lease = await waiting
    assert lease.replica.id == "auto-0"

    listed = await stub.ListReplicas(pb.ListReplicasRequest(), timeout=5)
    status = next(s for s in listed.replicas if s.replica.id == "auto-0")
    assert (status.registered, status.draining, status.in_flight) == (True, False, 1)

    drain = asyncio.ensure_future(
        stub.DrainReplica(pb.DrainReplicaRequest(replica_id="auto-0"), timeout=30)
    )

    async def draining() -> bool:
        listed = await stub.ListReplicas(pb.ListReplicasRequest(), timeout=5)
        return next(s for s in listed.replicas if s.replica.id == "auto-0").draining

    await eventually(draining, what="DrainReplica marks the replica draining at once")
    assert not drain.done()
    await stub.Complete(
        pb.CompleteRequest(lease_id=lease.lease_id, outcome=pb.OUTCOME_SUCCESS), timeout=5
    )
    drained = await drain
    assert (drained.in_flight, drained.drained) == (0, True)
    short = await stub.DrainReplica(pb.DrainReplicaRequest(replica_id="auto-0"), timeout=5)
    assert short.drained  # idempotent
    gone = await stub.DeregisterReplica(pb.DeregisterReplicaRequest(replica_id="auto-0"), timeout=5)
    assert gone.in_flight == 0
    listed = await stub.ListReplicas(pb.ListReplicasRequest(), timeout=5)
    assert [s.replica.id for s in listed.replicas] == ["r0"]


async def test_drain_with_a_short_deadline_answers_not_drained(
    served: tuple[pb_grpc.OrchestratorServiceAsyncStub, FakeProbe],
) -> None:
    stub, probe = served
    probe.ready_ids.add("auto-0")
    await stub.RegisterReplica(pb.RegisterReplicaRequest(replica=pb_spec()), timeout=5)
    await stub.Admit(
        pb.AdmitRequest(
            request_id="x",
            model="tensorrt_llm",
            prompt_token_ids=[1],
            max_tokens=4,
            model_version="v1",
        ),
        timeout=5,
    )
    # The static replica was never probed ready: the lease is on auto-0, and the drain answers
    # before its deadline rather than expiring (a margin of 10% of it: 200 ms for a loaded
    # machine's event loop, which serves both ends here).
    result = await stub.DrainReplica(pb.DrainReplicaRequest(replica_id="auto-0"), timeout=2.0)
    assert (result.in_flight, result.drained) == (1, False)
