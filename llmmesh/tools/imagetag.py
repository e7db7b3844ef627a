"""The llmmesh image tag comes from one place: pyproject's `[project] version`. The manifests name
the image untagged (`ghcr.io/llmmesh/llmmesh`) and mesh/base/kustomization.yaml's `images:`
entry sets `newTag`; this tool checks that newTag equals the package version (`make image` runs
it first), or writes it (`--write`). Stdlib only: `make image` runs it without the venv.

    python -m llmmesh.tools.imagetag [--write] [--repo ghcr.io/llmmesh/llmmesh]
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = ROOT / "pyproject.toml"
KUSTOMIZATION = ROOT / "mesh" / "base" / "kustomization.yaml"
IMAGE_REPO = "ghcr.io/llmmesh/llmmesh"


def package_version(pyproject: Path = PYPROJECT) -> str:
    version = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]["version"]
    if not isinstance(version, str):
        raise TypeError(f"{pyproject}: [project] version is not a string")
    return version


def _entry(text: str, repo: str) -> re.Match[str]:
    """The `newTag:` line of the `images:` entry `- name: <repo>` (the next key lines of it)."""
    pattern = (
        rf"(?m)^- name: {re.escape(repo)}\s*\n(?:  (?!newTag:)\S.*\n)*"
        r"  newTag: (?P<tag>\S+)[ \t]*$"
    )
    match = re.search(pattern, text)
    if match is None:
        raise ValueError(f"no `images:` entry for {repo} with a newTag")
    return match


def kustomize_tag(repo: str = IMAGE_REPO, kustomization: Path = KUSTOMIZATION) -> str:
    return _entry(kustomization.read_text(encoding="utf-8"), repo).group("tag").strip("\"'")


def write_tag(tag: str, repo: str = IMAGE_REPO, kustomization: Path = KUSTOMIZATION) -> None:
    text = kustomization.read_text(encoding="utf-8")
    match = _entry(text, repo)
    start, end = match.span("tag")
    kustomization.write_text(text[:start] + tag + text[end:], encoding="utf-8")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmmesh.tools.imagetag")
    parser.add_argument("--repo", default=IMAGE_REPO)
    parser.add_argument("--write", action="store_true", help="set newTag to the package version")
    args = parser.parse_args(argv)
    version = package_version()
    if args.write:
        write_tag(version, args.repo)
    tag = kustomize_tag(args.repo)
    rel = KUSTOMIZATION.relative_to(ROOT)
    if tag != version:
        print(
            f"{rel}: image {args.repo} newTag {tag} != package version {version} "
            "(pyproject.toml); fix: python -m llmmesh.tools.imagetag --write",
            file=sys.stderr,
        )
        return 1
    print(f"image tag {args.repo}:{tag} (package version; {rel})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
