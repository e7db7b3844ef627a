"""The llmmesh image's runtime requirements: pyproject's `[project] dependencies` minus what the
services never import (`IMAGE_EXCLUDES`), one per line, for `pip install -c constraints.txt -r`.

The services need only the base dependencies; the `dev`, `tokenizer` and `cpu-engine` extras
(torch among them) never go into the image. `nvidia-pytriton` is a base dependency only because
it ships the tritonserver binary the local mesh and the tests start: in Kubernetes the Triton
side is NVIDIA's Triton TensorRT-LLM container, and no service imports pytriton, so the image
leaves it (~150 MB) out. Used by the Containerfile's builder stage (stdlib only: it runs before
anything is installed) and checked by tests/mesh/test_image.py.

    python -m llmmesh.tools.image_requirements pyproject.toml > requirements.txt
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

#: Base dependencies no service imports (the launchers and tests use them on the host).
IMAGE_EXCLUDES = frozenset({"nvidia-pytriton"})


def requirement_name(requirement: str) -> str:
    """The normalized project name of a PEP 508 requirement (`tritonclient[grpc]` -> tritonclient)."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    if match is None:
        raise ValueError(f"not a requirement: {requirement!r}")
    return re.sub(r"[-_.]+", "-", match.group(1)).lower()


def project(pyproject: Path) -> dict[str, object]:
    data = tomllib.loads(pyproject.read_text(encoding="utf-8"))
    table = data["project"]
    if not isinstance(table, dict):
        raise TypeError("[project] is not a table")
    return table


def image_requirements(pyproject: Path) -> list[str]:
    """`[project] dependencies` of `pyproject` without `IMAGE_EXCLUDES`, in their order."""
    deps = project(pyproject)["dependencies"]
    if not isinstance(deps, list):
        raise TypeError("[project] dependencies is not a list")
    return [str(d) for d in deps if requirement_name(str(d)) not in IMAGE_EXCLUDES]


def main(argv: list[str]) -> int:
    pyproject = Path(argv[0]) if argv else Path("pyproject.toml")
    sys.stdout.write("".join(f"{r}\n" for r in image_requirements(pyproject)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
