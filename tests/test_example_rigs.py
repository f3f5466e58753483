"""The real-rig examples that docs/real-rig.md tells people to copy stay valid rig files: everything in them
checks, apart from the serial adapter, which only exists on the controller they were written for."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.hilrun import hil

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((REPO / "rigs").glob("example-*.toml"))


def test_the_guide_names_every_example() -> None:
    guide = (REPO / "docs" / "real-rig.md").read_text()
    assert len(EXAMPLES) >= 3
    assert all(f"rigs/{e.name}" in guide for e in EXAMPLES)


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_example_rig_file_checks(example: Path, tmp_path: Path) -> None:
    device = re.findall(r'(?m)^device = "([^"]*)"', example.read_text())
    assert len(device) == 1, "an example names exactly one console device"
    text = example.read_text().replace(f'device = "{device[0]}"', 'device = "/dev/null"')
    copy = tmp_path / example.name
    copy.write_text(text)
    done = hil("rig", "check", str(copy), timeout=60)
    assert done.returncode == 0, done.stderr
    if not Path(device[0]).exists():  # not the controller it was written for: the adapter is named as missing
        as_shipped = hil("rig", "check", str(example), timeout=60)
        assert as_shipped.returncode == 2 and "console.device" in as_shipped.stderr
