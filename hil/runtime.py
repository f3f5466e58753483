"""Folders and files that other local users could reach: made private, opened without following links.

A rig's lock, state file and virtual console live in a runtime folder; console logs hold a login session.
A predictable folder in a shared place (``/tmp/cm-hil-<uid>``) can be made first by another user, who
then plants symlinks named like our files and has root truncate whatever they point at. So every folder
here is created 0700 and refused when it is a link, owned by someone else or group/world-writable, and
every file is opened with ``O_NOFOLLOW`` and created 0600, then checked on the open descriptor.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from pathlib import Path

from hil.errors import InfrastructureError

STAGE = "runtime"


def default_runtime_dir() -> Path:
    """$HIL_RUNTIME_DIR; else $XDG_RUNTIME_DIR/cm-hil (systemd's private per-user folder); else /run/cm-hil
    for root; else /tmp/cm-hil-<uid>, which :func:`private_dir` refuses if another user made it first."""
    if override := os.environ.get("HIL_RUNTIME_DIR"):
        return Path(override)
    if xdg := os.environ.get("XDG_RUNTIME_DIR"):
        return Path(xdg) / "cm-hil"
    if os.geteuid() == 0:
        return Path("/run/cm-hil")
    return Path(f"/tmp/cm-hil-{os.getuid()}")


def _refuse(path: Path, why: str) -> InfrastructureError:
    return InfrastructureError(f"refusing to use {path}: {why}. Fix: remove it (or set HIL_RUNTIME_DIR to a "
                               "folder only you can write), then run again", stage=STAGE, path=str(path))


def check_private(path: Path, st: os.stat_result) -> None:
    """A folder or file of ours: not a link, owned by this user, not writable by group or others."""
    if stat.S_ISLNK(st.st_mode):
        raise _refuse(path, "it is a symbolic link")
    if st.st_uid != os.geteuid():
        raise _refuse(path, f"it is owned by uid {st.st_uid}, not by this user (uid {os.geteuid()})")
    if st.st_mode & 0o022:
        raise _refuse(path, f"it is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o})")


def private_dir(path: Path, *, base: Path | None = None) -> Path:
    """``path`` as a checked private folder, created 0700 if missing. Folders between ``base`` (itself
    checked, and created if missing with its own parents left to the user) and ``path`` are made and checked
    one by one, never following a link."""
    path = Path(path)
    if base is None:
        path.parent.mkdir(parents=True, exist_ok=True)
        chain = [path]
    else:
        rel = path.relative_to(base)
        private_dir(base)
        chain = [base / Path(*rel.parts[:i + 1]) for i in range(len(rel.parts))]
    for folder in chain:
        with contextlib.suppress(FileExistsError):
            os.mkdir(folder, 0o700)
        st = os.lstat(folder)
        check_private(folder, st)
        if not stat.S_ISDIR(st.st_mode):
            raise _refuse(folder, "it is not a folder")
    return path


def open_private(path: Path, flags: int, mode: int = 0o600) -> int:
    """``os.open`` that never follows a final symlink, creates with ``mode`` (0600) and checks what it
    opened: a regular file of ours that no one else may write."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise _refuse(Path(path), "it is a symbolic link") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _refuse(Path(path), "it is not a regular file")
        check_private(Path(path), st)
    except BaseException:
        os.close(fd)
        raise
    return fd
