"""`make record NAME=...`: keep the last run's figures in a committed file, metrics/<NAME>_run.json.

    python scripts/record.py NAME   (reads params.yaml, metrics/eval.json, artifacts/runs/*/run.json)

`metrics/eval.json` belongs to the workspace's last run, so a run of another data option (`data=qa`) would
be lost with the next `make finetune`. This keeps it: the test metrics and the gate's verdict, the data
(path and sha256), model, adapter, training and builder settings, each stage's seconds and their sum, the
git commit each stage ran at, the machine and its load average when recorded. The docs quote such a file.
"""

import os
import sys
import time

from slmkit.bench import machine
from slmkit.config import load_params, to_dict
from slmkit.files import read_json, write_json
from slmkit.lineage import run_dir
from slmkit.paths import EVAL_JSON, METRICS, stage_dir
from slmkit.stage import StageError, log, main

STAGES = ("prepare", "base", "train", "merge", "quantize", "evaluate")


def run() -> None:
    if len(sys.argv) != 2 or not sys.argv[1].isidentifier():
        raise StageError("usage: make record NAME=qa  (a name of letters, digits and _: metrics/<NAME>_run.json)")
    name = sys.argv[1]
    if not EVAL_JSON.exists():
        raise StageError(f"{EVAL_JSON} not found: run `make finetune` first")
    cfg = to_dict(load_params())
    runs = {s: read_json(run_dir(s) / "run.json") for s in STAGES if (run_dir(s) / "run.json").exists()}
    missing = [s for s in STAGES if s not in runs]
    if missing:
        raise StageError(f"no run record for {', '.join(missing)} (artifacts/runs/): run `make finetune` here")
    seconds = {s: r["seconds"] for s, r in runs.items()}
    record = {
        "eval": read_json(EVAL_JSON),
        "data": {**cfg["data"], "sha256": read_json(stage_dir("prepare") / "manifest.json")["source"]["sha256"]},
        "model": cfg["model"]["name"],
        "lora": cfg["lora"],
        "train": cfg["train"],
        "builder": cfg["builder"],
        "stage_seconds": seconds,
        "pipeline_seconds": round(sum(seconds.values()), 1),
        "git_commits": sorted({f"{r['git_commit']}{' (dirty)' if r.get('git_dirty') else ''}" for r in runs.values()}),
        "machine": machine(),
        "load_average": round(os.getloadavg()[0], 2),
        "recorded": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    out = METRICS / f"{name}_run.json"
    write_json(out, record)
    log.info("wrote %s (pipeline %.0f s: %s)", out, record["pipeline_seconds"], seconds)


if __name__ == "__main__":
    main("record", run)
