"""CLI: `python -m llmmesh.tools.meshcheck [--shared PATH] [--mesh DIR] [--target NAME ...]`.

Prints one line per finding on stdout and a summary on stderr. Exit status: 0 no findings,
1 findings, 2 a prerequisite (kubectl, shared/schemas) is missing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from llmmesh.tools.meshcheck.common import DEFAULT_SHARED, MESH, TARGETS, MeshSetupError
from llmmesh.tools.meshcheck.rules import RULES, SETTINGS_RULES
from llmmesh.tools.meshcheck.runner import check


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m llmmesh.tools.meshcheck",
        description=(
            "Lint the Kubernetes/Istio manifests under mesh/: render the overlays and the base "
            "with `kubectl kustomize` ($LLMMESH_KUBECTL, the venv's kubectl or PATH's), validate "
            "every document against the Kubernetes 1.32 and Istio 1.30 schemas, and check that "
            "the manifests agree with each other, with the services' settings, protos/, "
            "docs/conventions.md and llmmesh.common.metric_names. Rules: "
            + ", ".join([*RULES, *SETTINGS_RULES])
            + ". Exit status: 0 no findings, 1 findings, 2 kubectl or the schemas are missing."
        ),
    )
    p.add_argument(
        "--shared",
        type=Path,
        help=f"directory holding schemas/{{kubernetes,istio}} (default: {DEFAULT_SHARED})",
    )
    p.add_argument(
        "--mesh",
        type=Path,
        default=MESH,
        help="the mesh/ directory to check (default: %(default)s)",
    )
    p.add_argument(
        "--target",
        action="append",
        choices=TARGETS,
        help="render and check only this target (repeatable; default: all of them)",
    )
    p.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="also say what was rendered and where the settings facts came from",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        report = check(args.shared, args.mesh.resolve(), tuple(args.target or TARGETS))
    except MeshSetupError as exc:
        print(f"meshcheck: {exc}", file=sys.stderr)
        return 2
    for problem in sorted(report.problems):
        print(problem)
    if args.verbose:
        for target, count in report.documents.items():
            print(f"meshcheck: {target}: {count} documents rendered", file=sys.stderr)
        for component, source in report.settings_sources.items():
            print(f"meshcheck: {component} settings from {source}", file=sys.stderr)
        for rule in sorted(report.unevaluated_cel_rules):
            print(f"meshcheck: CEL rule not evaluated: {rule}", file=sys.stderr)
    checked = ", ".join(report.documents) or "nothing"
    print(f"meshcheck: {len(report.problems)} findings (rendered: {checked})", file=sys.stderr)
    return 1 if report.problems else 0


if __name__ == "__main__":
    sys.exit(main())
