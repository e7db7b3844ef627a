"""Fixtures for the mesh/ tests: render each target once per session, load the schemas once."""

from __future__ import annotations

import pytest

from llmmesh.tools.meshcheck.common import TARGETS, Doc, MeshSetupError, target_dir
from llmmesh.tools.meshcheck.project import ComponentSettings
from llmmesh.tools.meshcheck.render import render, shared_dir
from llmmesh.tools.meshcheck.runner import settings_facts
from llmmesh.tools.meshcheck.schemas import SchemaValidator, schema_validator


@pytest.fixture(scope="session")
def validator() -> SchemaValidator:
    try:
        return schema_validator(shared_dir())
    except MeshSetupError as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="session")
def rendered() -> dict[str, list[Doc]]:
    """Render target (overlay name, or "base") -> rendered documents."""
    try:
        return {target: render(target_dir(target)) for target in TARGETS}
    except MeshSetupError as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="session")
def settings() -> dict[str, ComponentSettings]:
    return settings_facts()[0]
