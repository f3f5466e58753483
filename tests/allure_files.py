"""Reading an allure-results folder in tests: what allure-pytest wrote, as the report's reader will see it."""

from __future__ import annotations

import json
from pathlib import Path


def global_attachment(results: Path, name: str) -> str:
    """The text of a global attachment (the report's "Global Attachments" tab) in a results folder."""
    for path in results.glob("*-globals.json"):
        for attachment in json.loads(path.read_text()).get("attachments", []):
            if attachment["name"] == name:
                return (results / attachment["source"]).read_text()
    raise AssertionError(f"no global attachment {name!r} in {results}")
