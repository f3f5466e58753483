"""What installing the project claims: ``hil`` and its plugin under ``hil.fixtures``, never the top-level import
name ``fixtures`` (another distribution on the package index owns it), while the source stays in ``fixtures/``."""

from __future__ import annotations

import ast
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

from tests.hilrun import hil

REPO = Path(__file__).resolve().parent.parent


def _python(code: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, check=False,
                          timeout=60)


def test_installed_project_does_not_claim_the_name_fixtures(tmp_path: Path) -> None:
    gone = _python("import fixtures", tmp_path)
    assert gone.returncode != 0 and "No module named 'fixtures'" in gone.stderr
    found = _python("import hil.fixtures.plugin as p; print(p.__file__)", tmp_path)
    assert found.returncode == 0, found.stderr
    assert Path(found.stdout.strip()) == REPO / "fixtures" / "plugin.py"


def test_pytest_loads_the_plugin_by_its_installed_name() -> None:
    plugins = {e.name: e.value for e in entry_points(group="pytest11") if e.value.startswith(("hil", "fixtures"))}
    assert plugins == {"hil.fixtures.plugin": "hil.fixtures.plugin"}


def test_every_package_under_hil_is_installed() -> None:
    """setup.py lists packages by finding them; a folder without __init__.py would be left out of a wheel."""
    for folder in (REPO / "hil").rglob("*"):
        if folder.is_dir() and folder.name != "__pycache__" and any(folder.glob("*.py")):
            assert (folder / "__init__.py").exists(), f"{folder} has modules but no __init__.py"
    tree = ast.parse((REPO / "setup.py").read_text())
    mapped = [kw for node in ast.walk(tree) if isinstance(node, ast.Call) for kw in node.keywords
              if kw.arg == "package_dir"]
    assert mapped and ast.literal_eval(mapped[0].value) == {"hil.fixtures": "fixtures"}


def test_version() -> None:
    done = hil("--version", timeout=60)
    assert done.returncode == 0
    assert done.stdout.split()[0] == "hil" and done.stdout.split()[1][0].isdigit()
