"""mesh/README.md states the numbers the manifests use, and walks the canary rollout."""

from __future__ import annotations

import re

from tests.mesh.meshcheck import MESH, Doc, Mesh

README = MESH / "README.md"


def _text() -> str:
    return README.read_text()


def test_circuit_breaking_table_matches_the_destination_rules(
    rendered: dict[str, list[Doc]],
) -> None:
    text = _text()
    for dr in Mesh(rendered["prod"]).in_namespace("DestinationRule"):
        tp = dr["spec"]["trafficPolicy"]
        pool, od = tp["connectionPool"], tp["outlierDetection"]
        cells = [
            f"`{dr['metadata']['name']}`",
            pool["tcp"]["maxConnections"],
            pool["http"]["http2MaxRequests"],
            pool["http"]["http1MaxPendingRequests"],
            od["consecutiveLocalOriginFailures"],
            od["consecutive5xxErrors"],
            od["interval"],
            od["baseEjectionTime"],
            od["maxEjectionPercent"],
        ]
        row = "| " + " | ".join(str(c) for c in cells) + " |"
        assert row in text, f"README circuit-breaking table lacks or misstates:\n{row}"


def test_mirror_percentages_match_the_overlays(rendered: dict[str, list[Doc]]) -> None:
    row = next(line for line in _text().splitlines() if line.startswith("| `mirrorPercentage`"))
    for overlay in ("prod", "dev"):
        vs = Mesh(rendered[overlay]).get("VirtualService", "llmmesh-gateway")
        assert vs is not None
        pcts = {r["mirrorPercentage"]["value"] for r in vs["spec"]["http"] if "mirror" in r}
        assert len(pcts) == 1
        assert f"`{float(pcts.pop())}`" in row, (overlay, row)


def test_canary_walkthrough() -> None:
    text = _text()
    for needle in (
        "kubectl apply -k mesh/overlays/prod",
        "x-llmmesh-canary: always",
        "**3. 5 % canary**",
        "**4. 25 % canary**",
        "**5. 100 %**",
        "**Roll back**",
        "Error ratio by model version",
        "Traffic share by model version",
        "Desired vs ready replicas",
        "ORIGINAL_DST",
        ":authority",
    ):
        assert needle in text, needle
    for name in re.findall(r"`(Llmmesh\w+)`", text):
        assert name in (MESH / "observability" / "prometheus" / "alert-rules.yaml").read_text(), (
            name
        )
