"""One running instance per profile name: its run directory, its name, and its lock.

The lock is an flock(2) on RUN_DIR/NAME.lock, taken before anything is touched and held until
everything is put back; the kernel drops it when the process dies, however it dies. The file
stays (deleting a lock file lets two processes lock two different files) and holds the pid of
the holder, so that a loser can say who holds it.
"""

from __future__ import annotations

import fcntl
import os
import re
from pathlib import Path

DEFAULT_RUN_DIR = "/run/tunvpnd"
INSTANCE_NAME = re.compile(r"[A-Za-z0-9_.@-]+")


class InstanceError(Exception):
    """The instance cannot be used: a bad name, run directory or lock file; says which."""


class InstanceBusy(InstanceError):
    """Another process holds the instance's lock."""

    def __init__(self, name: str, path: Path, pid: int | None) -> None:
        self.pid = pid
        holder = f"pid {pid}" if pid is not None else "pid unknown"
        super().__init__(f"tunvpnd {name} is already running ({holder}; lock {path})")


def run_dir() -> Path:
    """Where the crash-recovery state lives: systemd's RuntimeDirectory= when there is one."""
    explicit = os.environ.get("TUNVPN_RUN_DIR") or os.environ.get("RUNTIME_DIRECTORY", "")
    return Path(explicit.split(":")[0] or DEFAULT_RUN_DIR)


def _run_dir_origin() -> str:
    if os.environ.get("TUNVPN_RUN_DIR"):
        return " (from TUNVPN_RUN_DIR)"
    return " (from RUNTIME_DIRECTORY)" if os.environ.get("RUNTIME_DIRECTORY") else ""


def instance_name(arg: str) -> str:
    """The instance name of a command-line PROFILE: NAME, or the stem of a .yaml/.yml path.

    Only names that cannot leave the run directory are accepted.
    """
    name = Path(arg).stem if arg.endswith((".yaml", ".yml")) else arg
    if name in (".", "..") or not INSTANCE_NAME.fullmatch(name):
        raise InstanceError(f"{arg!r}: not an instance name (letters, digits and '_.@-', not "
                            "'.' or '..') nor a path to NAME.yaml with such a name")
    return name


def check_run_dir(directory: Path) -> bool:
    """True if the run directory exists; an error if something else is in its place."""
    try:
        if directory.is_dir():
            return True
        exists = directory.exists() or directory.is_symlink()
    except OSError as e:  # e.g. a parent is not searchable
        raise InstanceError(f"run directory {directory}{_run_dir_origin()}: {e.strerror}") from e
    if exists:
        raise InstanceError(f"run directory {directory}{_run_dir_origin()} is not a directory")
    return False


def make_run_dir(directory: Path) -> None:
    if check_run_dir(directory):
        return
    try:
        directory.mkdir(mode=0o755, parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as e:  # a parent is a file
        raise InstanceError(f"run directory {directory}{_run_dir_origin()}: a parent is not a "
                            f"directory ({e.filename})") from e
    except OSError as e:
        raise InstanceError(f"cannot create run directory {directory}{_run_dir_origin()}: "
                            f"{e.strerror}") from e


def lock_instance(name: str, directory: Path | None = None) -> int:
    """Take the instance's exclusive lock without waiting; return its fd (close it to release).

    Raises InstanceBusy when another process holds it, InstanceError for a bad run directory.
    """
    directory = run_dir() if directory is None else directory
    make_run_dir(directory)
    path = directory / f"{name}.lock"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
    except OSError as e:
        raise InstanceError(f"cannot open lock file {path}: {e.strerror}") from e
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pid = _holder(fd)
        os.close(fd)
        raise InstanceBusy(name, path, pid) from None
    except OSError as e:
        os.close(fd)
        raise InstanceError(f"cannot lock {path}: {e.strerror}") from e
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _holder(fd: int) -> int | None:
    """The pid the holder wrote into the lock file (None: not written yet, or garbage)."""
    try:
        text = os.pread(fd, 32, 0).decode("ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() else None
