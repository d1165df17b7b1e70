"""Slow tier: faults in the real pipeline on the tiny model, each in its own copy of the finished run.

Every stage is killed mid-way (SIGINT, SIGTERM or SIGKILL) and must leave its previous complete output,
which DVC still accepts as the recorded one; the rerun then succeeds. Also: Ctrl-C under `dvc repro`,
a full disk during a real Olive pass, a tool that silently builds the wrong thing, two `make finetune`
at once, and no secret in any output or log. Every stage run carries a fake HF_TOKEN (the finished run's
too: tests/workspace.py)."""

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
from workspace import FAKE_TOKEN, VENV, _env, run_group

from slmkit import resources
from slmkit.config import compose
from slmkit.paths import STAGES

pytestmark = pytest.mark.slow

DVC = str(VENV / "bin" / "dvc")


def env() -> dict[str, str]:
    # Unbuffered: the kill triggers read the stage's output as it comes.
    extra = {"HF_TOKEN": FAKE_TOKEN, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return {**_env(), **extra}


def sh(cmd: list[str], ws: Path, check: bool = True, **kw) -> subprocess.CompletedProcess:
    result = run_group(cmd, 1200, cwd=ws, env=env(), **kw)  # a timeout ends the command's whole process tree
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


# Stages the tiny run passes through too fast to kill in the middle: its adapter is merged into the model
# (experiment=tiny: builder.adapter=merged), so its adapter stage only writes a small manifest saying so.
INSTANT = {"adapter"}


def test_every_other_stage_has_a_kill_point():
    assert set(TRIGGERS) == set(SIGNALS) == set(STAGES) - INSTANT


@pytest.mark.parametrize("stage", [s for s in STAGES if s not in INSTANT])
def test_killed_stage_leaves_its_previous_output_and_reruns(private_run: Path, stage: str):
    sig = SIGNALS[stage]
    before = digest(private_run / "artifacts" / stage)
    assert before and changed_outs(private_run, stage) == {}

    code, out = kill_when(private_run, [sys.executable, f"scripts/{stage}.py"], TRIGGERS[stage], sig)
    if sig == signal.SIGKILL:
        assert code == -signal.SIGKILL
    else:
        assert code == 128 + sig, out[-3000:]
        assert f"slmkit {stage}: error: interrupted by {signal.Signals(sig).name}" in out
        assert "Traceback" not in out
        assert leftovers(private_run, stage) == [], "temp folder left behind"
    assert digest(private_run / "artifacts" / stage) == before, "the output changed"
    assert changed_outs(private_run, stage) == {}, "DVC no longer recognises the output"

    sh([DVC, "repro", "--force", "--single-item", stage], private_run)
    assert digest(private_run / "artifacts" / stage), "no output after the rerun"
    assert changed_outs(private_run, stage) == {}
    assert leftovers(private_run, stage) == []
    assert not (private_run / "artifacts" / f".olive-{stage}").exists()


def test_ctrl_c_under_dvc_repro_loses_nothing(private_run: Path):
    """Ctrl-C (SIGINT to the whole process group) while `dvc repro` runs train: DVC's cache keeps the output."""
    before = digest(private_run / "artifacts" / "train")
    code, out = kill_when(
        private_run,
        [DVC, "repro", "--force", "--single-item", "train"],
        TRIGGERS["train"],
        signal.SIGINT,
        group=True,
    )
    assert code != 0
    assert "Traceback" not in out
    output = private_run / "artifacts" / "train"
    assert not output.exists() or digest(output) == before, "a partial output"
    assert leftovers(private_run, "train") == []
    status = sh([DVC, "status", "train"], private_run).stdout
    if not output.exists():
        assert "deleted" in status, status  # DVC does not accept a missing output
    rerun = sh([DVC, "repro", "--single-item", "train"], private_run)
    assert digest(output) == before
    assert "Running stage" not in rerun.stdout, "retrained although the cache had the output"
    # The interrupted run's Olive scratch folder (its log) stays until train runs again; not an output.
    shutil.rmtree(private_run / "artifacts" / ".olive-train", ignore_errors=True)


def _limited(limit_bytes: int) -> Callable[[], None]:
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    return apply


def test_out_of_disk_during_a_real_olive_merge(private_run: Path):
    before = digest(private_run / "artifacts" / "merge")
    # The merged model is ~15 MB: a 2 MB file size limit fails the write with EFBIG, as a full disk would.
    result = sh([sys.executable, "scripts/merge.py"], private_run, check=False, preexec_fn=_limited(2_000_000))
    message = result.stderr[result.stderr.find("slmkit merge: error:") :]
    assert result.returncode == 1, result.stderr[-3000:]
    assert "slmkit merge: error:" in result.stderr and "Traceback" not in result.stderr
    assert "out of disk space" in message and "File too large" in message
    assert "artifacts/merge/ is unchanged" in message
    assert len(message.splitlines()) <= 25, "a log dump, not a message"
    assert digest(private_run / "artifacts" / "merge") == before
    assert leftovers(private_run, "merge") == []
    assert changed_outs(private_run, "merge") == {}
    _remove_kept_log(private_run, "merge")


def _remove_kept_log(ws: Path, stage: str) -> None:
    """A failed Olive stage keeps its scratch folder for its log; remove it so later tests see a clean tree."""
    scratch = ws / "artifacts" / f".olive-{stage}"
    assert (scratch / "olive.log").is_file(), "the log the message points to is not there"
    shutil.rmtree(scratch)


def test_tool_that_silently_skips_a_target_module_fails_the_stage(private_run: Path):
    """PEFT adapts the modules that exist and says nothing of one that does not: train must refuse.

    `make params` already refuses such a module (the layout check on the meta device); this is the guard
    behind it, for a params.yaml written by other means (here: composed without the layout check)."""
    from slmkit.config import compose, to_yaml

    before = digest(private_run / "artifacts" / "train")
    # The workspace's own (tiny) config; a few steps: the guard checks the adapter training wrote.
    quick = ["train.max_steps=10", "train.logging_steps=5", "train.eval_steps=5"]
    bad = compose(["lora.target_modules=[qkv_proj,no_such_proj]", *quick], conf_dir=private_run / "conf")
    (private_run / "params.yaml").write_text(to_yaml(bad))
    result = sh([sys.executable, "scripts/train.py"], private_run, check=False)
    message = result.stderr[result.stderr.find("slmkit train: error:") :]
    assert result.returncode == 1, result.stderr[-3000:]
    assert "no_such_proj" in message and "lora.target_modules" in message
    assert "full log: artifacts/.olive-train/olive.log" in message
    assert len(message.splitlines()) <= 25
    assert "Traceback" not in result.stderr
    assert digest(private_run / "artifacts" / "train") == before
    _remove_kept_log(private_run, "train")


def test_second_make_finetune_in_the_same_workspace_refuses(private_run: Path):
    lock = private_run / ".slmkit.lock"
    params_before = (private_run / "params.yaml").read_bytes()
    make = ["make", "--no-print-directory", "finetune", f"VENV={VENV}"]
    first = subprocess.Popen(
        make,
        cwd=private_run,
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
        second = sh([*make, "ARGS=lora.r=4"], private_run, check=False)
    finally:
        os.killpg(first.pid, signal.SIGCONT)
    out, _ = first.communicate(timeout=600)
    assert second.returncode != 0
    assert "slmkit: another slmkit run holds this workspace (pid" in second.stderr
    assert "Nothing was changed" in second.stderr
    assert (private_run / "params.yaml").read_bytes() == params_before, "the refused run rewrote params.yaml"
    assert first.returncode == 0, out[-3000:]
    assert "Test accuracy" in out
    assert "up to date" in sh([DVC, "status"], private_run).stdout
    assert not lock.read_text().strip(), "lock file still names a holder"


def test_parameter_estimate_matches_the_built_tiny_model(finished_run: Path):
    built = json.loads((finished_run / "artifacts" / "base" / "base.json").read_text())["parameters"]
    estimate = resources.parameters(compose(["experiment=tiny"]).model)
    # The tokenizer may learn fewer tokens than model.tiny.vocab_size (an upper bound).
    assert built <= estimate <= 1.2 * built


def test_no_secret_in_any_output_or_log(finished_run: Path):
    """Every stage of the finished run ran with HF_TOKEN set: it must appear in no output, record, log or lock file."""
    checked = 0
    for root in ("artifacts", "metrics", ".dvc/tmp"):
        for path in (finished_run / root).rglob("*"):
            if path.is_file() and not path.is_symlink():
                assert FAKE_TOKEN.encode() not in path.read_bytes(), path
                checked += 1
    for name in ("dvc.lock", "params.yaml", "finetune.log"):  # finetune.log: what `make finetune` printed
        assert FAKE_TOKEN not in (finished_run / name).read_text()
    assert checked > 20
    assert any((finished_run / "artifacts").rglob("olive.log")) and any(
        (finished_run / "artifacts").rglob("lineage.json")
    )
