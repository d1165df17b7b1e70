"""Stage `train`: fine-tune a LoRA adapter on the base model with Olive's LoRA pass.

    python scripts/train.py      (reads params.yaml, artifacts/prepare/, artifacts/base/; writes artifacts/train/)

Writes artifacts/train/adapter/ (PEFT adapter), the Olive config and log, and the loss curve
metrics/train_loss.csv (step, loss, eval_loss).
"""

import json
import shutil

from slmkit import lineage, olive_config, olive_run
from slmkit.config import load_params
from slmkit.data import read_split
from slmkit.stage import TRAIN_LOSS_CSV, StageError, atomic_dir, log, main, read_json, stage_dir, write_text
from slmkit.tiny import seed_everything


def render(cfg, split: str, eos: str, path) -> None:
    """Write a split as rendered prompt/completion pairs, one JSON line each."""
    olive_config.render_split(cfg.data, read_split(stage_dir("prepare") / f"{split}.jsonl"), eos, path)


def loss_curve(trainer_state: dict) -> list[dict]:
    rows: dict[int, dict] = {}
    for entry in trainer_state["log_history"]:
        row = rows.setdefault(entry["step"], {"step": entry["step"], "loss": "", "eval_loss": ""})
        if "loss" in entry:
            row["loss"] = round(entry["loss"], 5)
        if "eval_loss" in entry:
            row["eval_loss"] = round(entry["eval_loss"], 5)
    return [rows[k] for k in sorted(rows)]


def run() -> None:
    from transformers import AutoTokenizer

    cfg = load_params()
    seed_everything(cfg.seed)
    base_path = read_json(stage_dir("base") / "base.json")["model_path"]
    eos = AutoTokenizer.from_pretrained(base_path, trust_remote_code=cfg.model.trust_remote_code).eos_token
    work = olive_run.scratch("train")
    work.mkdir(parents=True)
    render(cfg, "train", eos, work / "train_text.jsonl")
    render(cfg, "val", eos, work / "val_text.jsonl")
    workflow = olive_config.train_workflow(cfg, base_path, work / "train_text.jsonl", work / "val_text.jsonl", work)
    output = olive_run.run_workflow(workflow, work, "LoRA training")
    adapter = output / "adapter"
    olive_run.require(
        [adapter / "adapter_config.json", adapter / "adapter_model.safetensors"],
        "LoRA training",
        work / "olive.log",
    )
    states = sorted((work / "checkpoints").glob("checkpoint-*/trainer_state.json"))
    if not states:
        raise StageError(f"Olive LoRA training left no trainer_state.json under {work / 'checkpoints'}")
    curve = loss_curve(json.loads(states[-1].read_text()))

    with atomic_dir(stage_dir("train")) as out:
        shutil.copytree(adapter, out / "adapter")
        olive_run.keep_record(work, out)
        lineage.write(out, "train", cfg, ("seed", "data", "model", "lora", "train"))
        write_text(
            TRAIN_LOSS_CSV,
            "step,loss,eval_loss\n" + "".join(f"{r['step']},{r['loss']},{r['eval_loss']}\n" for r in curve),
        )
    shutil.rmtree(work, ignore_errors=True)
    last = [r for r in curve if r["loss"] != ""][-1]
    evals = [r for r in curve if r["eval_loss"] != ""]
    log.info(
        "adapter written; final train loss %s, eval loss %s",
        last["loss"],
        evals[-1]["eval_loss"] if evals else "-",
    )


if __name__ == "__main__":
    main("train", run)
