"""``hil lab run``: the nightly on every place matching tags, on the controllers that hold the rigs, in parallel;
then one Allure report of all of them, with history.

Each place's nightly is an ordinary ``hil nightly --rig RIG_FILE`` on its controller, so it takes the rig's own
lock (the labgrid place, when the rig file says so) in the name of this CI job: the lab run adds no lock of its
own. Every result is labelled with its rig, controller and site before the results are merged.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from hil.errors import ExitCode, InputError
from hil.lab.controllers import Controller
from hil.lab.coordinator import STAGE, Coordinator, Holder, PlaceView
from hil.nightly import Outcome, read_outcome, reports_root
from hil.report import render_report


@dataclass
class PlaceRun:
    place: str
    rig: str
    controller: str
    site: str
    report: Path
    exit_code: int
    seconds: float


@dataclass
class LabRun:
    report: Path  # html/ (the merged report), CONTROLLER/PLACE/ (each nightly's own), their logs
    index: Path | None
    runs: list[PlaceRun]
    outcome: Outcome

    @property
    def exit_code(self) -> int:
        return max([r.exit_code for r in self.runs] + [int(self.outcome.exit_code)], default=0)


def matching_places(lab: Coordinator, tags: Mapping[str, str]) -> list[PlaceView]:
    """The online places with these tags that stand for a rig; none is a mistake in the tags."""
    views = [v for v in lab.places().values() if v.matches(tags) and v.rig]
    online = [v for v in views if v.available]
    if not online:
        offline = ", ".join(v.name for v in views)
        raise InputError(f"no online place matches {' '.join(f'{k}={v}' for k, v in tags.items()) or '(any)'}"
                         + (f" ({offline}: exporter offline)" if offline else "")
                         + ". Fix: check the tags with `hil lab list`, and that the controllers run `hil lab serve`",
                         stage=STAGE)
    return sorted(online, key=lambda v: v.name)


def _put(controller: Controller, item: str) -> str:
    """``[MODEL=]IMAGE`` with IMAGE's path on the controller."""
    model, eq, path = item.rpartition("=")
    return f"{model}{eq}{controller.put_image(Path(path))}"


def label_results(results: Path, labels: Mapping[str, str]) -> int:
    """Add ``labels`` (controller, site) to every result in ``results``; returns how many results."""
    count = 0
    for path in results.glob("*-result.json"):
        data = json.loads(path.read_text(encoding="utf-8"))
        have = {label.get("name") for label in data.get("labels", [])}
        data.setdefault("labels", []).extend({"name": k, "value": v} for k, v in labels.items() if k not in have)
        path.write_text(json.dumps(data), encoding="utf-8")
        count += 1
    return count


def run_lab(address: str, tags: Mapping[str, str], *, allow_remote: bool = False, report_dir: Path | None = None,
            history: Path | None = None, single_file: bool = False, images: Sequence[str] = (),
            extra: Sequence[str] = ()) -> LabRun:
    with Coordinator(address, allow_remote=allow_remote) as lab:
        places = matching_places(lab, tags)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    root = (report_dir or reports_root() / "lab" / stamp).resolve()
    root.mkdir(parents=True, exist_ok=True)
    job = Holder.this_process().job
    controllers = {c.name: c for c in (Controller.of(v) for v in places)}
    # each image travels once per controller, before any run starts
    images_on = {name: [_put(c, item) for item in images] for name, c in controllers.items()}

    def run_one(view: PlaceView) -> PlaceRun:
        controller = controllers[str(view.rig["controller"])]
        local = root / controller.name / view.name
        there = local if controller.is_here else f"{controller.reports}/lab-runs/{stamp}/{view.name}"
        args = ["nightly", "--rig", str(view.rig["rig_file"]), "--report-dir", str(there), "--no-history"]
        for item in images_on[controller.name]:
            args += ["--image", item]
        command = controller.hil(*args, *(["--", *extra] if extra else []),
                                 env={"HIL_HOLDER": job, "HIL_LAB_COORDINATOR": address})
        started = time.monotonic()
        with open(root / f"{controller.name}-{view.name}.log", "w", encoding="utf-8") as out:
            code = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, check=False,
                                  env={**os.environ, "HIL_HOLDER": job, "HIL_LAB_COORDINATOR": address}).returncode
        if code not in (0, 2, 3, 4):  # killed, or ssh failed (255): the controller's fault, not the module's
            code = int(ExitCode.INFRASTRUCTURE)
        if not controller.is_here:
            controller.fetch(str(there), local)
        return PlaceRun(view.name, str(view.rig.get("rig", view.name)), controller.name,
                        str(view.rig.get("site", "")), local, code, time.monotonic() - started)

    with ThreadPoolExecutor(max_workers=len(places)) as pool:
        runs = list(pool.map(run_one, places))
    folders = []
    outcome = Outcome()
    for run in runs:
        results = run.report / "allure-results"
        if results.is_dir() and label_results(results, {"controller": run.controller, "site": run.site or "-",
                                                         "place": run.place}):
            folders.append(results)
            part = read_outcome(results)
            outcome.statuses.update(part.statuses)
            outcome.by_rig.update(part.by_rig)
            outcome.faults.extend(part.faults)
    index = None
    if folders:
        index = render_report(folders, root / "html", single_file=single_file,
                              history=history or root.parent / "history.jsonl",
                              name=f"cm-hil lab: {', '.join(sorted({r.controller for r in runs}))}")
    return LabRun(root, index, runs, outcome)


def summary(result: LabRun) -> str:
    lines = [f"{r.place:<16} {r.controller:<12} {r.site or '-':<10} exit {r.exit_code}  {r.seconds:.1f} s"
             for r in result.runs]
    return "\n".join([*lines, result.outcome.summary()])
