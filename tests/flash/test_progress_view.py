"""The progress views without a rig: the terminal bar's redraws, its ETA and its end at every mapped byte."""

from __future__ import annotations

import io
import json

from hil.commands.progress import Bar, JsonEvents, Lines, rate_and_eta


def test_eta_is_the_time_left_at_the_pace_so_far() -> None:
    assert rate_and_eta(50_000_000, 0.25, 10.0) == (5.0, 30.0)
    assert rate_and_eta(0, None, 0.0) == (0.0, None)


def test_the_bar_redraws_in_place_and_ends_at_the_last_figures() -> None:
    out = io.StringIO()
    bar = Bar(out)
    bar.update("write", 25 * 2**20, 100 * 2**20, 2.0)
    bar.update("write", 100 * 2**20, 100 * 2**20, 8.0)  # within 0.2 s of the last draw: not drawn yet
    assert out.getvalue().count("\r") == 1 and " 25%" in out.getvalue() and "ETA 00:06" in out.getvalue()
    bar.end()  # the phase is over: its last figures drawn once more, then a new line
    last = out.getvalue().split("\r")[-1]
    assert "100%" in last and "100.0 MiB of 100.0 MiB" in last and "ETA 00:00" in last and last.endswith("\n")


def test_lines_and_events_are_whole_lines_with_the_phase() -> None:
    text, events = io.StringIO(), io.StringIO()
    Lines(text, every=5).update("verify", 10, 40, 1.0)
    JsonEvents(events, every=5).update("write", 30, None, 3.0, fraction=0.5)
    assert text.getvalue().startswith("verify") and "25%" in text.getvalue() and text.getvalue().endswith("\n")
    event = json.loads(events.getvalue())
    assert event == {"event": "progress", "phase": "write", "bytes": 30, "total": None, "fraction": 0.5,
                     "seconds": 3.0, "mbps": 0.0, "eta_seconds": 3.0}
