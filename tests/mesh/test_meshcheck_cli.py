"""`python -m llmmesh.tools.meshcheck`: exit 0 on the repository's mesh/, 1 with the findings on a
broken copy, 2 without its prerequisites."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from llmmesh.tools.meshcheck.__main__ import main
from llmmesh.tools.meshcheck.common import MESH


def test_help_lists_the_options() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "llmmesh.tools.meshcheck", "--help"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    for option in ("--shared", "--mesh", "--target", "--verbose"):
        assert option in proc.stdout


def test_repository_mesh_is_clean(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--target", "prod"]) == 0
    out, err = capsys.readouterr()
    assert out == ""
    assert "meshcheck: 0 findings (rendered: prod)" in err


def test_broken_copy_fails_with_its_findings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "mesh"
    shutil.copytree(MESH, root)
    values = root / "base" / "triton" / "v1-long" / "pool.yaml"
    values.write_text(values.read_text().replace("minReplicas: 2", "minReplicas: 5"))
    dr = root / "base" / "istio" / "destination-rules.yaml"
    dr.write_text(re.sub(r"maxConnections:", "maxConnection:", dr.read_text(), count=1))
    assert main(["--mesh", str(root), "--target", "prod"]) == 1
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert any(
        line.startswith("prod: schema: DestinationRule llmmesh/")
        and "unknown field 'maxConnection'" in line
        for line in lines
    ), out
    # KEDA may now hold at most one replica, fewer than the autoscaler's fallback of 2.
    assert any(
        line.startswith("prod: ") and "triton-llama3-8b-v1-long" in line for line in lines
    ), out
    assert re.search(r"meshcheck: \d+ findings \(rendered: prod\)", err)


def test_render_failure_is_a_finding(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "mesh"
    shutil.copytree(MESH, root)
    (root / "base" / "triton" / "v2-short" / "pool.yaml").unlink()
    assert main(["--mesh", str(root), "--target", "base"]) == 1
    out, _err = capsys.readouterr()
    assert out.startswith("base: render: kubectl kustomize ")
    assert "v2-short" in out


def test_missing_schemas_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--shared", str(tmp_path), "--target", "base"]) == 2
    assert "schemas not found" in capsys.readouterr().err
