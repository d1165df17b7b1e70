"""The slow tier's command helper ends a timed-out command's whole process tree (tests/workspace.py)."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest
from workspace import run_group


def _gone(pid: int) -> bool:
    """No such process, or a zombie waiting for init to reap it (dead either way)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")


def _wait_gone(pid: int, limit: float = 20) -> bool:
    # Not a timing assertion: a bounded wait for the kernel to tear the process down.
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if _gone(pid):
            return True
        time.sleep(0.05)
    return False


def test_a_timed_out_command_takes_its_children_with_it(tmp_path: Path):
    # Like `make` running `dvc repro`: bash starts a child that would outlive it, then waits.
    pids = tmp_path / "pids"
    script = f"sleep 300 & echo $! > {pids}; sleep 300"
    with pytest.raises(subprocess.TimeoutExpired):
        run_group(["bash", "-c", script], timeout=2, grace=5)
    child = int(pids.read_text())
    assert _wait_gone(child), f"child sleep (pid {child}) outlived its timed-out parent"


def test_plain_subprocess_run_leaves_the_child_behind(tmp_path: Path):
    # Why run_group exists: subprocess.run's timeout kills the direct child only.
    pids = tmp_path / "pids"
    script = f"sleep 300 & echo $! > {pids}; sleep 300"
    with pytest.raises(subprocess.TimeoutExpired):
        subprocess.run(["bash", "-c", script], timeout=2, start_new_session=True)
    child = int(pids.read_text())
    try:
        assert not _gone(child)
    finally:
        os.kill(child, 9)


def test_a_finished_command_returns_its_output_and_status():
    done = run_group(["bash", "-c", "echo out; echo err >&2; exit 3"], timeout=60)
    assert (done.returncode, done.stdout, done.stderr) == (3, "out\n", "err\n")
