from __future__ import annotations

from pathlib import Path

import pytest

from services.orchestrator.policy import Policy, PolicyError, load_policy

ROOT = Path(__file__).resolve().parents[2]


def test_defaults_without_file() -> None:
    assert load_policy(None) == Policy()


def test_mesh_policy_file_loads() -> None:
    policy = load_policy(ROOT / "mesh" / "base" / "config" / "policy.yaml")
    assert policy.pools_for(10) == ["short", "long"]
    assert policy.pools_for(5000) == ["long"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("pools: {short: {max_prompt_tokens: 0}}", "pools.short.max_prompt_tokens"),
        ("pools: {a: {max_prompt_tokens: 5}, b: {max_prompt_tokens: 5}}", "distinct"),
        ("routing: {prefix_weight: 1}", "routing"),
        ("plugins: [{name: p, type: no-such-plugin}]", "unknown plugin type"),
        ("plugins: [{name: q, type: queue-depth-scorer, params: {saturation: 0}}]", "saturation"),
        ("profiles: {x: {filters: [prefix], picker: max-score}}", "not a filter"),
        ("profiles: {x: {picker: nobody}}", "unknown plugin 'nobody'"),
        ("health: {consecutive_errors: 0}", "health.consecutive_errors"),
        ("version: 2", "version"),
        ("pools: [", "policy.yaml"),
        ("- a list", "<root>"),
    ],
)
def test_bad_policy_names_the_key(tmp_path: Path, text: str, message: str) -> None:
    f = tmp_path / "policy.yaml"
    f.write_text(text)
    with pytest.raises(PolicyError, match=message.replace(".", r"\.")):
        load_policy(f)
