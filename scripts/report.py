"""`make report`: one self-contained HTML page for the last run (reports/report.html, figures embedded).

    python scripts/report.py    (reads params.yaml, metrics/, artifacts/*/lineage.json; writes reports/)

Config, lineage, the test metrics of every model, confusion matrices, the loss curve, and latency and
size from metrics/bench.json when `make bench` has run. The figures are also written as PNG files.
"""

import json
import time
from pathlib import Path

from slmkit import lineage
from slmkit.bench import folder_size
from slmkit.config import load_params
from slmkit.evaluate import TIMINGS_FILE
from slmkit.files import read_json, write_text
from slmkit.paths import EVAL_JSON, METRICS, TRAIN_LOSS_CSV, stage_dir
from slmkit.report import render
from slmkit.stage import StageError, log, main

REPORTS = Path("reports")


def run() -> None:
    if not EVAL_JSON.exists():
        raise StageError(f"{EVAL_JSON} not found: run `make finetune` first")
    bench_json = METRICS / "bench.json"
    model = stage_dir("quantize") / "model"
    records = lineage.chain(model) if model.exists() else []
    folders = {
        "int4/ONNX (artifacts/quantize/model)": model,
        "merged PyTorch (artifacts/merge/model)": stage_dir("merge") / "model",
    }
    eval_metrics = read_json(EVAL_JSON)
    timings = lineage.run_dir("evaluate") / TIMINGS_FILE  # absent when the run came from a DVC cache or remote
    seconds = read_json(timings)["seconds_per_example"] if timings.exists() else {}
    # A classifier's seconds are per decoding; a generative run has one decoding (greedy to the end of turn).
    seconds = {name: by[eval_metrics["decoding"]] if isinstance(by, dict) else by for name, by in seconds.items()}
    answers = stage_dir("evaluate") / "predictions.jsonl"
    predictions = [json.loads(line) for line in answers.open(encoding="utf-8")] if answers.exists() else []
    page, figures = render(
        title=f"slmkit run report, {time.strftime('%Y-%m-%d %H:%M')}",
        eval_metrics=eval_metrics,
        eval_seconds=seconds,
        loss_csv=TRAIN_LOSS_CSV,
        lineage_text=lineage.format_chain(records) if records else "(no lineage records)",
        params_text=Path("params.yaml").read_text(encoding="utf-8"),
        bench=read_json(bench_json) if bench_json.exists() else None,
        sizes_mb={k: folder_size(p) / 1e6 for k, p in folders.items() if p.exists()},
        parity_tolerance=load_params().evaluate.parity_tolerance,
        predictions=predictions,
    )
    (REPORTS / "figures").mkdir(parents=True, exist_ok=True)
    for name, png in figures.items():
        (REPORTS / "figures" / name).write_bytes(png)
    write_text(REPORTS / "report.html", page)
    log.info("wrote %s (%d KB)", REPORTS / "report.html", len(page) // 1024)


if __name__ == "__main__":
    main("report", run)
