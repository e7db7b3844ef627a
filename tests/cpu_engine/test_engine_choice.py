"""The local mesh picks each replica's engine from MeshOptions (default, per-pool overrides)."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmmesh.common.topology import TRITON_MODEL
from llmmesh.localmesh import ENGINE_REPOSITORIES, LocalMesh, MeshOptions


def engines(options: MeshOptions) -> list[str]:
    mesh = LocalMesh(options)
    return [mesh.replica_engine(i) for i in range(options.replicas)]


def test_tests_keep_the_emulator_by_default(tmp_path: Path) -> None:
    assert engines(MeshOptions(replicas=2, workdir=tmp_path)) == ["emulator", "emulator"]


def test_the_engine_option_applies_to_every_replica(tmp_path: Path) -> None:
    opts = MeshOptions(replicas=2, engine="smollm2", workdir=tmp_path)
    assert engines(opts) == ["smollm2", "smollm2"]


def test_pool_engines_override_per_pool(tmp_path: Path) -> None:
    opts = MeshOptions(
        replicas=3,
        replica_pools=["short", "real", "short"],
        pool_engines={"real": "smollm2"},
        workdir=tmp_path,
    )
    assert engines(opts) == ["emulator", "smollm2", "emulator"]


def test_an_override_for_an_unknown_pool_is_an_error(tmp_path: Path) -> None:
    opts = MeshOptions(replicas=1, pool_engines={"nope": "smollm2"}, workdir=tmp_path)
    with pytest.raises(ValueError, match="nope"):
        engines(opts)


def test_every_engine_has_a_model_repository() -> None:
    for name, repo in ENGINE_REPOSITORIES.items():
        assert (repo / TRITON_MODEL / "config.pbtxt").is_file(), name
