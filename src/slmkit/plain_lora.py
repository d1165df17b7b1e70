"""A plain Hugging Face + PEFT LoRA loop: the yardstick the train stage's speed is measured against.

    python -m slmkit.plain_lora BASE_DIR TRAIN_JSONL --steps N   (reads params.yaml; prints JSON)

Same model, dtype, LoRA targets/rank/alpha/dropout, optimizer, schedule, threads and the same batches as
the train stage's Olive LoRA pass: the examples are tokenized by slmkit.olive_data.tokenize_pair (the
function the Olive data component calls), and the batches come from transformers' Trainer dataloader with
the stage's seed, data_seed and batch size (Olive trains with that Trainer), padded by Olive's collate
function. What is plain is the loop itself: forward, loss, backward, clip, step; no Trainer, no Olive.
`make bench-train` (scripts/bench.py --train) runs it beside the stage's own training.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from functools import partial
from pathlib import Path

from slmkit.config import Config, load_params
from slmkit.tiny import seed_everything


def batches(cfg: Config, base: Path, train_jsonl: Path, tokenizer, model):
    """The train stage's batches, in its order: a Trainer's train dataloader with the stage's arguments."""
    import transformers
    from datasets import Dataset
    from olive.passes.pytorch.lora import LoRA

    from slmkit.olive_config import COMPLETION_COLUMN, PROMPT_COLUMN
    from slmkit.olive_data import tokenize_pair

    rows = [json.loads(line) for line in train_jsonl.read_text(encoding="utf-8").splitlines()]
    pairs = [tokenize_pair(tokenizer, r[PROMPT_COLUMN], r[COMPLETION_COLUMN], cfg.model.max_length) for r in rows]
    dataset = Dataset.from_list(pairs).with_format("torch")
    args = transformers.TrainingArguments(
        output_dir=str(base.parent / ".plain-lora"),
        seed=cfg.seed,
        data_seed=cfg.seed,
        per_device_train_batch_size=cfg.train.batch_size,
        train_sampling_strategy=cfg.train.sampling,
        report_to="none",
    )
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=dataset, data_collator=partial(LoRA.collate_batch, tokenizer=tokenizer)
    )
    return trainer.get_train_dataloader()


def train(cfg: Config, base: Path, train_jsonl: Path, steps: int) -> dict:
    """`steps` LoRA steps (the schedule's length, as the stage's with train.max_steps=steps); returns the wall
    time of the whole run, the tokens trained on and the mean loss of each train.logging_steps window (what
    the Trainer logs: equal losses on both sides show the same batches and the same start)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, get_scheduler

    started = time.perf_counter()
    seed_everything(cfg.seed)  # as the train stage does before Olive loads the model and adds the adapter
    t, lo = cfg.train, cfg.lora
    tokenizer = AutoTokenizer.from_pretrained(base, trust_remote_code=cfg.model.trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(
        base, dtype=getattr(torch, t.torch_dtype), trust_remote_code=cfg.model.trust_remote_code
    )
    model.requires_grad_(False)
    lora = LoraConfig(
        r=lo.r,
        lora_alpha=lo.alpha,
        lora_dropout=lo.dropout,
        target_modules=list(lo.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=t.learning_rate, weight_decay=t.weight_decay, fused=True)
    schedule = get_scheduler(t.lr_scheduler_type, optimizer, math.ceil(t.warmup_ratio * steps), steps)
    loader = batches(cfg, base, train_jsonl, tokenizer, model)
    tokens = step = epoch = 0
    losses: list[float] = []
    while step < steps:
        if hasattr(loader, "set_epoch"):  # as the Trainer does: each epoch its own seeded order
            loader.set_epoch(epoch)
        epoch += 1
        for batch in loader:
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            tokens += int(batch["attention_mask"].sum())
            losses.append(float(loss.detach()))
            step += 1
            if step == steps:
                break
    window = min(t.logging_steps, steps)
    logged = [round(sum(losses[i : i + window]) / window, 4) for i in range(0, steps - window + 1, window)]
    return {"steps": steps, "seconds": time.perf_counter() - started, "tokens": tokens, "logged_loss": logged}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("base", type=Path, help="the base model folder (artifacts/base/model)")
    parser.add_argument("train_jsonl", type=Path, help="prompt/completion JSON lines (olive_config.render_split)")
    parser.add_argument("--steps", type=int, required=True)
    args = parser.parse_args()
    cfg = load_params()
    if cfg.lora.method != "lora" or not cfg.lora.target_modules:
        raise SystemExit("slmkit.plain_lora: the yardstick is plain LoRA with lora.target_modules set (lora=lora)")
    print(json.dumps(train(cfg, args.base, args.train_jsonl, args.steps)))


if __name__ == "__main__":
    main()
