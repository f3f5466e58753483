"""What the report says about a run as a whole (hil.fixtures.runfacts): a Metadata line per rig and the host, every
fact grouped per rig, and the USB boot matrix's history of each port of the run's rigs."""

from __future__ import annotations

import re
from pathlib import Path

from hil.fixtures.runfacts import environment, facts_text, matrix_history

from hil.control.hostctl import HostController
from hil.matrix import PASS, Attempt, MatrixStore

HOST = {"host": "lab-7", "host.kernel": "Linux 6.1.0-28-arm64 aarch64", "host.python": "3.11.2"}
RIGS = {
    "zeta": {"rig.file": "rigs/zeta.toml", "module.model": "cm4 (bcm2711)", "usb.port": "1-1.3",
             "image": "/srv/images/bookworm-lite.img", "image.sha256": "ab" * 32, "image.build_id": "3f2a"},
    "alpha": {"rig.file": "rigs/alpha.toml", "module.model": "cm1 (bcm2835)", "usb.port": "3-2",
              "rig.out": "rig alpha is out of this run: its self-check failed"},
    "never": {"rig.file": "rigs/never.toml"},
}


def test_the_metadata_is_the_host_and_one_line_per_rig_in_name_order() -> None:
    assert environment(HOST, RIGS) == {
        "host": "lab-7 (Linux 6.1.0-28-arm64 aarch64, Python 3.11.2)",
        "alpha": "OUT of this run, cm1 (bcm2835), USB 3-2",
        "never": "not brought up (rigs/never.toml)",
        "zeta": "cm4 (bcm2711), USB 1-1.3, bookworm-lite.img, build-id 3f2a",
    }


def test_every_fact_is_listed_under_its_rig() -> None:
    text = facts_text(HOST, RIGS)
    sections = text.split("\n\n")
    assert [s.splitlines()[0] for s in sections] == ["host", "alpha", "never", "zeta"]
    assert re.search(r"^  image\.sha256 +(ab){32}$", sections[3], re.M), sections[3]
    assert re.search(r"^  rig\.out +rig alpha is out of this run: its self-check failed$", sections[1], re.M)


def _attempt(rig: str, port: str, ok: bool) -> Attempt:
    controller = HostController(port, "xhci_hcd", "pci", "0000:00:14.0", "8086:a36d", ())
    return Attempt(rig, "cm4", port, controller, 1, ok, PASS if ok else "infrastructure", {}, {})


def test_the_matrix_history_shows_each_ports_runs_oldest_first(tmp_path: Path) -> None:
    nights = [{"1-1.3": (True, True), "1-2": (True, True)},
              {"1-1.3": (True, True), "1-2": (True, True)},
              {"1-1.3": (False, False), "1-2": (False, True)}]
    with MatrixStore(tmp_path) as store:
        for night in nights:
            run = store.begin("zeta", 2)
            for port, outcomes in night.items():
                for ok in outcomes:
                    store.add(run, _attempt("zeta", port, ok))
        store.add(store.begin("other", 1), _attempt("other", "2-1", True))
    history = matrix_history(["alpha", "zeta"], tmp_path)
    assert history is not None
    rows = [line.split() for line in history.splitlines()[3:]]
    assert [(r[0], r[1], r[5], r[6]) for r in rows] == [("zeta", "1-1.3", "FAIL", "0/2"),
                                                        ("zeta", "1-2", "flaky", "1/2")]
    assert rows[0][-5:] == ["3", "4/6", "2/2", "2/2", "0/2"] and rows[1][-5:] == ["3", "5/6", "2/2", "2/2", "1/2"]
    assert "other" not in history and str(tmp_path / "matrix.db") in history.splitlines()[0]


def test_no_matrix_history_without_a_matrix_run_of_the_rigs(tmp_path: Path) -> None:
    assert matrix_history(["zeta"], tmp_path) is None
    assert not (tmp_path / "matrix.db").exists()  # looking made no database
    with MatrixStore(tmp_path) as store:
        store.add(store.begin("other", 1), _attempt("other", "2-1", True))
    assert matrix_history(["zeta"], tmp_path) is None
