"""The image: its tag comes from one place (the package version), its requirements are the
services' base dependencies only, and the Containerfile keeps its promises (multi-stage, the
official Python 3.11 slim base by default, non-root, OCI labels). `make image-test` runs it."""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from llmmesh.tools.image_requirements import IMAGE_EXCLUDES, image_requirements, requirement_name
from llmmesh.tools.imagetag import (
    IMAGE_REPO,
    KUSTOMIZATION,
    kustomize_tag,
    main,
    package_version,
    write_tag,
)
from llmmesh.tools.meshcheck.common import Doc

ROOT = Path(__file__).resolve().parents[2]
CONTAINERFILE = ROOT / "Containerfile"


def containers(docs: list[Doc]) -> Iterator[tuple[str, dict[str, object]]]:
    for d in docs:
        spec = d.get("spec")
        template = spec.get("template") if isinstance(spec, dict) else None
        pod = template.get("spec") if isinstance(template, dict) else None
        if isinstance(pod, dict):
            for c in [*pod.get("containers", []), *pod.get("initContainers", [])]:
                yield f"{d['kind']}/{d['metadata']['name']}/{c['name']}", c


def test_kustomize_tag_is_the_package_version() -> None:
    assert kustomize_tag() == package_version(), (
        f"{KUSTOMIZATION}: newTag != pyproject version; run python -m llmmesh.tools.imagetag --write"
    )
    assert main([]) == 0


def test_manifests_name_the_llmmesh_image_untagged() -> None:
    """One place for the tag: no manifest under mesh/ spells it."""
    tagged = [
        f"{p.relative_to(ROOT)}:{n}"
        for p in sorted((ROOT / "mesh").rglob("*.yaml"))
        for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
        if re.search(rf"{re.escape(IMAGE_REPO)}:", line)
    ]
    assert not tagged


def test_rendered_services_run_the_package_version(rendered: dict[str, list[Doc]]) -> None:
    want = f"{IMAGE_REPO}:{package_version()}"
    for target, docs in rendered.items():
        images = {name: c["image"] for name, c in containers(docs)}
        ours = {n: i for n, i in images.items() if str(i).startswith(IMAGE_REPO)}
        assert len(ours) >= 4, f"{target}: {images}"
        assert set(ours.values()) == {want}, f"{target}: {ours}"


def test_write_tag(tmp_path: Path) -> None:
    k = tmp_path / "kustomization.yaml"
    k.write_text(
        "images:\n- name: other/image\n  newTag: 1.0\n"
        f"- name: {IMAGE_REPO}\n  newName: {IMAGE_REPO}\n  newTag: 0.0.1\nresources: []\n"
    )
    write_tag("9.9.9", kustomization=k)
    assert kustomize_tag(kustomization=k) == "9.9.9"
    assert "newTag: 1.0\n" in k.read_text()
    with pytest.raises(ValueError, match="no `images:` entry"):
        kustomize_tag("missing/image", kustomization=k)


def test_image_requirements_are_the_base_dependencies_only() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    base = {requirement_name(r) for r in project["dependencies"]}
    image = {requirement_name(r) for r in image_requirements(ROOT / "pyproject.toml")}
    assert image == base - IMAGE_EXCLUDES
    assert base >= IMAGE_EXCLUDES  # an exclusion names a real dependency
    assert "torch" not in image
    # Every requirement has its exact version in constraints.txt.
    pinned = {
        requirement_name(line)
        for line in (ROOT / "constraints.txt").read_text().splitlines()
        if "==" in line
    }
    assert image <= pinned, sorted(image - pinned)


def test_requirement_name() -> None:
    assert requirement_name("tritonclient[grpc]") == "tritonclient"
    assert requirement_name("protobuf<7") == "protobuf"
    assert requirement_name("Typing_Extensions==4") == "typing-extensions"


def _stages(text: str) -> list[str]:
    """The Containerfile's stages, each from its FROM line on."""
    return re.split(r"(?m)^(?=FROM )", text)[1:]


def test_containerfile() -> None:
    text = CONTAINERFILE.read_text()
    assert re.search(r"(?m)^ARG BASE_IMAGE=docker\.io/library/python:3\.11-slim(-bookworm)?$", text)
    builder, final = _stages(text)
    assert builder.startswith("FROM ${BASE_IMAGE} AS builder")
    assert final.startswith("FROM ${BASE_IMAGE}\n")
    assert "-c constraints.txt" in builder
    assert "--only-binary=:all:" in builder
    assert "llmmesh.tools.genprotos" in builder
    # The final stage: only the runtime venv from the builder, non-root, labelled.
    assert re.findall(r"(?m)^COPY .*$", final) == ["COPY --from=builder /opt/llmmesh /opt/llmmesh"]
    assert re.search(r"(?m)^USER 10001:10001$", final)
    for label in ("source", "version", "revision"):
        assert f"org.opencontainers.image.{label}=" in final
    assert not re.search(r"pip install|apt-get|gcc|build-essential", final)


def test_deployments_run_as_the_image_user(rendered: dict[str, list[Doc]]) -> None:
    """The image's user (Containerfile USER) is the one the pods' securityContext names."""
    for d in rendered["base"]:
        spec = d.get("spec")
        template = spec.get("template") if isinstance(spec, dict) else None
        pod = template.get("spec") if isinstance(template, dict) else None
        if not isinstance(pod, dict):
            continue
        if not any(str(c["image"]).startswith(IMAGE_REPO) for c in pod["containers"]):
            continue
        ctx = pod.get("securityContext", {})
        assert (ctx.get("runAsUser"), ctx.get("runAsGroup")) == (10001, 10001), d["metadata"]
