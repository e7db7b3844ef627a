"""Run every check over a mesh/ directory: render each target with kustomize, validate every
document against the schemas, and apply the rules to each overlay."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from llmmesh.common.components import COMPONENTS
from llmmesh.tools.meshcheck.common import MESH, OVERLAYS, TARGETS, RenderError, target_dir
from llmmesh.tools.meshcheck.index import Mesh
from llmmesh.tools.meshcheck.project import ComponentSettings, component_settings
from llmmesh.tools.meshcheck.render import render, shared_dir
from llmmesh.tools.meshcheck.rules import RULES, SETTINGS_RULES
from llmmesh.tools.meshcheck.schemas import schema_validator, validate_all


@dataclass(frozen=True, order=True)
class Problem:
    """One finding: the render target (overlay or base), the check that found it, and what."""

    target: str
    check: str
    message: str

    def __str__(self) -> str:
        return f"{self.target}: {self.check}: {self.message}"


@dataclass
class Report:
    problems: list[Problem] = field(default_factory=list)
    documents: dict[str, int] = field(default_factory=dict)  # target -> rendered documents
    settings_sources: dict[str, str] = field(default_factory=dict)  # component -> where from
    unevaluated_cel_rules: set[str] = field(default_factory=set)


def settings_facts() -> tuple[dict[str, ComponentSettings], dict[str, str]]:
    """Each component's settings facts, and where they came from (settings class or docs)."""
    facts = {c.name: component_settings(c) for c in COMPONENTS}
    return {k: f for k, (f, _) in facts.items()}, {k: src for k, (_, src) in facts.items()}


def apply_rules(target: str, mesh: Mesh, settings: dict[str, ComponentSettings]) -> list[Problem]:
    """Every rule on one overlay. A rule that cannot evaluate the overlay at all (an object or a
    field it reads is missing) reports that as its finding."""
    checks: list[tuple[str, Callable[[], list[str]]]] = [
        *((name, partial(rule, mesh)) for name, rule in RULES.items()),
        *((name, partial(rule, mesh, settings)) for name, rule in SETTINGS_RULES.items()),
    ]
    problems: list[Problem] = []
    for name, run in checks:
        try:
            found = run()
        except Exception as exc:
            found = [f"cannot evaluate this overlay: {type(exc).__name__}: {exc}"]
        problems.extend(Problem(target, name, message) for message in found)
    return problems


def check(
    shared: Path | None = None, root: Path = MESH, targets: Sequence[str] = TARGETS
) -> Report:
    """All findings for `targets` of the mesh/ directory `root`. Raises MeshSetupError when
    kubectl or the schemas are missing."""
    validator = schema_validator(shared_dir(shared))
    settings, sources = settings_facts()
    report = Report(settings_sources=sources)
    for target in targets:
        try:
            docs = render(target_dir(target, root))
        except RenderError as exc:
            report.problems.append(Problem(target, "render", str(exc)))
            continue
        report.documents[target] = len(docs)
        report.problems.extend(
            Problem(target, "schema", str(f)) for f in validate_all(validator, docs)
        )
        if target in OVERLAYS:
            report.problems.extend(apply_rules(target, Mesh(docs, root), settings))
    report.unevaluated_cel_rules = set(validator.unevaluated_cel_rules)
    return report
