"""The slow tier's workspace: a fresh copy of the repo in which the real pipeline has run once."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
VENV = Path(sys.prefix)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{VENV / 'bin'}{os.pathsep}{env['PATH']}"
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OLIVE_DISABLE_TELEMETRY="1")
    return env


def run_group(cmd: list[str], timeout: float, grace: float = 10, **kwargs) -> subprocess.CompletedProcess:
    """subprocess.run(capture_output=True, text=True) that ends the command's whole process tree on timeout.

    subprocess.run's timeout kills `make` alone: the `dvc repro` under it runs on, keeps the workspace's
    run lock and fails the tests after it. Here the command leads its own session (process group), and a
    timeout (or Ctrl-C in pytest) sends SIGTERM to the group, then SIGKILL after `grace` seconds.
    """
    proc = subprocess.Popen(
        cmd, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except BaseException as exc:
        out, err = _end_group(proc, grace)
        if isinstance(exc, subprocess.TimeoutExpired):
            raise subprocess.TimeoutExpired(cmd, timeout, out, err) from None
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _end_group(proc: subprocess.Popen, grace: float) -> tuple[str, str]:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:  # the group is gone already
            break
        try:
            return proc.communicate(timeout=grace)
        except subprocess.TimeoutExpired:
            continue  # the leader or a child that holds the pipes outlived SIGTERM: SIGKILL
    proc.kill()
    return proc.communicate()


def run(cmd: list[str], cwd: Path, timeout: int = 1200) -> subprocess.CompletedProcess:
    result = run_group(cmd, timeout, cwd=cwd, env=_env())
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result


def make(target: str, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    # VENV: the environment running this test. The copy has the same lock, so make does not reinstall.
    return run(["make", "--no-print-directory", target, f"VENV={VENV}", *args], cwd)


# The plumbing tests run on the fast tiny model, not the shipped default (SmolLM2-135M, minutes per run):
# the copy's conf/config.yaml picks its preset (conf/experiment/tiny.yaml), so `make finetune` with no
# ARGS means the tiny model there.
TINY_DEFAULTS = {"- experiment: null": "- experiment: tiny"}


def pin_tiny_default(ws: Path) -> None:
    conf = ws / "conf" / "config.yaml"
    text = conf.read_text()
    for default, tiny in TINY_DEFAULTS.items():
        assert default in text, f"{conf}: no '{default}' line; update tests/workspace.py TINY_DEFAULTS"
        text = text.replace(default, tiny)
    conf.write_text(text)
    run([str(VENV / "bin" / "python"), "scripts/compose.py"], ws)


def copy_repo(ws: Path, *, tiny: bool = True) -> Path:
    """A fresh git checkout-like copy of the repo in ws: tracked + new files, no outputs, one commit.

    tiny: the copy's default model is phi3_tiny (pin_tiny_default); tiny=False keeps the shipped default."""
    files = (
        subprocess.run(
            ["git", "ls-files", "-co", "--exclude-standard", "-z"],
            cwd=REPO_ROOT,
            capture_output=True,
            check=True,
        )
        .stdout.decode()
        .split("\0")
    )
    for rel in filter(None, files):
        src = REPO_ROOT / rel
        if src.is_file() and not rel.startswith(("artifacts/", "metrics/")):
            (ws / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, ws / rel)
    if tiny:
        pin_tiny_default(ws)
    run(["git", "init", "-q"], ws)
    run(["git", "add", "-A"], ws)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "copy"], ws)
    return ws


@pytest.fixture(scope="session")
def workspace(tmp_path_factory) -> Path:
    """A copy of the repo (copy_repo) in which the pipeline has run once."""
    ws = copy_repo(tmp_path_factory.mktemp("repo"))
    result = make("finetune", ws)
    (ws / "finetune.log").write_text(result.stdout + result.stderr)
    return ws
