"""The local mesh configures its children through typed settings: hand-written variables are
checked where the mesh is built, and each child's environment derives from its settings object.
No process is started here."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from llmmesh.common.components import GATEWAY, ORCHESTRATOR
from llmmesh.common.settings import env_prefix, to_env
from llmmesh.localmesh import (
    SERVICE_SETTINGS,
    AutoscaledPool,
    LocalMesh,
    MeshOptions,
    ServiceProcess,
    engine_time_scale,
)
from llmmesh.triton.launcher import TritonServer
from services.autoscaler.settings import AutoscalerSettings
from services.gateway.settings import GatewaySettings
from services.orchestrator.settings import OrchestratorSettings


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"extra_env": {"LLMMESH_GATEWAY_RESUME_GRACE": "1"}}, "GatewaySettings has no field"),
        ({"extra_env": {"LLMMESH_GATWAY_SHADOW": "true"}}, "no llmmesh component reads"),
        ({"orchestrator_env": {"LLMMESH_GATEWAY_SHADOW": "true"}}, "orchestrator_env: not"),
        ({"emulator_env": {"LLMMESH_EMULATOR_TIMESCALE": "2"}}, "EmulatorSettings has no field"),
    ],
)
def test_a_misspelt_variable_is_refused(
    options: dict[str, dict[str, str]], message: str, tmp_path: Path
) -> None:
    with pytest.raises(ValueError, match=message):
        LocalMesh(MeshOptions(workdir=tmp_path, **options))  # type: ignore[arg-type]


def test_service_settings_take_extra_env_over_the_mesh_defaults(tmp_path: Path) -> None:
    mesh = LocalMesh(
        MeshOptions(
            workdir=tmp_path,
            log_json=False,
            extra_env={
                "LLMMESH_GATEWAY_RESUME_GRACE_S": "600",
                "LLMMESH_GATEWAY_DRAIN_SECONDS": "3",
                "LLMMESH_KV_BLOCK_SIZE": "16",
                "SOME_TOOL_FLAG": "1",
            },
        )
    )
    gw = mesh._configure(GatewaySettings(grpc_port=0))
    assert (gw.grpc_port, gw.log_json, gw.resume_grace_s, gw.drain_seconds) == (0, False, 600, 3)
    # Block identity and variables of no component reach every child, as they were given.
    assert mesh._shared_env == {"LLMMESH_KV_BLOCK_SIZE": "16", "SOME_TOOL_FLAG": "1"}


def test_a_service_process_reports_through_its_settings_ready_file(tmp_path: Path) -> None:
    svc = ServiceProcess(GATEWAY, GatewaySettings(grpc_port=0), tmp_path)
    assert svc.settings.ready_file == tmp_path / "gateway.ready.json"
    assert to_env(svc.settings)["LLMMESH_GATEWAY_READY_FILE"] == str(svc.settings.ready_file)
    with pytest.raises(TypeError, match="orchestrator is configured by"):
        ServiceProcess(ORCHESTRATOR, GatewaySettings(), tmp_path)


def test_emulator_replicas_get_their_id_registry_time_scale_and_emulator_env(
    tmp_path: Path,
) -> None:
    mesh = LocalMesh(
        MeshOptions(
            workdir=tmp_path,
            time_scale=0.5,
            emulator_env={"LLMMESH_EMULATOR_NUM_KV_BLOCKS": "99"},
        )
    )
    env = to_env(mesh._emulator(replica_id="replica-0", kv_registry_address="127.0.0.1:1"))
    assert env == {
        "LLMMESH_EMULATOR_REPLICA_ID": "replica-0",
        "LLMMESH_EMULATOR_KV_REGISTRY_ADDRESS": "127.0.0.1:1",
        "LLMMESH_EMULATOR_TIME_SCALE": "0.5",
        "LLMMESH_EMULATOR_NUM_KV_BLOCKS": "99",
    }


async def test_every_child_reads_back_the_settings_the_mesh_built(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A mesh started without processes: each service's environment, read by its own settings
    class as the child would, gives the object the mesh built; engines get their replica ids."""
    ports = iter(range(20000, 20100))

    async def fake_start(self: ServiceProcess, timeout_s: float = 60.0) -> None:
        self.grpc_port, self.metrics_port = next(ports), next(ports)

    async def fake_triton(make: Callable[[], TritonServer], **_: object) -> TritonServer:
        return make()

    monkeypatch.setattr(ServiceProcess, "start", fake_start)
    monkeypatch.setattr("llmmesh.localmesh.start_on_free_ports", fake_triton)
    mesh = LocalMesh(
        MeshOptions(
            workdir=tmp_path,
            replicas=2,
            replica_pools=["short", "long"],
            autoscaled_pools=[AutoscaledPool("auto", policy={"cooldown_s": 0.0})],
            orchestrator_env={"LLMMESH_ORCHESTRATOR_PROFILE": "prefix-only"},
            time_scale=2.5,
        )
    )
    await mesh.start()
    assert set(mesh.services) == {c.name for c in SERVICE_SETTINGS}
    for component, cls in SERVICE_SETTINGS.items():
        svc = mesh.services[component.name]
        env = svc.environment()
        for key in list(os.environ):
            if key.upper().startswith(env_prefix(cls)):
                monkeypatch.delenv(key)
        for key, value in env.items():
            if key.upper().startswith(env_prefix(cls)):
                monkeypatch.setenv(key, value)
        assert cls() == svc.settings, component.name

    orch = mesh.services["orchestrator"].settings
    assert isinstance(orch, OrchestratorSettings)
    assert [(r.id, r.pool) for r in orch.replicas] == [
        ("replica-0", "short"),
        ("replica-1", "long"),
    ]
    assert orch.profile == "prefix-only"
    assert orch.engine_time_scale == 2.5  # the emulators' speed, modelled as they run
    assert orch.kv_registry_address == mesh.services["kv_registry"].address
    assert orch.policy_file is not None
    assert "auto" in orch.policy_file.read_text()
    asc = mesh.services["autoscaler"].settings
    assert isinstance(asc, AutoscalerSettings)
    assert asc.local_actuator is not None
    assert [p.key.pool for p in asc.pools] == ["auto"]
    assert asc.policy_for(asc.pools[0].key).cooldown_s == 0.0
    assert [t.replica_id for t in asc.targets] == mesh.replica_ids
    for rid, triton in zip(mesh.replica_ids, mesh.tritons, strict=True):
        assert triton.env["LLMMESH_EMULATOR_REPLICA_ID"] == rid


@pytest.mark.parametrize(("time_scale", "expected"), [(0.0, 1.0), (0.02, 0.02), (9.5, 9.5)])
def test_the_orchestrator_models_the_emulators_speed(time_scale: float, expected: float) -> None:
    # Time scale 0 (engines that never wait) is modelled at the cost profile's own speed.
    assert engine_time_scale(time_scale) == expected
    OrchestratorSettings(engine_time_scale=engine_time_scale(time_scale))  # a valid setting
