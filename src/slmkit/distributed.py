"""Data-parallel training: the train stage's Olive run under torchrun, one process per GPU.

`train.nproc_per_node: N` (N > 1) makes the train stage launch

    python -m torch.distributed.run --standalone --nproc_per_node N -m slmkit.distributed <work>/olive_config.json

Every rank runs the same Olive LoRA pass; transformers' Trainer sees torchrun's environment and trains
with DistributedDataParallel (NCCL on GPUs, gloo on CPU), each rank on its own shard of every batch, so
one optimizer step sees batch_size x gradient_accumulation_steps x N examples. Olive loads the model
with device_map="auto" (spread over every visible GPU), which DDP refuses; here each rank loads it on
its own device instead. Rank 0 writes the output the stage commits; the other ranks get their own
Olive cache and output folders, and the stage checks that every rank ended with the same adapter:
if the ranks did not synchronise (each trained alone), the adapters differ and the stage fails.

A worker's exit code is torchrun's: one failed rank stops the others and fails the stage.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from slmkit.interrupt import Interrupted, raise_if_interrupted
from slmkit.stage import StageError, log

# What each rank leaves in the work folder beside Olive's log: its peak memory.
RANK_STATS = "rank{rank}_stats.json"


def rank_dir(work: Path, rank: int) -> Path:
    """Where rank `rank` runs Olive: the work folder itself for rank 0 (the output the stage commits)."""
    return work if rank == 0 else work / f"rank{rank}"


def launch_command(nproc: int, config_path: Path) -> list[str]:
    """The torchrun command line for `nproc` training processes on this machine."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "slmkit.distributed",
        str(config_path),
    ]


def check_devices(nproc: int) -> str:
    """The device kind the ranks will use; refuse more GPU processes than GPUs."""
    import torch

    if not torch.cuda.is_available():
        log.warning(
            "train.nproc_per_node=%d without a CUDA GPU: %d CPU processes (gloo). This tests the launch; "
            "it is not faster than one process on a CPU",
            nproc,
            nproc,
        )
        return "cpu"
    gpus = torch.cuda.device_count()
    if nproc > gpus:
        raise StageError(
            f"config key 'train.nproc_per_node': {nproc} processes but this machine has {gpus} CUDA GPU(s); "
            f"set train.nproc_per_node to at most {gpus}"
        )
    return "cuda"


def for_ranks(config: dict, device: str) -> dict:
    """The Olive config every rank runs: the model on the rank's own device, not spread by device_map=auto."""
    config = copy.deepcopy(config)
    for olive_pass in config["passes"].values():
        # "current_device" is Olive's {"": torch.cuda.current_device()}; the worker sets that to its GPU.
        olive_pass["device_map"] = "current_device" if device == "cuda" else None
    return config


def run_workflow(config: dict, work: Path, what: str, nproc: int, device: str) -> Path:
    """Run `config` in `nproc` data-parallel processes; return rank 0's Olive output folder."""
    work.mkdir(parents=True, exist_ok=True)
    config_path = work / "olive_config.json"
    config_path.write_text(json.dumps(config, indent=2), encoding="utf-8")
    cmd = launch_command(nproc, config_path)
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // nproc)))
    if device == "cpu":
        # Without it accelerate finds no GPU backend and the Trainer silently trains each rank alone.
        env["ACCELERATE_USE_CPU"] = "true"
    log.info("running Olive %s in %d data-parallel processes (%s): %s", what, nproc, device, " ".join(cmd))
    proc = subprocess.Popen(cmd, env=env)
    try:
        code = proc.wait()
    except Interrupted:
        # torchrun forwards SIGTERM to its workers and waits for them.
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        raise
    raise_if_interrupted()
    if code != 0:
        logs = "\n".join(f"    {p}" for p in sorted(work.glob("**/olive.log")))
        raise StageError(
            f"Olive {what} failed in one of its {nproc} data-parallel processes (torchrun exit code {code}); "
            f"the failing rank's error is printed above. Olive logs:\n{logs}"
        )
    return Path(config["output_dir"])


def check_in_sync(work: Path, nproc: int, adapter: str = "adapter") -> None:
    """Fail unless every rank's adapter equals rank 0's: proof that DDP averaged the gradients."""
    import torch
    from safetensors.torch import load_file

    def weights(rank: int) -> dict:
        found = sorted((rank_dir(work, rank) / "output").glob(f"**/{adapter}/adapter_model.safetensors"))
        if not found:
            raise StageError(f"rank {rank} of the data-parallel training wrote no adapter under {rank_dir(work, rank)}")
        return load_file(str(found[0]))

    first = weights(0)
    for rank in range(1, nproc):
        other = weights(rank)
        differ = [
            name
            for name in first
            if name not in other or not torch.allclose(first[name], other[name], rtol=1e-4, atol=1e-6)
        ]
        if differ or set(other) != set(first):
            raise StageError(
                f"the data-parallel ranks ended with different adapters (rank {rank} differs in {len(differ)} "
                f"tensors, e.g. {differ[:2]}): the processes trained alone instead of together. Check that "
                "torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR) reaches the workers"
            )
    log.info("all %d data-parallel ranks hold the same adapter (%d tensors)", nproc, len(first))


def rank_peaks(work: Path, nproc: int) -> list[dict]:
    return [json.loads((rank_dir(work, r) / RANK_STATS.format(rank=r)).read_text()) for r in range(nproc)]


def _worker(config_path: Path) -> None:
    """One rank: run Olive in this rank's folder, then record its peak memory."""
    import torch

    from slmkit import olive_passes, olive_run, resources
    from slmkit.config import load_params
    from slmkit.tiny import seed_everything

    seed_everything(load_params().seed)  # as the one-process stage does: the adapter's init is repeatable
    rank = int(os.environ["RANK"])
    work = config_path.parent
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    here = rank_dir(work, rank)
    if rank != 0:
        config["cache_dir"] = str(here / "cache")
        config["output_dir"] = str(here / "output")
    olive_run.run_workflow(config, here, f"LoRA training (rank {rank})", olive_passes.write_package_config(here))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    peak = {"rank": rank, **resources.peak_memory()}
    (here / RANK_STATS.format(rank=rank)).write_text(json.dumps(peak), encoding="utf-8")


if __name__ == "__main__":
    from slmkit.stage import main

    main(f"train (rank {os.environ.get('RANK', '?')})", lambda: _worker(Path(sys.argv[1])))
