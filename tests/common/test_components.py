"""The component catalogue agrees with the settings classes, the protos, mesh/base and
docs/conventions.md (llmmesh.common.components)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import yaml

from llmmesh.common import metric_names
from llmmesh.common.components import COMPONENTS, KV_REGISTRY, Component, by_name
from llmmesh.common.settings import env_prefix
from llmmesh.localmesh import SERVICE_SETTINGS, default_port

ROOT = Path(__file__).resolve().parents[2]
BASE = ROOT / "mesh" / "base"


def manifests(path: Path) -> list[dict[str, object]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if isinstance(d, dict)]


def named(docs: list[dict[str, object]], kind: str) -> set[str]:
    out = set()
    for d in docs:
        meta = d.get("metadata")
        if d.get("kind") == kind and isinstance(meta, dict):
            out.add(str(meta.get("name")))
    return out


def conventions_row(c: Component) -> list[str]:
    for line in (ROOT / "docs" / "conventions.md").read_text().splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == c.name:
            return cells
    raise AssertionError(f"docs/conventions.md has no table row for {c.name}")


def test_kv_registry_is_spelled_per_context() -> None:
    assert KV_REGISTRY.module == "services.kv_registry"
    assert KV_REGISTRY.env_prefix == "LLMMESH_KV_REGISTRY_"
    assert KV_REGISTRY.proto_package == "llmmesh.kvregistry.v1"
    assert KV_REGISTRY.grpc_service == "llmmesh.kvregistry.v1.KvRegistryService"
    assert KV_REGISTRY.k8s_object == "llmmesh-kv-registry"
    assert by_name("kv_registry") is KV_REGISTRY
    with pytest.raises(KeyError, match="kv-registry"):
        by_name("kv-registry")


def test_every_service_package_is_catalogued_once() -> None:
    packages = {p.name for p in (ROOT / "services").iterdir() if (p / "__main__.py").is_file()}
    assert sorted(c.name for c in COMPONENTS) == sorted(packages)
    assert set(SERVICE_SETTINGS) == set(COMPONENTS)


@pytest.mark.parametrize("c", COMPONENTS, ids=lambda c: c.name)
def test_catalogue_matches_code_protos_and_manifests(c: Component) -> None:
    assert importlib.util.find_spec(f"{c.module}.__main__") is not None
    assert env_prefix(SERVICE_SETTINGS[c]) == c.env_prefix
    settings_class = SERVICE_SETTINGS[c]
    assert (settings_class.__module__, settings_class.__name__) == (
        f"{c.module}.settings",
        c.settings_class,
    )
    proto = c.proto_package.split(".")[1]
    assert (ROOT / "protos" / "llmmesh" / proto / "v1").is_dir()
    assert c.k8s_object in named(manifests(BASE / f"{c.k8s_name}.yaml"), "Service")
    assert c.k8s_object in named(manifests(BASE / "serviceaccounts.yaml"), "ServiceAccount")


@pytest.mark.parametrize("c", COMPONENTS, ids=lambda c: c.name)
def test_conventions_table_states_the_catalogue_and_settings_defaults(c: Component) -> None:
    cells = conventions_row(c)
    entry, prefix, k8s, proto, grpc, http, metrics = cells[1:8]
    assert entry == f"`python -m {c.module}`"
    assert prefix == f"`{c.env_prefix}`"
    assert k8s == f"`{c.k8s_name}`"
    assert proto == f"`{c.proto_package}`"
    assert grpc == str(default_port(c))
    assert metrics == str(default_port(c, "metrics_port"))
    if "http_port" in SERVICE_SETTINGS[c].model_fields:
        assert http.startswith(str(default_port(c, "http_port")))
    else:
        assert http == "\N{EN DASH}"


def test_every_llmmesh_metric_is_named_after_its_component() -> None:
    names = [v for k, v in vars(metric_names).items() if k.isupper() and isinstance(v, str)]
    ours = [n for n in names if n.startswith("llmmesh_")]
    assert ours  # the module's names were found
    for name in ours:
        assert any(name.startswith(c.metric_prefix) for c in COMPONENTS), name


def test_every_metric_name_is_documented_in_the_conventions() -> None:
    """docs/conventions.md lists every metric the code exports (one home for the names:
    llmmesh.common.metric_names), so dashboards and alerts are written against documented
    series."""
    doc = (ROOT / "docs" / "conventions.md").read_text()
    names = {
        v
        for k, v in vars(metric_names).items()
        if k.isupper() and isinstance(v, str) and v.startswith(("llmmesh_", "nv_"))
    }
    assert names, "no metric names found"
    assert sorted(n for n in names if n not in doc) == []
