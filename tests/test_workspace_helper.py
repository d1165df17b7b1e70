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


def test_snapshot_sees_every_change_a_test_could_leave_in_the_shared_run(tmp_path: Path):
    """finished_run's guard (tests/workspace.py): files by content, git refs and status; not DVC's scratch."""
    from workspace import snapshot

    ws = tmp_path / "ws"
    (ws / ".dvc" / "tmp").mkdir(parents=True)
    (ws / "artifacts" / "train").mkdir(parents=True)
    (ws / "artifacts" / "train" / "adapter.bin").write_bytes(b"weights")
    (ws / "params.yaml").write_text("lora: {r: 16}\n")
    (ws / ".dvc" / ".gitignore").write_text("/tmp\n/cache\n")  # as `dvc init` writes it
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], cwd=ws, check=True)
    subprocess.run([*git, "add", "params.yaml", ".dvc/.gitignore"], cwd=ws, check=True)
    subprocess.run([*git, "commit", "-qm", "x"], cwd=ws, check=True)
    pristine = snapshot(ws)

    (ws / ".dvc" / "tmp" / "rwlock").write_text("{}")  # DVC's own scratch: not a change to the run
    assert snapshot(ws) == pristine
    (ws / "params.yaml").write_text("lora: {r: 16}\n")  # rewritten with the same bytes: not a change
    assert snapshot(ws) == pristine

    for change in (
        lambda: (ws / "artifacts" / "train" / "adapter.bin").write_bytes(b"other weights"),
        lambda: (
            (ws / "artifacts" / ".olive-train").mkdir() or (ws / "artifacts" / ".olive-train" / "olive.log").touch()
        ),
        lambda: subprocess.run([*git, "branch", "exp"], cwd=ws, check=True),
    ):
        change()
        assert snapshot(ws) != pristine
        pristine = snapshot(ws)
