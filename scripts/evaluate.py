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

Generative data (no data.labels): each model's greedy answers, scored by exact match, token F1 and ROUGE-L
(slmkit.evaluate), the merged model's held-out loss per answer token, and the nearest-neighbour floor (the
answer of the most similar training question); the gate judges exact match. predictions.jsonl holds each
question, its reference and every answer; metrics/confusion/<model>.csv counts exact and other answers.
"""

import json
import shutil

from slmkit import gate, inference, lineage
from slmkit.config import DECODINGS, Config, is_generative, load_params
from slmkit.data import read_split
from slmkit.evaluate import (
    INVALID,
    TIMINGS_FILE,
    bag_of_words_baseline,
    heldout_loss,
    nearest_neighbour_baseline,
    score,
    score_answers,
)
from slmkit.files import atomic_dir, read_json, write_json, write_text
from slmkit.paths import CONFUSION_DIR, EVAL_JSON, onnx_metrics_key, stage_dir
from slmkit.prompt import build_completion, build_conversation_prompt
from slmkit.stage import log, main


def model_paths(cfg: Config) -> dict:
    return {
        onnx_metrics_key(cfg.builder.precision): stage_dir("quantize") / "model",
        "merged_pytorch": stage_dir("merge") / "model",
        # Zero-shot: the model LoRA started from, with the same prompt.
        "base_pytorch": read_json(stage_dir("base") / "base.json")["model_path"],
    }


def load(cfg: Config, path):
    e = cfg.evaluate
    remote = cfg.model.trust_remote_code
    # ungated: this stage is the gate
    return inference.load(
        path, cfg.data, e.max_new_tokens, remote, batch_size=e.batch_size, threads=e.threads, ungated=True
    )


def judge(cfg: Config, metrics: dict, paths: dict, metric: str) -> dict:
    """The parity gate's verdict on the built model (recorded in metrics and returned for gate.json)."""
    quantized = onnx_metrics_key(cfg.builder.precision)
    verdict = gate.verdict(
        quantized,
        metrics[quantized][metric],
        "merged_pytorch",
        metrics["merged_pytorch"][metric],
        cfg.evaluate.parity_tolerance,
        metric,
    )
    verdict["model_sha256"] = gate.fingerprint(paths[quantized])
    metrics["gate"] = {key: verdict[key] for key in ("verdict", "gap", "tolerance")}
    return verdict


def write(cfg: Config, rows: list[dict], verdict: dict, metrics: dict, timings: dict, confusion: dict) -> None:
    with atomic_dir(stage_dir("evaluate")) as out:
        with open(out / "predictions.jsonl", "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        # Written whatever the verdict: `slmkit classify|serve` and `make push` read it before using the model.
        write_json(out / gate.GATE_FILE, verdict)
        lineage.write(out, "evaluate", cfg, ("seed", "data", "model", "lora", "train", "builder", "evaluate"))
        write_json(EVAL_JSON, metrics)
        write_json(lineage.run_dir("evaluate") / TIMINGS_FILE, timings)
        for name, text in confusion.items():
            write_text(CONFUSION_DIR / f"{name}.csv", text)
    if verdict["verdict"] == gate.PASSED:
        log.info("parity gate %s", gate.describe(verdict))
    else:
        log.warning("parity gate %s: recorded; the model does not ship (`slmkit gate`)", gate.describe(verdict))


def run() -> None:
    cfg = load_params()
    if is_generative(cfg.data):
        run_generative(cfg)
    else:
        run_classifier(cfg)


def run_generative(cfg: Config) -> None:
    prepared = stage_dir("prepare")
    train = read_split(prepared / "train.jsonl")
    test = read_split(prepared / "test.jsonl")
    paths = model_paths(cfg)
    metrics: dict = {}
    timings: dict = {"threads": cfg.evaluate.threads, "batch_size": cfg.evaluate.batch_size}
    timings["seconds_per_example"] = {}
    rows: list[dict] = [{"question": ex.text, "reference": ex.label} for ex in test]
    for name, path in paths.items():
        clf = load(cfg, path)
        m, model_rows, seconds = score_answers(name, clf, test)
        if name == "merged_pytorch":  # how well it predicts the reference answers, token by token
            eos = clf.model.tokenizer.eos_token
            m["heldout_loss"] = heldout_loss(
                clf.model,
                [build_conversation_prompt(cfg.data, ex.text, ex.history, ex.system) for ex in test],
                [build_completion(cfg.data, ex.label, eos) for ex in test],
            )
        metrics[name] = m
        timings["seconds_per_example"][name] = seconds
        for row, new in zip(rows, model_rows, strict=True):
            row.update(new)
        log.info(
            "%s exact match %.4f token F1 %.4f ROUGE-L %.4f (empty %.1f%%)",
            name,
            m["exact_match"],
            m["token_f1"],
            m["rouge_l"],
            100 * m["empty_rate"],
        )
    metrics["nearest_neighbour"], nn_answers = nearest_neighbour_baseline(train, test)
    for row, answer in zip(rows, nn_answers, strict=True):
        row["nearest_neighbour"] = answer
    log.info("nearest-neighbour baseline exact match %.4f", metrics["nearest_neighbour"]["exact_match"])
    verdict = judge(cfg, metrics, paths, "exact_match")
    # Exact or not, per model: the confusion plot's counts (DVC's template needs actual,predicted rows).
    shutil.rmtree(CONFUSION_DIR, ignore_errors=True)
    confusion = {
        name: "actual,predicted\n"
        + "".join(f"reference,{'exact' if r[f'{name}_exact_match'] else 'other'}\n" for r in rows)
        for name in paths
    }
    write(cfg, rows, verdict, metrics, timings, confusion)


def run_classifier(cfg: Config) -> None:
    e = cfg.evaluate
    prepared = stage_dir("prepare")
    train = read_split(prepared / "train.jsonl")
    test = read_split(prepared / "test.jsonl")
    paths = model_paths(cfg)
    metrics: dict = {"decoding": e.decoding}
    comparison: dict = {}
    timings: dict = {"threads": e.threads, "batch_size": e.batch_size, "seconds_per_example": {}}
    rows: list[dict] = [{"text": ex.text, "label": ex.label} for ex in test]
    # The configured decoding first: its rows and metrics are the headline ones.
    decodings = [e.decoding] + ([d for d in DECODINGS if d != e.decoding] if e.compare_decodings else [])
    for name, path in paths.items():
        clf = load(cfg, path)
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

    verdict = judge(cfg, metrics, paths, "accuracy")
    confusion = {  # one row per test phrase: DVC's confusion template counts them
        name: "actual,predicted\n" + "".join(f"{r['label']},{r[f'{name}_pred'] or INVALID}\n" for r in rows)
        for name in paths
    }
    write(cfg, rows, verdict, metrics, timings, confusion)


if __name__ == "__main__":
    main("evaluate", run)
