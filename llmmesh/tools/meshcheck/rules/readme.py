"""README rules: mesh/README.md states the numbers the manifests use (circuit breaking, mirroring),
walks the canary rollout, and names only alerts that exist."""

from __future__ import annotations

import re

from llmmesh.tools.meshcheck.index import Mesh
from llmmesh.tools.meshcheck.rules.helpers import plaintext_hosts
from llmmesh.tools.meshcheck.rules.observability import alert_rules

README = "README.md"
# What the canary walkthrough ("Rolling out a model version") must mention.
WALKTHROUGH = (
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
)


def readme_text(mesh: Mesh) -> str:
    return (mesh.root / README).read_text()


def check_circuit_breaking_table(mesh: Mesh) -> list[str]:
    """Every DestinationRule has its row, with its numbers, in the circuit-breaking table (`-`
    for the HTTP limits of a plain TCP Service, which has none)."""
    text = readme_text(mesh)
    problems: list[str] = []
    external = plaintext_hosts(mesh)
    for dr in mesh.in_namespace("DestinationRule"):
        if dr["spec"]["host"] in external:
            continue  # no circuit breaking: a plain-text hop out of the namespace
        tp = dr["spec"]["trafficPolicy"]
        pool, od = tp["connectionPool"], tp["outlierDetection"]
        http = pool.get("http", {})
        cells = [
            f"`{dr['metadata']['name']}`",
            pool["tcp"]["maxConnections"],
            http.get("http2MaxRequests", "-"),
            http.get("http1MaxPendingRequests", "-"),
            od["consecutiveLocalOriginFailures"],
            od["consecutive5xxErrors"],
            od["interval"],
            od["baseEjectionTime"],
            od["maxEjectionPercent"],
        ]
        row = "| " + " | ".join(str(c) for c in cells) + " |"
        if row not in text:
            problems.append(f"README circuit-breaking table lacks or misstates: {row}")
    return problems


def check_mirror_percentage(mesh: Mesh) -> list[str]:
    """The `mirrorPercentage` row states the share this overlay mirrors."""
    rows = [
        line for line in readme_text(mesh).splitlines() if line.startswith("| `mirrorPercentage`")
    ]
    vs = mesh.get("VirtualService", "llmmesh-gateway")
    if not rows or vs is None:
        return [
            "README has no `mirrorPercentage` row, or VirtualService llmmesh-gateway is missing"
        ]
    pcts = {r["mirrorPercentage"]["value"] for r in vs["spec"]["http"] if "mirror" in r}
    if len(pcts) != 1:
        return [f"llmmesh-gateway mirrors with {len(pcts)} percentages, expected one"]
    pct = f"`{float(pcts.pop())}`"
    return [] if pct in rows[0] else [f"README `mirrorPercentage` row lacks {pct}: {rows[0]}"]


def check_walkthrough(mesh: Mesh) -> list[str]:
    """The canary walkthrough is complete and every alert it names exists."""
    text = readme_text(mesh)
    problems = [
        f"README does not mention {needle!r}" for needle in WALKTHROUGH if needle not in text
    ]
    alerts = {
        r["alert"] for g in alert_rules(mesh)["spec"]["groups"] for r in g["rules"] if "alert" in r
    }
    problems.extend(
        f"README names alert {name}, which PrometheusRule llmmesh does not define"
        for name in sorted(set(re.findall(r"`(Llmmesh\w+)`", text)))
        if name not in alerts
    )
    return problems
