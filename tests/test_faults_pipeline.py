"""Slow tier: faults in the real pipeline on the tiny model, in the session's workspace copy.

Every stage is killed mid-way (SIGINT, SIGTERM or SIGKILL) and must leave its previous complete output,
which DVC still accepts as the recorded one; the rerun then succeeds. Also: Ctrl-C under `dvc repro`,
a full disk during a real Olive pass, a tool that silently builds the wrong thing, two `make finetune`
at once, and no secret in any output or log. All stage runs here carry a fake HF_TOKEN.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from workspace import VENV, _env

from slmkit import resources
from slmkit.config import compose
from slmkit.stage import STAGES

pytestmark = pytest.mark.slow

FAKE_TOKEN = "hf_" + "Kw7" * 12  # looks like a Hugging Face token; never a real one
DVC = str(VENV / "bin" / "dvc")


def env() -> dict[str, str]:
    # Unbuffered: the kill triggers read the stage's output as it comes.
    extra = {"HF_TOKEN": FAKE_TOKEN, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return {**_env(), **extra}


def sh(cmd: list[str], ws: Path, check: bool = True, **kw) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=ws, env=env(), capture_output=True, text=True, timeout=1200, **kw)
    assert FAKE_TOKEN not in result.stdout + result.stderr, f"{' '.join(cmd)} printed the token"
    if check:
        assert result.returncode == 0, f"{' '.join(cmd)}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def changed_outs(ws: Path, stage: str) -> dict:
    """What `dvc status` says about the stage's outputs ({} = exactly what dvc.lock recorded)."""
    status = json.loads(sh([DVC, "status", "--json", stage], ws).stdout or "{}")
    return {k: v for entry in status.get(stage, []) if isinstance(entry, dict) for k, v in entry.items() if "outs" in k}


def leftovers(ws: Path, stage: str) -> list[str]:
    return sorted(p.name for p in (ws / "artifacts").glob(f".{stage}.*"))


# When to kill: once the stage is writing (its temp folder or its tool's scratch folder exists), or
# mid-way through its work (evaluate writes only at the end).
def _exists(pattern: str) -> Callable[[Path, str], bool]:
    return lambda ws, out: any((ws / "artifacts").glob(pattern))


TRIGGERS: dict[str, Callable[[Path, str], bool]] = {
    "prepare": _exists(".prepare.tmp-*"),
    "base": lambda ws, out: "warm-up step" in out,
    "train": lambda ws, out: "'loss'" in out or '"loss"' in out,
    "merge": _exists(".olive-merge/olive.log"),
    "quantize": _exists(".olive-quantize/olive.log"),
    "evaluate": lambda ws, out: "accuracy" in out,
}
SIGNALS = {
    "prepare": signal.SIGINT,
    "base": signal.SIGTERM,
    "train": signal.SIGKILL,
    "merge": signal.SIGINT,
    "quantize": signal.SIGTERM,
    "evaluate": signal.SIGKILL,
}


def kill_when(
    ws: Path, cmd: list[str], trigger: Callable[[Path, str], bool], sig: int, group: bool = False
) -> tuple[int, str]:
    """Run cmd, send `sig` once trigger(ws, output so far) holds; return (exit code, output).

    SIGKILL (and group=True, like Ctrl-C in a terminal) goes to the whole process group; the others
    go to the stage's process only, like `kill PID`.
    """
    log = ws / f"killed-{time.monotonic_ns()}.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ws, env=env(), stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 900
    while not trigger(ws, log.read_text(errors="replace")):
        assert proc.poll() is None, f"{cmd} ended before it could be killed:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, "trigger never came"
        time.sleep(0.02)
    (os.killpg if group or sig == signal.SIGKILL else os.kill)(proc.pid, sig)
    code = proc.wait(timeout=300)
    out = log.read_text(errors="replace")
    log.unlink()
    assert FAKE_TOKEN not in out, f"{' '.join(cmd)} printed the token"
    return code, out


@pytest.mark.parametrize("stage", STAGES)
def test_killed_stage_leaves_its_previous_output_and_reruns(workspace: Path, stage: str):
    sig = SIGNALS[stage]
    before = digest(workspace / "artifacts" / stage)
    assert before and changed_outs(workspace, stage) == {}

    code, out = kill_when(workspace, [sys.executable, f"scripts/{stage}.py"], TRIGGERS[stage], sig)
    if sig == signal.SIGKILL:
        assert code == -signal.SIGKILL
    else:
        assert code == 128 + sig, out[-3000:]
        assert f"slmkit {stage}: error: interrupted by {signal.Signals(sig).name}" in out
        assert "Traceback" not in out
        assert leftovers(workspace, stage) == [], "temp folder left behind"
    assert digest(workspace / "artifacts" / stage) == before, "the output changed"
    assert changed_outs(workspace, stage) == {}, "DVC no longer recognises the output"

    sh([DVC, "repro", "--force", "--single-item", stage], workspace)
    assert digest(workspace / "artifacts" / stage), "no output after the rerun"
    assert changed_outs(workspace, stage) == {}
    assert leftovers(workspace, stage) == []
    assert not (workspace / "artifacts" / f".olive-{stage}").exists()


def test_ctrl_c_under_dvc_repro_loses_nothing(workspace: Path):
    """Ctrl-C (SIGINT to the whole process group) while `dvc repro` runs train: DVC's cache keeps the output."""
    before = digest(workspace / "artifacts" / "train")
    code, out = kill_when(
        workspace,
        [DVC, "repro", "--force", "--single-item", "train"],
        TRIGGERS["train"],
        signal.SIGINT,
        group=True,
    )
    assert code != 0
    assert "Traceback" not in out
    output = workspace / "artifacts" / "train"
    assert not output.exists() or digest(output) == before, "a partial output"
    assert leftovers(workspace, "train") == []
    status = sh([DVC, "status", "train"], workspace).stdout
    if not output.exists():
        assert "deleted" in status, status  # DVC does not accept a missing output
    rerun = sh([DVC, "repro", "--single-item", "train"], workspace)
    assert digest(output) == before
    assert "Running stage" not in rerun.stdout, "retrained although the cache had the output"
    # The interrupted run's Olive scratch folder (its log) stays until train runs again; not an output.
    shutil.rmtree(workspace / "artifacts" / ".olive-train", ignore_errors=True)


def _limited(limit_bytes: int) -> Callable[[], None]:
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    return apply


def test_out_of_disk_during_a_real_olive_merge(workspace: Path):
    before = digest(workspace / "artifacts" / "merge")
    # The merged model is ~15 MB: a 2 MB file size limit fails the write with EFBIG, as a full disk would.
    result = sh([sys.executable, "scripts/merge.py"], workspace, check=False, preexec_fn=_limited(2_000_000))
    message = result.stderr[result.stderr.find("slmkit merge: error:") :]
    assert result.returncode == 1, result.stderr[-3000:]
    assert "slmkit merge: error:" in result.stderr and "Traceback" not in result.stderr
    assert "out of disk space" in message and "File too large" in message
    assert "artifacts/merge/ is unchanged" in message
    assert len(message.splitlines()) <= 25, "a log dump, not a message"
    assert digest(workspace / "artifacts" / "merge") == before
    assert leftovers(workspace, "merge") == []
    assert changed_outs(workspace, "merge") == {}
    _remove_kept_log(workspace, "merge")


def _remove_kept_log(ws: Path, stage: str) -> None:
    """A failed Olive stage keeps its scratch folder for its log; remove it so later tests see a clean tree."""
    scratch = ws / "artifacts" / f".olive-{stage}"
    assert (scratch / "olive.log").is_file(), "the log the message points to is not there"
    shutil.rmtree(scratch)


def test_tool_that_silently_skips_a_target_module_fails_the_stage(workspace: Path):
    """PEFT adapts the modules that exist and says nothing of one that does not: train must refuse.

    `make params` already refuses such a module (the layout check on the meta device); this is the guard
    behind it, for a params.yaml written by other means (here: composed without the layout check)."""
    from slmkit.config import compose, to_yaml

    params = workspace / "params.yaml"
    committed = params.read_text()
    before = digest(workspace / "artifacts" / "train")
    try:
        params.write_text(to_yaml(compose(["lora.target_modules=[qkv_proj,no_such_proj]"])))
        result = sh([sys.executable, "scripts/train.py"], workspace, check=False)
    finally:
        params.write_text(committed)
    message = result.stderr[result.stderr.find("slmkit train: error:") :]
    assert result.returncode == 1, result.stderr[-3000:]
    assert "no_such_proj" in message and "lora.target_modules" in message
    assert "full log: artifacts/.olive-train/olive.log" in message
    assert len(message.splitlines()) <= 25
    assert "Traceback" not in result.stderr
    assert digest(workspace / "artifacts" / "train") == before
    _remove_kept_log(workspace, "train")


def test_second_make_finetune_in_the_same_workspace_refuses(workspace: Path):
    lock = workspace / ".slmkit.lock"
    params_before = (workspace / "params.yaml").read_bytes()
    make = ["make", "--no-print-directory", "finetune", f"VENV={VENV}"]
    first = subprocess.Popen(
        make,
        cwd=workspace,
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    deadline = time.monotonic() + 120
    while not (lock.exists() and "pid" in lock.read_text()):
        assert first.poll() is None and time.monotonic() < deadline, "the first run never took the lock"
        time.sleep(0.02)
    os.killpg(first.pid, signal.SIGSTOP)  # hold the first run inside its lock, whatever it is doing
    try:
        second = sh([*make, "ARGS=lora.r=4"], workspace, check=False)
    finally:
        os.killpg(first.pid, signal.SIGCONT)
    out, _ = first.communicate(timeout=600)
    assert second.returncode != 0
    assert "slmkit: another slmkit run holds this workspace (pid" in second.stderr
    assert "Nothing was changed" in second.stderr
    assert (workspace / "params.yaml").read_bytes() == params_before, "the refused run rewrote params.yaml"
    assert first.returncode == 0, out[-3000:]
    assert "Test accuracy" in out
    assert "up to date" in sh([DVC, "status"], workspace).stdout
    assert not lock.read_text().strip(), "lock file still names a holder"


def test_parameter_estimate_matches_the_built_tiny_model(workspace: Path):
    built = json.loads((workspace / "artifacts" / "base" / "base.json").read_text())["parameters"]
    estimate = resources.parameters(compose(["experiment=tiny"]).model)
    # The tokenizer may learn fewer tokens than model.tiny.vocab_size (an upper bound).
    assert built <= estimate <= 1.2 * built


def test_no_secret_in_any_output_or_log(workspace: Path):
    """Every stage above ran with HF_TOKEN set: it must appear in no output, record, log or lock file."""
    checked = 0
    for root in ("artifacts", "metrics", ".dvc/tmp"):
        for path in (workspace / root).rglob("*"):
            if path.is_file() and not path.is_symlink():
                assert FAKE_TOKEN.encode() not in path.read_bytes(), path
                checked += 1
    for name in ("dvc.lock", "params.yaml"):
        assert FAKE_TOKEN not in (workspace / name).read_text()
    assert checked > 20
    assert any((workspace / "artifacts").rglob("olive.log")) and any((workspace / "artifacts").rglob("lineage.json"))
