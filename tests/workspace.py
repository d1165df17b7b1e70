"""The slow tier's workspaces: one finished tiny run that read-only tests share, and private copies of it.

`finished_run`: a fresh copy of the repo in which `make finetune` (the tiny model) has run once in the
session. Tests share it and must leave it as it was: after each test its files and git refs are compared
with how the run left them, and a difference fails that test. `private_run`: a test's own copy of that
finished run, DVC cache and run cache included, for a test that changes configs, data or outputs; DVC
restores what it has seen instead of retraining. Neither depends on the order the tests run in.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
VENV = Path(sys.prefix)


def _built_key() -> str:
    from slmkit.config import compose
    from slmkit.paths import onnx_metrics_key

    return onnx_metrics_key(compose(["experiment=tiny"]).builder.precision)


# metrics/eval.json's key for the ONNX model the finished tiny run built (int4_onnx: the default builder's).
BUILT = _built_key()


# Looks like a Hugging Face token, never a real one: the finished run's stages all run with it set, so a
# test can look for it in every output, record and log (tests/test_faults_pipeline.py).
FAKE_TOKEN = "hf_" + "Kw7" * 12


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


def run(
    cmd: list[str], cwd: Path, timeout: int = 1200, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    result = run_group(cmd, timeout, cwd=cwd, env=env or _env())
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result


def make(target: str, cwd: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    # VENV: the environment running this test. The copy has the same lock, so make does not reinstall.
    return run(["make", "--no-print-directory", target, f"VENV={VENV}", *args], cwd, env=env)


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


# Not part of a run's state: git's own files (refs are compared through git), DVC's lock and index
# scratch, and Python's bytecode.
_NOT_STATE = {".git", ".dvc/tmp"}


def snapshot(ws: Path) -> dict[str, str]:
    """Every file of the workspace by content (DVC cache and outputs included) and every git ref and status line."""
    state = {}
    for root, dirs, files in os.walk(ws):
        rel_root = Path(root).relative_to(ws)
        dirs[:] = [d for d in dirs if (rel_root / d).as_posix() not in _NOT_STATE and d != "__pycache__"]
        for name in files:
            path = Path(root) / name
            rel = (rel_root / name).as_posix()
            if path.is_symlink():
                state[rel] = f"-> {os.readlink(path)}"
            else:
                with path.open("rb") as f:
                    state[rel] = hashlib.file_digest(f, "sha256").hexdigest()
    for what in (["for-each-ref"], ["status", "--porcelain", "--untracked-files=all"]):
        state[f"git {what[0]}"] = subprocess.run(
            ["git", *what], cwd=ws, capture_output=True, text=True, check=True
        ).stdout
    return state


@pytest.fixture(scope="session")
def _finished_run(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """A copy of the repo (copy_repo) in which the tiny pipeline has run once, and its snapshot."""
    ws = copy_repo(tmp_path_factory.mktemp("finished"))
    result = make("finetune", ws, env={**_env(), "HF_TOKEN": FAKE_TOKEN})
    (ws / "finetune.log").write_text(result.stdout + result.stderr)
    return ws, snapshot(ws)


@pytest.fixture
def finished_run(_finished_run) -> Path:
    """The session's finished tiny run, shared: the test must change nothing in it (checked afterwards)."""
    ws, pristine = _finished_run
    yield ws
    now = snapshot(ws)
    changed = sorted(k for k in pristine.keys() | now.keys() if pristine.get(k) != now.get(k))
    assert not changed, f"this test changed the shared finished run (use private_run): {changed[:20]}"


@pytest.fixture
def private_run(_finished_run, tmp_path: Path) -> Path:
    """The test's own copy of the finished run: work tree, git, DVC cache and run cache (not DVC's scratch)."""
    src, _ = _finished_run
    ws = tmp_path / "ws"

    def scratch(folder: str, names: list[str]) -> list[str]:
        return ["tmp"] if Path(folder) == src / ".dvc" else []

    shutil.copytree(src, ws, symlinks=True, ignore=scratch)
    return ws
