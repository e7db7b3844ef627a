"""mesh/README.md states the numbers the manifests use and walks the canary rollout (meshcheck's
README rules, run on the real overlays by test_mesh_consistency.test_rule); the rules notice when
the manifests and the README drift apart."""

from __future__ import annotations

import shutil
from pathlib import Path

from llmmesh.tools.meshcheck.common import MESH, Doc
from llmmesh.tools.meshcheck.index import Mesh
from llmmesh.tools.meshcheck.rules import readme
from tests.mesh.helpers import doc, mesh_of


def test_changed_circuit_breaker_is_caught(rendered: dict[str, list[Doc]]) -> None:
    mesh = mesh_of(rendered, "prod")
    dr = doc(mesh, "DestinationRule", "triton-llama3-8b-v2-long")
    dr["spec"]["trafficPolicy"]["connectionPool"]["http"]["http2MaxRequests"] = 999
    [problem] = readme.check_circuit_breaking_table(mesh)
    assert problem.startswith("README circuit-breaking table lacks or misstates: ")
    assert "| `triton-llama3-8b-v2-long` | 128 | 999 |" in problem


def test_changed_mirror_percentage_is_caught(rendered: dict[str, list[Doc]]) -> None:
    mesh = mesh_of(rendered, "prod")
    vs = doc(mesh, "VirtualService", "llmmesh-gateway")
    for route in vs["spec"]["http"]:
        if "mirror" in route:
            route["mirrorPercentage"]["value"] = 42.5
    [problem] = readme.check_mirror_percentage(mesh)
    assert "lacks `42.5`" in problem


def test_walkthrough_gaps_and_unknown_alerts_are_caught(
    rendered: dict[str, list[Doc]], tmp_path: Path
) -> None:
    root = tmp_path / "mesh"
    root.mkdir()
    text = (MESH / readme.README).read_text()
    text = text.replace("**Roll back**", "**Revert**") + "\nSee `LlmmeshNoSuchAlert`.\n"
    (root / readme.README).write_text(text)
    shutil.copytree(MESH / "observability", root / "observability")
    problems = readme.check_walkthrough(Mesh(rendered["prod"], root))
    assert problems == [
        "README does not mention '**Roll back**'",
        "README names alert LlmmeshNoSuchAlert, which PrometheusRule llmmesh does not define",
    ]
