"""The package's layers (pyproject.toml, [tool.importlinter]): no module imports from a layer
above its own. import-linter checks the real tree, and a copy of it with one deliberate backwards
import must fail, so the contract is known to bite."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")

pytestmark = pytest.mark.skipif(not LINT.exists(), reason="import-linter is a dev dependency")


def lint(project: Path) -> subprocess.CompletedProcess:
    """lint-imports with `project`'s pyproject.toml and its src/ first on the path."""
    env = {"PYTHONPATH": str(project / "src"), "PATH": str(LINT.parent)}
    return subprocess.run(
        [str(LINT), "--no-cache"], cwd=project, env=env, capture_output=True, text=True
    )


def test_the_layers_are_kept():
    result = lint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 kept, 0 broken" in result.stdout


def test_a_backwards_import_breaks_the_contract(tmp_path):
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    shutil.copytree(ROOT / "src", tmp_path / "src", ignore=shutil.ignore_patterns("*.egg-info"))
    # the lowest layer reaching up to the command line
    text = tmp_path / "src/offroad_seg/core/text.py"
    text.write_text(text.read_text() + "\nfrom offroad_seg.cli import main  # noqa\n")
    result = lint(tmp_path)
    assert result.returncode != 0
    assert "offroad_seg.core is not allowed to import offroad_seg.cli" in result.stdout
