"""The plugin's options, option fixtures, markers and skips, seen from a pytest run (no rig is brought up)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

PLUGIN = ("-p", "hil.fixtures.plugin", "-p", "no:cacheprovider")

SHOW = """
import pytest

def test_show(rig, image, payload, stage_timeouts):
    print(f"RIG {rig.name} {rig.model.name} image={image} payload={payload} "
          f"login={rig.timeouts['login']} stage={stage_timeouts}")
"""


def run(pytester: pytest.Pytester, *args: str | Path) -> pytest.RunResult:
    return pytester.runpytest(*PLUGIN, "-s", *map(str, args))


def test_every_test_runs_once_per_rig_with_the_rig_as_its_id(pytester: pytest.Pytester,
                                                             make_rig: Callable[..., Path]) -> None:
    pytester.makepyfile(SHOW)
    result = run(pytester, "--rig", make_rig("plug-a", "cm4"), "--rig", make_rig("plug-b", "cm1"), "-v")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["rigs: plug-a (cm4, virtual), plug-b (cm1, virtual)",
                                 "*::test_show?plug-a? RIG plug-a cm4 *", "*::test_show?plug-b? RIG plug-b cm1 *"])


def test_image_and_payload_per_model_and_for_every_model(pytester: pytest.Pytester, make_rig: Callable[..., Path],
                                                        tmp_path: Path) -> None:
    pytester.makepyfile(SHOW)
    cm4_image, any_image, payload = tmp_path / "cm4.img", tmp_path / "any.img", tmp_path / "payload"
    cm4_image.write_bytes(b"4")
    any_image.write_bytes(b"*")
    payload.mkdir()
    result = run(pytester, "--rig", make_rig("plug-a", "cm4"), "--rig", make_rig("plug-b", "cm1"),
                 "--image", f"cm4={cm4_image}", "--image", any_image, "--payload", payload)
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines([f"*RIG plug-a cm4 image={cm4_image} payload={payload} *",
                                 f"*RIG plug-b cm1 image={any_image} payload={payload} *"])


def test_stage_timeouts_are_laid_over_the_rig_file(pytester: pytest.Pytester, make_rig: Callable[..., Path]) -> None:
    pytester.makepyfile(SHOW)
    result = run(pytester, "--rig", make_rig("plug-a"), "--stage-timeout", "login=7.5")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*RIG plug-a cm4 image=None payload=None login=7.5 stage={'login': 7.5}"])


def test_a_test_parametrizes_the_option_fixtures(pytester: pytest.Pytester, make_rig: Callable[..., Path]) -> None:
    pinned = make_rig("plug-pinned", "cm5")
    pytester.makepyfile(f"""
        import pytest

        @pytest.mark.parametrize("rig_file", [{str(pinned)!r}])
        def test_pinned(rig):
            assert rig.name == "plug-pinned"

        @pytest.mark.parametrize("stage_timeouts", [{{"login": 1.0}}, {{"login": 2.0}}])
        def test_timeouts(rig, stage_timeouts):
            assert rig.timeouts["login"] == stage_timeouts["login"]

        @pytest.mark.parametrize("image", ["/somewhere/custom.img"])
        def test_image(image):
            assert image == "/somewhere/custom.img"
    """)
    result = run(pytester, "--rig", make_rig("plug-a"), "-v")
    result.assert_outcomes(passed=4)
    result.stdout.fnmatch_lines(["*::test_pinned?* PASSED*"])
    assert "test_pinned[plug-a" not in result.stdout.str()


def test_markers_skip_rigs_that_lack_the_model_or_the_wiring(pytester: pytest.Pytester,
                                                             make_rig: Callable[..., Path]) -> None:
    pytester.makepyfile("""
        import pytest

        @pytest.mark.models("cm4", "cm5")
        def test_new_modules(rig):
            pass

        @pytest.mark.needs("eeprom_nwp")
        def test_write_protect(rig):
            pass

        def test_any(rig):
            pass
    """)
    cm1 = make_rig("plug-b", "cm1")
    result = run(pytester, "--rig", make_rig("plug-a", "cm4"), "--rig", cm1, "-rs")
    result.assert_outcomes(passed=4, skipped=2)
    result.stdout.fnmatch_lines([
        "SKIPPED * rig plug-b has a cm1; this test runs on cm4 or cm5 only",
        f"SKIPPED * rig plug-b does not wire EEPROM_nWP (needs eeprom_nwp). "
        f"Fix: add ?relays.eeprom_nwp? to {cm1}",
    ])


def test_without_a_rig_rig_tests_are_skipped_and_others_run(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("""
        def test_on_a_rig(rig):
            pass

        def test_plain():
            pass
    """)
    result = run(pytester, "-rs")
    result.assert_outcomes(passed=1, skipped=1)
    result.stdout.fnmatch_lines(["SKIPPED*no rig: run with --rig RIG.toml*"])


@pytest.mark.parametrize(("args", "message"), [
    (("--stage-timeout", "logn=3"), "--stage-timeout logn=3: write STAGE=SECONDS*"),
    (("--image", "/no/such.img"), "*--image /no/such.img: /no/such.img does not exist*"),
    (("--image", "{rig}", "--image", "{rig}"), "*--image is given twice for every model*"),
])
def test_bad_options_stop_the_run_with_the_fix(pytester: pytest.Pytester, make_rig: Callable[..., Path],
                                               args: tuple[str, ...], message: str) -> None:
    rig = make_rig("plug-a")
    result = run(pytester, "--rig", rig, *(a.format(rig=rig) for a in args))
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"*{message}"])


def test_a_broken_rig_file_or_two_rigs_of_one_name_stop_the_run(pytester: pytest.Pytester,
                                                                make_rig: Callable[..., Path],
                                                                tmp_path: Path) -> None:
    broken = tmp_path / "broken.toml"
    broken.write_text('name = "x"\nmodel = "cm9"\n')
    result = run(pytester, "--rig", broken)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*broken.toml: model: unknown module model 'cm9'*Fix: *"])
    twin = tmp_path / "other" / "plug-a.toml"
    twin.parent.mkdir()
    twin.write_text(make_rig("plug-a").read_text())
    result = run(pytester, "--rig", make_rig("plug-a"), "--rig", twin)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*are both called 'plug-a'*"])


def test_unknown_marker_names_stop_the_run(pytester: pytest.Pytester, make_rig: Callable[..., Path]) -> None:
    pytester.makepyfile("""
        import pytest

        @pytest.mark.needs("eeprom_nwp", "flux_capacitor")
        def test_x(rig):
            pass
    """)
    result = run(pytester, "--rig", make_rig("plug-a"))
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*@pytest.mark.needs('flux_capacitor') names nothing known*"])


def test_several_rigs_group_each_rigs_tests_with_self_checks_first(pytester: pytest.Pytester,
                                                                   make_rig: Callable[..., Path]) -> None:
    pytester.makepyfile(test_a="""
        def test_flash(rig):
            pass
    """, test_b="""
        import pytest

        def test_plain():
            pass

        @pytest.mark.selfcheck
        def test_relays(rig):
            pass
    """)
    result = run(pytester, "--rig", make_rig("plug-a"), "--rig", make_rig("plug-b", "cm3"), "--collect-only", "-q")
    lines = [line.rsplit("/", 1)[-1] for line in result.stdout.lines if "::" in line]
    assert lines == ["test_b.py::test_plain", "test_b.py::test_relays[plug-a]", "test_a.py::test_flash[plug-a]",
                     "test_b.py::test_relays[plug-b]", "test_a.py::test_flash[plug-b]"]
