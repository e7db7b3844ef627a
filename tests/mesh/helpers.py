"""Helpers for tests that mutate rendered documents to check that a rule notices."""

from __future__ import annotations

import copy

from llmmesh.tools.meshcheck.common import Doc
from llmmesh.tools.meshcheck.index import Mesh


def mesh_of(rendered: dict[str, list[Doc]], overlay: str) -> Mesh:
    """A private copy of an overlay, for tests that mutate documents."""
    return Mesh(copy.deepcopy(rendered[overlay]))


def doc(mesh: Mesh, kind: str, name: str) -> Doc:
    found = mesh.get(kind, name)
    assert found is not None, f"{kind}/{name} not rendered"
    return found
