"""Run facts and failure categories for an allure-results folder.

``environment.properties`` is how Allure shows which rig, module, kernel, host controller, payload and image a
run used. The failure categories live once, in ``report/allurerc.json``, written in the rule format that both
Allure 3 (config ``categories``) and Allure 2 (``categories.json`` in the results) read: ``name``,
``matchedStatuses`` and ``messageRegex``. Each regex is written to give the same answer under Allure 2 (Java,
whole-message match) and Allure 3 (JavaScript, search), so it either spans the message with ``[\\s\\S]*`` or
is anchored at its start with ``^``. The first rule that matches wins:

- ``Host-controller incompatibility (the module boots through another port)``: the message contains
  :data:`HOST_INCOMPATIBILITY_PHRASE` anywhere, which the matrix writes only on that evidence
  (:func:`hil.matrix.classify`).
- ``Rig (infrastructure) failures``, ``Module (product) failures``, ``Input errors (rig file, image,
  payload)``: the message starts with the fault tag ``[infrastructure]``, ``[product]`` or ``[input]``
  (after an optional ``ExceptionType: `` prefix, as allure-pytest writes it), as in
  ``[infrastructure] [usbboot.rom] the ROM did not appear on 1-1``.
- ``Unclassified failures (no fault tag)``: any other failed or broken test, such as a bare ``assert``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from hil.report.render import ALLURE_CONFIG

HOST_INCOMPATIBILITY_PHRASE = "host-controller incompatibility"


def write_environment(results: Path, props: Mapping[str, str]) -> Path:
    """Write ``props`` as ``results/environment.properties``, in the order given."""
    lines = [f"{_escape(key, is_key=True)}={_escape(value, is_key=False)}\n" for key, value in props.items()]
    return _write(results / "environment.properties", "".join(lines))


def write_categories(results: Path) -> Path:
    """Write the project's failure categories as ``results/categories.json`` for Allure 2 readers."""
    categories = json.loads(ALLURE_CONFIG.read_text(encoding="utf-8"))["categories"]
    return _write(results / "categories.json", json.dumps(categories, indent=2) + "\n")


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="ascii")
    return path


def _escape(text: str, *, is_key: bool) -> str:
    """Java ``.properties`` escaping in plain ASCII, since Allure 2 reads the file as ISO-8859-1."""
    out = []
    for position, char in enumerate(text):
        code = ord(char)
        if char in "\\\t\n\r\f":
            out.append({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r", "\f": "\\f"}[char])
        elif char in "=:#!" or (char == " " and (is_key or position == 0)):
            out.append("\\" + char)
        elif code > 0xFFFF:  # outside the BMP: a UTF-16 surrogate pair, as Java itself writes it
            high, low = divmod(code - 0x10000, 0x400)
            out.append(f"\\u{0xD800 + high:04x}\\u{0xDC00 + low:04x}")
        elif code < 0x20 or code > 0x7E:
            out.append(f"\\u{code:04x}")
        else:
            out.append(char)
    return "".join(out)
