"""Atomic writes: an output folder or file is the previous complete one or the new complete one, never half."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

from slmkit.interrupt import INTERRUPT_SIGNALS, raise_if_interrupted

log = logging.getLogger("slmkit")


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a fresh temporary folder next to `final`; move it into place only if the block succeeds.

    A crash or kill leaves the previous `final` (or none), never a half-written one.
    """
    final = Path(final)
    _clean_stale(final)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        raise_if_interrupted()  # a library may have swallowed the signal's exception: never commit then
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    # Signals wait until both renames are done (SIGKILL cannot wait: _clean_stale handles that case).
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, INTERRUPT_SIGNALS)
    try:
        if final.exists():
            final.rename(old)
        tmp.rename(final)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    shutil.rmtree(old, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _clean_stale(final: Path) -> None:
    """Remove what a killed earlier run of atomic_dir left (SIGKILL runs no cleanup).

    A temp folder is never trusted. An `.old-` folder is the previous complete output, moved aside
    just before the new one was moved in: if the kill fell between the two renames, put it back.
    """
    if not final.parent.is_dir():
        return
    for kind in ("tmp", "old"):
        for path in final.parent.glob(f".{final.name}.{kind}-*"):
            pid = path.name.rsplit("-", 1)[-1]
            if not pid.isdigit() or _alive(int(pid)):
                continue
            if kind == "old" and not final.exists():
                log.warning("restoring the previous %s (a run was killed while replacing it)", final)
                path.rename(final)
            else:
                log.info("removing %s, left by a killed run", path)
                shutil.rmtree(path, ignore_errors=True)


def write_text(path: Path, text: str) -> None:
    """Write a file atomically (temp file + rename): readers see the old or the new content, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def write_json(path: Path, data: object) -> None:
    write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))
