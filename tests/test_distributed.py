"""Data-parallel training (train.nproc_per_node > 1): the torchrun launch, the rank checks, and the real run.

The slow test runs the train stage in two processes on this CPU (gloo): the same code path as N GPUs
(NCCL), with torchrun, DistributedDataParallel and Olive's LoRA pass in every rank.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from workspace import make

from slmkit import distributed
from slmkit.config import compose
from slmkit.stage import StageError
from tests.test_faults_pipeline import digest, kill_when

REPO = Path(__file__).resolve().parents[1]


def test_launch_command_is_standalone_torchrun_of_the_worker(tmp_path: Path):
    cmd = distributed.launch_command(4, tmp_path / "olive_config.json")
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert "--standalone" in cmd and "--nproc_per_node=4" in cmd
    assert cmd[-3:] == ["-m", "slmkit.distributed", str(tmp_path / "olive_config.json")]


@pytest.mark.parametrize(("device", "device_map"), [("cuda", "current_device"), ("cpu", None)])
def test_each_rank_loads_the_model_on_its_own_device(device: str, device_map: str | None):
    """Olive's default device_map=auto spreads the model over every GPU, which DDP refuses."""
    config = {"passes": {"lora": {"type": "LoRA", "r": 8}}, "output_dir": "x"}
    ranked = distributed.for_ranks(config, device)
    assert ranked["passes"]["lora"]["device_map"] == device_map
    assert "device_map" not in config["passes"]["lora"]  # the stage's own config is not changed


def test_more_processes_than_gpus_is_refused_naming_the_key(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(StageError, match=r"train\.nproc_per_node.*at most 2"):
        distributed.check_devices(4)
    assert distributed.check_devices(2) == "cuda"


def _adapter(work: Path, rank: int, tensors: dict) -> None:
    folder = distributed.rank_dir(work, rank) / "output" / "adapter"
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))


def test_ranks_in_sync_pass_and_ranks_that_trained_alone_fail(tmp_path: Path):
    a = {"x.lora_A.weight": torch.ones(2, 3), "x.lora_B.weight": torch.zeros(3, 2)}
    _adapter(tmp_path, 0, a)
    _adapter(tmp_path, 1, {k: v.clone() for k, v in a.items()})
    distributed.check_in_sync(tmp_path, 2)
    _adapter(tmp_path, 2, {**a, "x.lora_B.weight": torch.full((3, 2), 0.1)})
    with pytest.raises(StageError, match=r"rank 2 differs in 1 tensors.*trained alone"):
        distributed.check_in_sync(tmp_path, 3)


def test_missing_rank_output_is_named(tmp_path: Path):
    _adapter(tmp_path, 0, {"x.lora_A.weight": torch.ones(1)})
    with pytest.raises(StageError, match="rank 1 of the data-parallel training wrote no adapter"):
        distributed.check_in_sync(tmp_path, 2)


def test_dry_run_prints_the_launch_command(monkeypatch, capsys):
    # scripts/compose.py's main() in this process (a new Python would spend seconds importing torch first);
    # its `dvc status` runs as the script's would, with the environment's dvc on PATH.
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.chdir(REPO)
    spec = importlib.util.spec_from_file_location("slmkit_compose_script", REPO / "scripts" / "compose.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(["--dry-run", "train.nproc_per_node=2"]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "train runs 2 data-parallel processes:" in out
    assert "torch.distributed.run --standalone --nproc_per_node=2 -m slmkit.distributed" in out


def test_reference_preset_stays_one_process():
    assert compose(["experiment=phi3_mini_tones"]).train.nproc_per_node == 1


def _ranks_alive(ws: Path) -> list[int]:
    """Processes of a data-parallel worker running in the workspace ws."""
    alive = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if "slmkit.distributed" in (proc / "cmdline").read_text() and (proc / "cwd").resolve() == ws.resolve():
                alive.append(int(proc.name))
        except OSError:
            continue
    return alive


@pytest.mark.slow
def test_two_process_training_on_cpu_shards_each_step_and_keeps_ranks_in_sync(private_run: Path):
    n_train = sum(1 for _ in (private_run / "artifacts/prepare/train.jsonl").open())
    before = digest(private_run / "artifacts/train")
    quick = "ARGS=train.nproc_per_node=2 train.max_steps=12 train.eval_steps=6"
    make("params", private_run, quick)
    # Ctrl-C while the ranks train: every rank stops, the previous output stays.
    code, out = kill_when(
        private_run,
        [sys.executable, "scripts/train.py"],
        lambda ws, out: "'loss'" in out,
        signal.SIGINT,
        group=True,
    )
    assert code == 130, out[-3000:]
    assert "slmkit train: error: interrupted by SIGINT" in out
    assert digest(private_run / "artifacts/train") == before
    assert _ranks_alive(private_run) == []

    result = make("train", private_run, quick)  # `make <stage> ARGS=...` composes, then runs up to it
    log = result.stdout + result.stderr
    assert "in 2 data-parallel processes (cpu)" in log
    assert "all 2 data-parallel ranks hold the same adapter" in log
    stats = json.loads((private_run / "artifacts/runs/train/train_stats.json").read_text())
    assert stats["processes"] == 2
    assert stats["examples_per_step"] == 2 * 16
    # DDP shards each batch over the ranks: 12 steps went through 12 x 16 x 2 examples, twice what one
    # process would (a rank that trained alone would report half this epoch count).
    assert stats["epochs"] == pytest.approx(12 * 16 * 2 / n_train, rel=0.05)
    assert (private_run / "artifacts/train/adapter/adapter_model.safetensors").is_file()
    assert not (private_run / "artifacts/.olive-train").exists()  # work folder gone after success
