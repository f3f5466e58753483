"""Host-controller compatibility matrix: the module USB-boots K times through each of its rig's ports.

Failures here are data, not test failures: each attempt lands in the matrix's history (``matrix.db`` in
``HIL_REPORTS_DIR``, default ``reports``), and the table (controller x model -> passes/attempts, median seconds
per stage, over all runs) and its picture are attached. The pass/fail verdict on a port is
``test_cm1_quirk``'s. K comes from ``HIL_MATRIX_ATTEMPTS`` (default 3); parametrize ``matrix_attempts``.
"""

from __future__ import annotations

import os
from pathlib import Path

import allure
import pytest
from hil.fixtures.evidence import attach_text
from hil.fixtures.station import RigStation

from hil.control.lifecycle import Lifecycle
from hil.matrix import MatrixStore, format_table, plot, run_matrix
from hil.rig import Rig
from suites.usbboots import ReportedBoots, reports_dir, rig_cabling

pytestmark = pytest.mark.needs("nrpi_boot")


@pytest.fixture
def matrix_attempts() -> int:
    return int(os.environ.get("HIL_MATRIX_ATTEMPTS", "3"))


def test_matrix_through_every_port(station: RigStation, lifecycle: Lifecycle, rig: Rig, payload: Path | None,
                                   matrix_attempts: int) -> None:
    ports, cable = rig_cabling(rig)
    report = ReportedBoots()
    with MatrixStore(reports_dir()) as store:
        run, attempts = run_matrix(lifecycle, matrix_attempts, station.payload(payload), store, ports=ports,
                                   cable=cable, listener=report.listener, step=report.step, progress=report.progress)
        cells = store.cells(run)
    table = format_table(cells)
    picture = plot(cells, reports_dir() / f"matrix-{rig.name}.png", f"USB boot compatibility (run {run}, {rig.name})")
    attach_text("compatibility matrix", table)
    allure.attach.file(picture, name="compatibility matrix", attachment_type=allure.attachment_type.PNG)
    assert [(a.port, a.attempt) for a in attempts] == [(p, n) for p in ports for n in range(1, matrix_attempts + 1)]
    this_run = {(c.model, p) for c in cells if c.run_attempts for p in c.ports}
    assert {(rig.model.name, p) for p in ports} <= this_run
