"""The one-way import contract (pyproject's [tool.importlinter]) holds, and it would catch a violation."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _lint(*, package_root: Path) -> subprocess.CompletedProcess:
    # The package under test is found through PYTHONPATH (the folder above the package root), ahead
    # of the installed one; no cache is written into the checkout.
    env = {**os.environ, "PYTHONPATH": str(package_root.parent)}
    command = [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; "
               "sys.exit(lint_imports_command())", "--no-cache", "--no-logo", str(package_root / "pyproject.toml")]
    return subprocess.run(command, cwd=package_root, env=env, capture_output=True, text=True, timeout=300)


def _copy_package(tmp_path: Path) -> Path:
    target = tmp_path / "privdiff"
    shutil.copytree(ROOT, target, ignore=shutil.ignore_patterns(
        "tests", "bench", "workflows", ".git", "*.safetensors", "*.png", "__pycache__", "node_modules"))
    return target


def test_the_layer_contract_holds_on_the_package(tmp_path):
    result = _lint(package_root=_copy_package(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 kept, 0 broken" in result.stdout


def test_the_contract_fails_on_a_planted_upward_import(tmp_path):
    package = _copy_package(tmp_path)
    # A function-level import counts as much as a module-level one: hiding it in a function is what
    # the contract exists to stop.
    (package / "training" / "planted.py").write_text(
        "def use_a_pipeline():\n    from ..pipelines.demo import DemoResult\n\n    return DemoResult\n")
    result = _lint(package_root=package)
    assert result.returncode != 0
    assert "privdiff.training is not allowed to import privdiff.pipelines" in result.stdout
    assert "privdiff.training.planted -> privdiff.pipelines.demo" in result.stdout
