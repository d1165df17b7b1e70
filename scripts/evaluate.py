"""Stage `evaluate`: the base (zero-shot), merged PyTorch and int4 ONNX models on the test split, and the parity gate.

    python scripts/evaluate.py   (reads params.yaml, artifacts/prepare|base|merge|quantize/; writes
                                  artifacts/evaluate/predictions.jsonl, metrics/eval.json and
                                  metrics/confusion/<model>.csv)

Every model gets the same prompt (slmkit.prompt) and is scored with `evaluate.decoding`, in batches of
`evaluate.batch_size`; with `evaluate.compare_decodings: true` also with the other decoding (stop-based vs
constrained to the label set), into metrics/eval.json's `decoding_comparison`. A bag-of-words logistic
regression on the same split is the bar the fine-tuned model should clear. The parity gate judges the
quantized model against the merged one (`evaluate.parity_tolerance`): its verdict goes to
artifacts/evaluate/gate.json and metrics/eval.json's `gate`, recorded, not raised, so a refused model is a
result DVC keeps (a sweep's experiment, a run cache entry). What ships follows the verdict: `make finetune`
stops at a refusal, and `slmkit classify|serve|chat` and `make push` use only a passed model (slmkit.gate).
Seconds per phrase of each model and decoding go to artifacts/runs/evaluate/timings.json, outside the DVC
outputs (they differ on every run).
"""

import json

from slmkit import gate, inference, lineage
from slmkit.config import DECODINGS, load_params
from slmkit.data import read_split
from slmkit.evaluate import INVALID, TIMINGS_FILE, bag_of_words_baseline, score
from slmkit.files import atomic_dir, read_json, write_json, write_text
from slmkit.paths import CONFUSION_DIR, EVAL_JSON, onnx_metrics_key, stage_dir
from slmkit.stage import log, main


def run() -> None:
    cfg = load_params()
    e = cfg.evaluate
    prepared = stage_dir("prepare")
    train = read_split(prepared / "train.jsonl")
    test = read_split(prepared / "test.jsonl")
    quantized = onnx_metrics_key(cfg.builder.precision)
    remote = cfg.model.trust_remote_code
    paths = {
        quantized: stage_dir("quantize") / "model",
        "merged_pytorch": stage_dir("merge") / "model",
        # Zero-shot: the model LoRA started from, with the same prompt.
        "base_pytorch": read_json(stage_dir("base") / "base.json")["model_path"],
    }
    metrics: dict = {"decoding": e.decoding}
    comparison: dict = {}
    timings: dict = {"threads": e.threads, "batch_size": e.batch_size, "seconds_per_example": {}}
    rows: list[dict] = [{"text": ex.text, "label": ex.label} for ex in test]
    # The configured decoding first: its rows and metrics are the headline ones.
    decodings = [e.decoding] + ([d for d in DECODINGS if d != e.decoding] if e.compare_decodings else [])
    for name, path in paths.items():
        clf = inference.load(
            path,
            cfg.data,
            e.max_new_tokens,
            trust_remote_code=remote,
            batch_size=e.batch_size,
            threads=e.threads,
            ungated=True,  # this stage is the gate
        )
        comparison[name] = {}
        for decoding in decodings:
            m, model_rows, seconds = score(name, clf, test, decoding)
            comparison[name][decoding] = {k: m[k] for k in ("accuracy", "macro_f1", "invalid_rate")}
            timings["seconds_per_example"].setdefault(name, {})[decoding] = seconds
            if decoding == e.decoding:
                metrics[name] = m
                for row, new in zip(rows, model_rows, strict=True):
                    row.update(new)
        m = metrics[name]
        log.info(
            "%s accuracy %.4f macro-F1 %.4f (invalid %.1f%%)",
            name,
            m["accuracy"],
            m["macro_f1"],
            100 * m["invalid_rate"],
        )
    metrics["bag_of_words"] = bag_of_words_baseline(train, test, cfg.seed, list(cfg.data.labels))
    if e.compare_decodings:
        metrics["decoding_comparison"] = comparison
    log.info("bag-of-words baseline accuracy %.4f", metrics["bag_of_words"]["accuracy"])

    verdict = gate.verdict(
        quantized,
        metrics[quantized]["accuracy"],
        "merged_pytorch",
        metrics["merged_pytorch"]["accuracy"],
        e.parity_tolerance,
    )
    verdict["model_sha256"] = gate.fingerprint(paths[quantized])
    metrics["gate"] = {key: verdict[key] for key in ("verdict", "gap", "tolerance")}
    with atomic_dir(stage_dir("evaluate")) as out:
        with open(out / "predictions.jsonl", "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        # Written whatever the verdict: `slmkit classify|serve` and `make push` read it before using the model.
        write_json(out / gate.GATE_FILE, verdict)
        lineage.write(out, "evaluate", cfg, ("seed", "data", "model", "lora", "train", "builder", "evaluate"))
        write_json(EVAL_JSON, metrics)
        write_json(lineage.run_dir("evaluate") / TIMINGS_FILE, timings)
        for name in paths:  # one row per test phrase: DVC's confusion template counts them
            lines = [f"{r['label']},{r[f'{name}_pred'] or INVALID}\n" for r in rows]
            write_text(CONFUSION_DIR / f"{name}.csv", "actual,predicted\n" + "".join(lines))
    if verdict["verdict"] == gate.PASSED:
        log.info("parity gate %s", gate.describe(verdict))
    else:
        log.warning("parity gate %s: recorded; the model does not ship (`slmkit gate`)", gate.describe(verdict))


if __name__ == "__main__":
    main("evaluate", run)
