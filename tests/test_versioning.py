"""Slow tier: results are versioned by the data's hash (DVC run cache) and shared through a DVC remote."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from workspace import BUILT, VENV, make, run

from slmkit.data import sha256_file

pytestmark = pytest.mark.slow

ADAPTER = "artifacts/train/adapter/adapter_model.safetensors"
INT4 = "artifacts/quantize/model/model.onnx.data"


def _ran(output: subprocess.CompletedProcess) -> list[str]:
    text = output.stdout + output.stderr
    return [line for line in text.splitlines() if line.startswith("Running stage")]


def test_switching_data_and_back_restores_without_retraining(private_run: Path, tmp_path: Path):
    # The finished run's config (data A).
    adapter_a, int4_a = sha256_file(private_run / ADAPTER), sha256_file(private_run / INT4)

    data_b = tmp_path / "other.jsonl"  # another file, outside the repo, with different content
    lines = (private_run / "data/tones.jsonl").read_text(encoding="utf-8").splitlines()
    data_b.write_text("\n".join(lines[:-60]) + "\n", encoding="utf-8")
    ran_b = _ran(make("finetune", private_run, f"ARGS=data.path={data_b}"))
    assert "Running stage 'prepare':" in ran_b and "Running stage 'train':" in ran_b
    assert sha256_file(private_run / ADAPTER) != adapter_a

    back = make("finetune", private_run)
    assert _ran(back) == [], "switching back to data A retrained"
    assert "is cached - skipping run" in back.stdout
    assert sha256_file(private_run / ADAPTER) == adapter_a
    assert sha256_file(private_run / INT4) == int4_a


def test_pull_into_a_fresh_clone_then_finetune_trains_nothing(private_run: Path, tmp_path: Path):
    dvc = str(VENV / "bin" / "dvc")
    run([dvc, "remote", "add", "-d", "-f", "team", str(tmp_path / "remote")], private_run)
    make("push", private_run)
    run(["git", "add", "-A"], private_run)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "results", "--allow-empty"], private_run)

    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(private_run), str(clone)], tmp_path)
    assert not (clone / "artifacts").exists()
    make("pull", clone)
    out = make("finetune", clone)
    assert _ran(out) == [], out.stdout
    assert sha256_file(clone / ADAPTER) == sha256_file(private_run / ADAPTER)
    assert BUILT in out.stdout


def test_rebuilding_in_another_folder_gives_the_same_bytes(finished_run: Path, private_run: Path):
    """Same data + config + machine + thread count => the same outputs, byte for byte, wherever the repo lives.

    The finished run built in one folder; its private copy, at another depth under another name, rebuilds
    prepare and train from scratch (seeds everywhere, deterministic kernels, no absolute paths in the
    outputs: the adapter's config named the base by its absolute path): dvc.lock, the adapter and every file
    DVC tracks must come out as they were. (The base is compared with the committed lock in
    tests/test_real_model.py, on the real model.) The thread
    count belongs to "machine": CPU kernels sum in a different order with another number of threads
    (measured: the tiny adapter trained with OMP_NUM_THREADS=1 differs from the one trained with 2)."""
    elsewhere = private_run
    assert len(elsewhere.parts) != len(finished_run.parts)
    lock = (finished_run / "dvc.lock").read_text()
    for stage in ("prepare", "train"):
        run([str(VENV / "bin" / "dvc"), "repro", "--force", "--single-item", stage], elsewhere)
    ran = (elsewhere / "dvc.lock").read_text()
    assert ran == lock, "dvc.lock changed when rebuilt in another folder"
    for stage in ("prepare", "train"):
        for path in sorted((finished_run / "artifacts" / stage).rglob("*")):
            if path.is_file():
                rel = path.relative_to(finished_run)
                assert sha256_file(elsewhere / rel) == sha256_file(path), rel
    assert sha256_file(elsewhere / ADAPTER) == sha256_file(finished_run / ADAPTER)
