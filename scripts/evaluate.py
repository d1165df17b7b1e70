"""Stage `evaluate`: test-split accuracy of the int4 ONNX model and the merged PyTorch model, plus a baseline.

    python scripts/evaluate.py   (reads params.yaml, artifacts/prepare|merge|quantize/; writes
                                  artifacts/evaluate/predictions.jsonl and metrics/eval.json)

Both models get the same prompt (slmkit.prompt) and greedy decoding. The bag-of-words
logistic regression on the same split is the bar the fine-tuned model should clear.
"""

import json

from slmkit import inference, lineage
from slmkit.config import load_params
from slmkit.data import read_split
from slmkit.evaluate import bag_of_words_baseline, score
from slmkit.stage import EVAL_JSON, atomic_dir, log, main, stage_dir, write_json


def run() -> None:
    cfg = load_params()
    prepared = stage_dir("prepare")
    train = read_split(prepared / "train.jsonl")
    test = read_split(prepared / "test.jsonl")
    n_new, remote = cfg.evaluate.max_new_tokens, cfg.model.trust_remote_code
    models = {
        f"{cfg.builder.precision}_onnx": inference.load(stage_dir("quantize") / "model", cfg.data, n_new),
        "merged_pytorch": inference.load(stage_dir("merge") / "model", cfg.data, n_new, trust_remote_code=remote),
    }
    metrics: dict = {}
    rows: list[dict] = [{} for _ in test]
    for name, clf in models.items():
        metrics[name], model_rows = score(name, clf, test)
        for row, new in zip(rows, model_rows, strict=True):
            row.update(new)
        log.info(
            "%s accuracy %.4f (invalid outputs %.1f%%)",
            name,
            metrics[name]["accuracy"],
            100 * metrics[name]["invalid_rate"],
        )
    metrics["bag_of_words"] = bag_of_words_baseline(train, test, cfg.seed)
    log.info("bag-of-words baseline accuracy %.4f", metrics["bag_of_words"]["accuracy"])

    with atomic_dir(stage_dir("evaluate")) as out:
        with open(out / "predictions.jsonl", "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        sections = ("seed", "data", "model", "lora", "train", "builder", "evaluate")
        lineage.write(out, "evaluate", cfg, sections)
        write_json(EVAL_JSON, metrics)


if __name__ == "__main__":
    main("evaluate", run)
