"""Stage `train`: fine-tune a LoRA adapter on the base model with Olive's LoRA pass.

    python scripts/train.py      (reads params.yaml, artifacts/prepare/, artifacts/base/; writes artifacts/train/)

With train.nproc_per_node > 1 the Olive run goes under torchrun, one data-parallel process per GPU
(slmkit.distributed).

Writes artifacts/train/adapter/ (PEFT adapter), the Olive config, and the loss curve
metrics/train_loss.csv (step, loss, eval_loss); Olive's log and train_stats.json (time per step,
tokens/s, peak memory) go to artifacts/runs/train/, outside the DVC output (they differ on every run).
"""

import json
import shutil
import time

from slmkit import distributed, lineage, olive_config, olive_passes, olive_run, resources
from slmkit.config import load_params
from slmkit.data import read_split
from slmkit.files import atomic_dir, read_json, write_json, write_text
from slmkit.paths import TRAIN_LOSS_CSV, stage_dir
from slmkit.stage import StageError, log, main
from slmkit.tiny import seed_everything


def loss_curve(trainer_state: dict) -> list[dict]:
    rows: dict[int, dict] = {}
    for entry in trainer_state["log_history"]:
        row = rows.setdefault(entry["step"], {"step": entry["step"], "loss": "", "eval_loss": ""})
        if "loss" in entry:
            row["loss"] = round(entry["loss"], 5)
        if "eval_loss" in entry:
            row["eval_loss"] = round(entry["eval_loss"], 5)
    return [rows[k] for k in sorted(rows)]


def train_stats(cfg, tokenizer, train_jsonl, seconds: float, epochs: float, peaks: list[dict] | None = None) -> dict:
    """Throughput and peak memory of the fine-tuning run.

    One process: Olive trained in this one, so its peaks are ours. Data parallel: `peaks` holds each
    rank's, and the figures are per process (per GPU), the largest rank's."""
    import torch

    rows = [json.loads(line) for line in train_jsonl.read_text(encoding="utf-8").splitlines()]
    tokens = [len(tokenizer(r[olive_config.PROMPT_COLUMN] + r[olive_config.COMPLETION_COLUMN]).input_ids) for r in rows]
    t = cfg.train
    examples_per_step = t.batch_size * t.gradient_accumulation_steps * t.nproc_per_node
    tokens_seen = t.max_steps * examples_per_step * sum(tokens) / len(tokens)
    peaks = peaks or [resources.peak_memory()]
    gpus = [p["peak_gpu_memory_gib"] for p in peaks if p["peak_gpu_memory_gib"] is not None]
    return {
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "method": cfg.lora.method,
        "processes": t.nproc_per_node,
        "steps": t.max_steps,
        "examples_per_step": examples_per_step,
        "epochs": round(epochs, 4),
        "seconds": round(seconds, 2),
        "seconds_per_step": round(seconds / t.max_steps, 4),
        "tokens_per_second": round(tokens_seen / seconds, 1),
        "peak_gpu_memory_gib": max(gpus) if gpus else None,
        "peak_rss_gib": round(max(p["peak_rss_gib"] for p in peaks), 3),
    }


def run() -> None:
    from transformers import AutoTokenizer

    cfg = load_params()
    seed_everything(cfg.seed)
    base_path = read_json(stage_dir("base") / "base.json")["model_path"]
    resources.preflight("train", cfg, base_path)
    tokenizer = AutoTokenizer.from_pretrained(base_path, trust_remote_code=cfg.model.trust_remote_code)
    eos = tokenizer.eos_token
    work = olive_run.scratch("train")
    work.mkdir(parents=True)
    for split in ("train", "val"):
        olive_config.render_split(
            cfg.data, read_split(stage_dir("prepare") / f"{split}.jsonl"), eos, work / f"{split}_text.jsonl"
        )
    workflow = olive_config.train_workflow(cfg, base_path, work / "train_text.jsonl", work / "val_text.jsonl", work)
    nproc = cfg.train.nproc_per_node
    started = time.monotonic()
    if nproc == 1:
        output = olive_run.run_workflow(workflow, work, "LoRA training", olive_passes.write_package_config(work))
        peaks = None
    else:
        device = distributed.check_devices(nproc)
        workflow = distributed.for_ranks(workflow, device)
        output = distributed.run_workflow(workflow, work, "LoRA training", nproc, device)
        distributed.check_in_sync(work, nproc)
        peaks = distributed.rank_peaks(work, nproc)
    seconds = time.monotonic() - started
    adapter = output / "adapter"
    olive_run.require(
        [adapter / "adapter_config.json", adapter / "adapter_model.safetensors"],
        "LoRA training",
        work / "olive.log",
    )
    # QLoRA has no module list in the config: Olive picked every 4-bit linear layer and wrote them down.
    targets = cfg.lora.target_modules or json.loads((adapter / "adapter_config.json").read_text())["target_modules"]
    olive_run.check_adapter(adapter, list(targets), work / "olive.log")
    states = sorted((work / "checkpoints").glob("checkpoint-*/trainer_state.json"))
    if not states:
        raise StageError(f"Olive LoRA training left no trainer_state.json under {work / 'checkpoints'}")
    state = json.loads(states[-1].read_text())
    curve = loss_curve(state)
    stats = train_stats(cfg, tokenizer, work / "train_text.jsonl", seconds, state["epoch"], peaks)

    with atomic_dir(stage_dir("train")) as out:
        shutil.copytree(adapter, out / "adapter")
        olive_run.canonical_adapter_config(out / "adapter")
        olive_run.keep_record(work, out, "train")
        # Timings and peak memory differ on every run: beside the output, not in it (slmkit.lineage).
        write_json(lineage.run_dir("train") / "train_stats.json", stats)
        lineage.write(out, "train", cfg, ("seed", "data", "model", "lora", "train"))
        write_text(
            TRAIN_LOSS_CSV,
            "step,loss,eval_loss\n" + "".join(f"{r['step']},{r['loss']},{r['eval_loss']}\n" for r in curve),
        )
    shutil.rmtree(work, ignore_errors=True)
    last = [r for r in curve if r["loss"] != ""][-1]
    evals = [r for r in curve if r["eval_loss"] != ""]
    log.info(
        "adapter written; final train loss %s, eval loss %s; %.2f s/step, %.0f tokens/s",
        last["loss"],
        evals[-1]["eval_loss"] if evals else "-",
        stats["seconds_per_step"],
        stats["tokens_per_second"],
    )


if __name__ == "__main__":
    main("train", run)
