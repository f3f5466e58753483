"""Error taxonomy shared by every stage.

Each failure says *where* it happened (a stage name such as ``usbboot.rom`` or ``console.login``) and
*whose fault* it looks like, so that reports, retries and exit codes can tell a flaky rig from a broken
module or image (LAVA's infrastructure/job/test split, reduced to what a rig needs).
"""

from __future__ import annotations

import enum
from typing import Any


class Fault(enum.Enum):
    """Who is to blame: the rig, host or cable (infrastructure), or the module or image (product)."""

    INFRASTRUCTURE = "infrastructure"
    PRODUCT = "product"
    INPUT = "input"  # the user's own files or arguments: fix them and run again


class ExitCode(enum.IntEnum):
    OK = 0
    INPUT = 2
    INFRASTRUCTURE = 3
    PRODUCT = 4


class HilError(Exception):
    """Base of every error the framework raises on purpose."""

    fault: Fault = Fault.INFRASTRUCTURE

    def __init__(self, message: str, *, stage: str = "", fault: Fault | None = None, **evidence: Any):
        super().__init__(message)
        self.message = message
        self.stage = stage
        if fault is not None:
            self.fault = fault
        self.evidence: dict[str, Any] = evidence

    @property
    def exit_code(self) -> ExitCode:
        return {
            Fault.INPUT: ExitCode.INPUT,
            Fault.INFRASTRUCTURE: ExitCode.INFRASTRUCTURE,
            Fault.PRODUCT: ExitCode.PRODUCT,
        }[self.fault]

    def __str__(self) -> str:
        where = f"[{self.stage}] " if self.stage else ""
        return f"{where}{self.message}"


class InputError(HilError):
    """Bad input from the user: a broken rig file, image, payload folder or argument."""

    fault = Fault.INPUT


class RigFileError(InputError):
    """A rig file that cannot be used. The message names the file, the key and the fix."""

    def __init__(self, path: object, key: str, problem: str, fix: str):
        where = f"{path}: {key}" if key else f"{path}"
        super().__init__(f"{where}: {problem}. Fix: {fix}", stage="rig-file", file=str(path), key=key)
        self.key = key
        self.fix = fix


class InfrastructureError(HilError):
    fault = Fault.INFRASTRUCTURE


class ProductError(HilError):
    fault = Fault.PRODUCT


class StageTimeout(HilError):
    """A device-facing step ran out of time. Whose fault it is depends on the stage."""
