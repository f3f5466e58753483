"""boot.conf validation: known keys per model, BOOT_ORDER read right to left, one clear error per mistake."""

from __future__ import annotations

import pytest

from hil.eeprom.bootconf import BOOT_MODES, BootOrderError, parse_boot_order, parse_bootconf
from hil.errors import ExitCode, InputError


@pytest.mark.parametrize("text, names", [
    ("0xf25641", ["SD CARD", "USB-MSD", "NVME", "BCM-USB-MSD", "NETWORK", "RESTART"]),
    ("0xf2", ["NETWORK", "RESTART"]),
    ("0xf15", ["BCM-USB-MSD", "SD CARD", "RESTART"]),
    ("0x21", ["SD CARD", "NETWORK"]),
    ("0xe1", ["SD CARD", "STOP"]),
    ("0xf3", ["RPIBOOT", "RESTART"]),
    ("0x0000F41", ["SD CARD", "USB-MSD", "RESTART"]),
])
def test_boot_order_is_read_right_to_left(text: str, names: list[str]) -> None:
    order = parse_boot_order(text, "cm4")
    assert order.names() == names and order.value == int(text, 16)
    assert order.loops is (names[-1] == "RESTART")
    assert order.reaches(0x1) is ("SD CARD" in names)


@pytest.mark.parametrize("text, problem, fix", [
    ("f41", "not a hex number", "0xf41"),
    ("241", "not a hex number", "hex nibbles"),
    ("0x", "not a hex number", "hex nibbles"),
    ("0x0", "names no boot mode", "at least one mode"),
    ("0xf91", "nibble 2 from the right (0x9) is no boot mode", "0xf RESTART"),
    ("0x1f", "RESTART (0xf), which ends the walk, so the modes left of it (0x1) are never tried", "last"),
    ("0xf1e2", "STOP (0xe)", "put STOP last"),
    ("0xf13", "RPIBOOT (0x3), which never times out", "put RPIBOOT last"),
    ("0xf", "tries no boot mode", "put boot modes right of it"),
    ("0x1111111111", "10 nibbles", "at most 8"),
])
def test_nonsense_boot_orders_name_the_problem_and_the_fix(text: str, problem: str, fix: str) -> None:
    with pytest.raises(BootOrderError) as e:
        parse_boot_order(text, "cm4")
    assert problem in e.value.problem and fix in f"{e.value.problem} {e.value.fix}"


def test_bcm_usb_msd_does_not_exist_on_a_cm5() -> None:
    assert parse_boot_order("0xf15", "cm4").modes == (0x5, 0x1, 0xF)
    with pytest.raises(BootOrderError, match="BCM-USB-MSD, which a cm5 does not have"):
        parse_boot_order("0xf15", "cm5")


def test_every_mode_has_a_name_and_meaning() -> None:
    assert sorted(BOOT_MODES) == [0, 1, 2, 3, 4, 5, 6, 7, 0xE, 0xF]
    assert all(name and meaning for name, meaning in BOOT_MODES.values())


def test_a_valid_conf_keeps_unconditional_settings_and_ignores_the_config_txt_section() -> None:
    conf = parse_bootconf("# comment\n[all]\nBOOT_UART=1\nBOOT_ORDER=0xf21\n[gpio8=0]\nBOOT_ORDER=0xf14\n"
                          "[all]\nNET_BOOT_MAX_RETRIES=-1\nTFTP_IP=192.168.1.9\n[config.txt]\ndtoverlay=anything\n",
                          "cm4")
    assert conf.boot_uart and conf.boot_order.value == 0xF21  # the [gpio8=0] one is conditional
    assert conf.settings == {"BOOT_UART": "1", "BOOT_ORDER": "0xf21", "NET_BOOT_MAX_RETRIES": "-1",
                             "TFTP_IP": "192.168.1.9"}


def test_model_sections_are_checked_for_the_model_they_select() -> None:
    """A key under [cm5] is for a CM5 even in a CM4's boot.conf (one file for both modules), and a model filter
    that selects the module being built applies to it."""
    text = "[all]\nBOOT_UART=1\n[cm5]\nPCIE_PROBE=1\nBOOT_ORDER=0xf461\n[pi4]\nBOOT_ORDER=0xf15\nVL805=1\n"
    cm4 = parse_bootconf(text, "cm4")
    assert "PCIE_PROBE" not in cm4.settings and cm4.boot_order.value == 0xF15 and cm4.settings["VL805"] == "1"
    cm5 = parse_bootconf(text.replace("VL805=1\n", ""), "cm5")
    assert cm5.settings["PCIE_PROBE"] == "1" and cm5.boot_order.value == 0xF461
    with pytest.raises(InputError, match="line 3: PCIE_PROBE: does not exist on a cm4"):
        parse_bootconf("[all]\n[cm4]\nPCIE_PROBE=1\n", "cm4")
    with pytest.raises(InputError, match="line 2: VL805: does not exist on a cm5"):
        parse_bootconf("[pi5]\nVL805=1\n", "cm4")
    with pytest.raises(InputError, match="BCM-USB-MSD, which a cm5 does not have"):
        parse_bootconf("[cm5]\nBOOT_ORDER=0xf15\n", "cm4")
    with pytest.raises(InputError, match="PCIE_PROB: is not a bootloader setting"):
        parse_bootconf("[cm5]\nPCIE_PROB=1\n", "cm4")


def test_defaults_when_unset() -> None:
    conf = parse_bootconf("", "cm5")
    assert not conf.boot_uart and conf.boot_order.value == 0xF41


@pytest.mark.parametrize("text, model, says", [
    ("BOOT_UART=1\nBOOT_ORDR=0xf41\n", "cm4", "line 2: BOOT_ORDR: is not a bootloader setting (the bootloader "
     "would silently ignore it). Fix: did you mean BOOT_ORDER?"),
    ("boot_uart=1\n", "cm4", "line 1: boot_uart: bootloader keys are upper case. Fix: write BOOT_UART"),
    ("BOOT_UART=yes\n", "cm4", "BOOT_UART: 'yes' is not one of 0, 1"),
    ("DHCP_TIMEOUT=100\n", "cm4", "DHCP_TIMEOUT: 100 is out of range (5000 or more)"),
    ("TFTP_IP=10.0.0\n", "cm4", "is not a dotted IPv4 address"),
    ("VL805=1\n", "cm5", "VL805: does not exist on a cm5 (only on cm4). Fix: remove it"),
    ("UART_BAUD=115200\n", "cm4", "UART_BAUD: does not exist on a cm4"),
    ("BOOT_ORDER=0xf81\n", "cm4", "BOOT_ORDER: nibble 2 from the right (0x8) is no boot mode"),
    ("BOOT_UART\n", "cm4", "line 1: BOOT_UART: is not KEY=VALUE"),
    ("HELLO_WORLD=1\n", "cm4", "Fix: remove it"),
])
def test_each_mistake_is_one_input_error_naming_line_key_and_fix(text: str, model: str, says: str) -> None:
    with pytest.raises(InputError) as e:
        parse_bootconf(text, model, "my.conf")
    assert says in str(e.value) and str(e.value).startswith("[eeprom.bootconf] my.conf: line")
    assert e.value.exit_code is ExitCode.INPUT and "Fix:" in str(e.value)


def test_models_without_an_eeprom_are_refused() -> None:
    with pytest.raises(InputError, match="no bootloader EEPROM"):
        parse_bootconf("BOOT_UART=1\n", "cm3")
