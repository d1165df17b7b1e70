"""One pipeline run per workspace: `python -m slmkit.runlock CMD ...` runs CMD holding the workspace lock.

`make finetune` and the stage targets run under it, so a second run in the same workspace refuses at
once, says which process holds the workspace, and changes nothing (not even params.yaml). The lock is
an flock(2) on LOCK_FILE, shared with the command's processes: the kernel drops it when the last of
them exits, so a killed run never leaves a stale lock behind.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import time
from pathlib import Path

LOCK_FILE = Path(".slmkit.lock")
# DVC's own repo lock (zc.lockfile: an flock on this file, holding " <pid>"), taken by any `dvc` command.
DVC_LOCK = Path(".dvc/tmp/lock")
BUSY_EXIT = 75  # EX_TEMPFAIL: try again later


class WorkspaceBusy(RuntimeError):
    """Another slmkit run holds this workspace."""


def _holder(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8").strip() or "unknown process"
    except OSError:
        return "unknown process"


def acquire(command: list[str], path: Path = LOCK_FILE) -> int:
    """Take the workspace lock without waiting; return its file descriptor (closing it releases the lock)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise WorkspaceBusy(
            f"another slmkit run holds this workspace ({_holder(path)}); wait for it to finish, or stop it "
            f"(kill that pid) and run again. Nothing was changed. The lock is {path.resolve()}"
        ) from None
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime())
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()}, `{' '.join(command)}`, started {started}\n".encode())
    return fd


def check_dvc_idle(path: Path = DVC_LOCK) -> None:
    """Refuse if a `dvc` command run outside slmkit holds DVC's lock here (it would fail half-way)."""
    if not path.exists():
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise WorkspaceBusy(
            f"a dvc command is running in this workspace (pid {_holder(path)}, DVC's lock {path}); wait for it "
            "to finish and run again. Nothing was changed"
        ) from None
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: python -m slmkit.runlock COMMAND [ARG ...]", file=sys.stderr)
        return 2
    try:
        fd = acquire(argv)
    except WorkspaceBusy as err:
        print(f"slmkit: {err}", file=sys.stderr)
        return BUSY_EXIT
    try:
        check_dvc_idle()
    except WorkspaceBusy as err:
        os.close(fd)
        print(f"slmkit: {err}", file=sys.stderr)
        return BUSY_EXIT
    os.set_inheritable(fd, True)  # the command and its children hold the lock too, until the last one exits
    try:
        return subprocess.run(argv, pass_fds=(fd,)).returncode
    except KeyboardInterrupt:
        return 130
    finally:
        os.ftruncate(fd, 0)
        os.close(fd)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
