"""Where the manifests live, what a finding is, and the small helpers every part of meshcheck uses."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

REPO = Path(__file__).resolve().parents[3]
MESH = REPO / "mesh"
# The schemas live in shared/ beside the repository (CI clones the repo with shared/ next to it).
DEFAULT_SHARED = REPO.parent / "shared"
OVERLAYS = ("dev", "prod")
# Everything meshcheck renders: the overlays, and the base on its own.
TARGETS = (*OVERLAYS, "base")
NAMESPACE = "llmmesh"
CLUSTER_DOMAIN = "svc.cluster.local"
TRUST_DOMAIN = "cluster.local"

Doc = dict[str, Any]
T = TypeVar("T")


class MeshSetupError(RuntimeError):
    """A prerequisite of meshcheck (shared/schemas, kubectl) is missing."""


class RenderError(RuntimeError):
    """`kubectl kustomize` rejected a kustomization; the message carries kubectl's."""


class MissingObject(LookupError):
    """A rule needs an object (a Deployment, a ConfigMap) that the rendered overlay lacks."""


def require(value: T | None, what: str) -> T:
    """`value`, or MissingObject naming `what` when it is None."""
    if value is None:
        raise MissingObject(f"{what} is missing")
    return value


def target_dir(target: str, root: Path = MESH) -> Path:
    """The kustomization of a render target (an overlay name, or "base") under mesh/ `root`."""
    return root / target if target == "base" else root / "overlays" / target


def doc_id(doc: Mapping[str, Any]) -> str:
    meta = doc.get("metadata") or {}
    ns = meta.get("namespace")
    name = meta.get("name", "<unnamed>")
    where = f"{ns}/{name}" if ns else str(name)
    return f"{doc.get('kind', '<no kind>')} {where} ({doc.get('apiVersion', '<no apiVersion>')})"


def json_path(parts: Iterable[Any]) -> str:
    out = "$"
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else f".{p}"
    return out


@dataclass(frozen=True, order=True)
class Finding:
    """A schema violation: the document, the JSON path in it, and what is wrong."""

    document: str
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.document}: {self.path}: {self.message}"


# Go durations (Istio's duration fields, Envoy timeouts).
_GO_DURATION = re.compile(r"^(?:(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h))+$")
_GO_UNITS_MS = {"ns": 1e-6, "us": 1e-3, "µs": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


def go_duration_ms(value: str) -> float | None:
    """A Go duration in milliseconds; None when `value` is not one."""
    if not _GO_DURATION.match(value):
        return None
    return sum(
        float(n) * _GO_UNITS_MS[u]
        for n, u in re.findall(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)", value)
    )
