"""The autoscaler's configuration in mesh/ agrees with the ScaledObjects KEDA drives with it."""

from __future__ import annotations

import json

import pytest

from llmmesh.tools.meshcheck.common import OVERLAYS, Doc
from llmmesh.tools.meshcheck.index import Mesh
from llmmesh.tools.meshcheck.rules.helpers import autoscaler_env, plaintext_hosts
from services.autoscaler.actuators.contracts import PoolKey
from services.autoscaler.policy import PolicyConfig
from services.autoscaler.settings import PoolConfig

PREFIX = "LLMMESH_AUTOSCALER_"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_policy_range_covers_every_scaled_object(
    rendered: dict[str, list[Doc]], overlay: str
) -> None:
    mesh = Mesh(rendered[overlay])
    env = autoscaler_env(mesh)
    default = PolicyConfig.model_validate_json(env.get(f"{PREFIX}DEFAULT_POLICY", "{}"))
    pools = {
        p.key: p.policy or default
        for p in (PoolConfig.model_validate(x) for x in json.loads(env.get(f"{PREFIX}POOLS", "[]")))
    }
    scaled = mesh.in_namespace("ScaledObject")
    assert scaled
    for so in scaled:
        for trig in so["spec"]["triggers"]:
            md = trig["metadata"]
            policy = pools.get(PoolKey(md["pool"], md["model_version"]), default)
            lo, hi = int(so["spec"]["minReplicaCount"]), int(so["spec"]["maxReplicaCount"])
            assert policy.min_replicas <= lo, f"{so['metadata']['name']}: policy min above KEDA's"
            assert policy.max_replicas >= hi, f"{so['metadata']['name']}: policy max below KEDA's"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_orchestrator_metrics_url_names_its_metrics_port(
    rendered: dict[str, list[Doc]], overlay: str
) -> None:
    mesh = Mesh(rendered[overlay])
    urls = autoscaler_env(mesh).get(f"{PREFIX}ORCHESTRATOR_METRICS_URLS")
    assert urls is not None
    [url] = json.loads(urls)
    svc = mesh.get("Service", "llmmesh-orchestrator")
    assert svc is not None
    port = next(p["port"] for p in svc["spec"]["ports"] if p["name"] == "http-metrics")
    assert url == f"http://llmmesh-orchestrator.{mesh.namespace}.svc.cluster.local:{port}/metrics"


def test_a_render_without_the_autoscaler_dials_no_plaintext_host(
    rendered: dict[str, list[Doc]],
) -> None:
    def autoscaler(d: Doc) -> bool:
        return bool(d["kind"] == "Deployment" and d["metadata"]["name"] == "llmmesh-autoscaler")

    assert plaintext_hosts(Mesh(rendered["prod"]))  # its Prometheus, with it
    assert plaintext_hosts(Mesh([d for d in rendered["prod"] if not autoscaler(d)])) == set()
