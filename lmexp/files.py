"""Files and folders a run writes through: a write readers never see half done, a file only its
owner reads, the writability check made before any work, and the lock that keeps two live
processes out of one run or sweep folder. Imports nothing from lmexp but the error types."""

from __future__ import annotations

import fcntl
import os
import platform
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from lmexp.config import LmexpError


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temp file in the same folder, fsync, rename: readers never see a partial file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read (it may hold a password in a database URL)."""
    path.touch(mode=0o600)
    path.chmod(0o600)  # touch's mode does not apply to a file that exists already
    path.write_text(text)


def check_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise LmexpError(
            f"Output folder {folder} is not writable ({err.strerror}); set hydra.run.dir (or "
            "hydra.sweep.dir) to a writable folder."
        ) from err


# --- one live process per folder ---------------------------------------------------------------

LOCK_FILE = ".lmexp.lock"
# In a sweep folder while its sweeper stops its local jobs: a job that has yet to start skips.
SWEEP_STOPPING = ".lmexp.stopping"
_held: dict[Path, IO[str]] = {}  # folders this process holds, kept open for its whole life


def lock_folder(folder: Path, what: str = "run") -> None:
    """Hold an exclusive lock on `folder` until `unlock_folder` or the end of this process, or
    refuse in one sentence when another live process holds it.

    flock is released by the kernel when the process ends, however it ends (SIGKILL too), so a
    folder left by a dead run is free again while one used by a live run never is.
    """
    folder = folder.resolve()
    if folder in _held:
        return
    folder.mkdir(parents=True, exist_ok=True)
    handle = open(folder / LOCK_FILE, "a+")  # noqa: SIM115 - held until unlocked or exit
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        owner = handle.read().strip() or "another process"
        handle.close()
        option = "hydra.sweep.dir" if what == "sweep" else "hydra.run.dir"
        raise LmexpError(
            f"Folder {folder} is in use by another live lmexp {what} ({owner}); wait for it to "
            f"end or give this one its own {option}."
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {platform.node()}\n")
    handle.flush()
    _held[folder] = handle


def unlock_folder(folder: Path) -> None:
    handle = _held.pop(folder.resolve(), None)
    if handle is not None:
        handle.close()  # closing the file releases the flock


@contextmanager
def folder_lock(folder: Path, what: str = "run") -> Iterator[None]:
    """lock_folder for the duration of a block (a job: in-process launchers run many). A folder
    this process already holds (an Optuna trial's, claimed by its worker) stays held after it."""
    if held_here(folder):
        yield
        return
    lock_folder(folder, what)
    try:
        yield
    finally:
        unlock_folder(folder)


def held_here(folder: Path) -> bool:
    return folder.resolve() in _held


def folder_in_use(folder: Path) -> bool:
    """Whether a live process holds `folder`'s lock (taken and at once released when free)."""
    path = folder / LOCK_FILE
    if held_here(folder):
        return True
    if not path.is_file():
        return False
    with open(path) as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
    return False
