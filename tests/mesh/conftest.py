"""Fixtures for the mesh/ manifest tests: render each overlay once per session."""

from __future__ import annotations

import pytest

from tests.mesh.meshcheck import (
    MESH,
    OVERLAYS,
    Doc,
    MeshSetupError,
    SchemaValidator,
    render,
    schema_validator,
)


@pytest.fixture(scope="session")
def validator() -> SchemaValidator:
    try:
        return schema_validator()
    except MeshSetupError as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="session")
def rendered() -> dict[str, list[Doc]]:
    """Overlay name (and "base") -> rendered documents."""
    out: dict[str, list[Doc]] = {}
    try:
        for name in OVERLAYS:
            out[name] = render(MESH / "overlays" / name)
        out["base"] = render(MESH / "base")
    except MeshSetupError as exc:
        pytest.fail(str(exc), pytrace=False)
    return out
