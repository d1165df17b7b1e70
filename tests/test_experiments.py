"""Slow tier: sweeps as DVC experiments, the dry run and the ejected Olive config, in the pipeline workspace."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import yaml
from workspace import BUILT, make, run, run_group

from slmkit import load
from slmkit.config import load_params
from slmkit.data import read_split
from slmkit.sweep import best, collect

pytestmark = pytest.mark.slow

# Short training keeps each sweep job short on 2 cores; the plumbing is what is tested. A 20-step model is
# barely trained, so int4 and merged can differ by a few points: the gate's verdict may go either way, and
# a sweep records it rather than failing.
QUICK = "train.max_steps=20"


def _latest_sweep(ws: Path) -> Path:
    return max((ws / "sweeps").iterdir(), key=lambda p: p.stat().st_mtime)


def _experiments(ws: Path) -> dict[str, dict]:
    """name -> {params, metrics} from `dvc exp show --json` (DVC's own view of the experiments)."""
    rows = json.loads(run(["dvc", "exp", "show", "--json"], ws).stdout)
    found = {}
    for baseline in rows:
        for exp in baseline.get("experiments") or []:
            for rev in exp.get("revs", []):
                data = rev.get("data") or {}
                name = rev.get("name") or exp.get("name")
                if name:
                    found[name] = data
    return found


def test_parallel_sweep_runs_separate_dvc_experiments_reusing_upstream(private_run: Path):
    n_test = len(read_split(private_run / "artifacts/prepare/test.jsonl"))
    result = make("sweep", private_run, f"ARGS=hydra/launcher=parallel lora.r=4,8 {QUICK}")
    results = collect(_latest_sweep(private_run))
    assert sorted(r["overrides"][0] for r in results) == ["lora.r=4", "lora.r=8"]
    for r in results:
        assert {"prepare", "base"} <= set(r["stages"]["reused"]), r["stages"]
        assert "train" in r["stages"]["ran"] and "base" not in r["stages"]["ran"]
        assert r["threads"] == 1  # 2 jobs on 2 cores: one thread each
        m = r["metrics"][BUILT]
        # A share of the test phrases, rounded to 4 decimals.
        assert m["n"] == n_test and abs(m["accuracy"] * n_test - round(m["accuracy"] * n_test)) <= 5e-5 * n_test, m
    pick = best(results)
    assert ("★" in result.stdout) == (pick is not None) and ("none is picked" in result.stdout) == (pick is None)
    exps = _experiments(private_run)
    for r in results:
        assert r["name"] in exps, f"{r['name']} not in dvc exp show: {sorted(exps)}"
        params = exps[r["name"]]["params"]["params.yaml"]["data"]
        assert params["lora"]["r"] == int(r["overrides"][0].split("=")[1])
        assert params["train"]["max_steps"] == 20
        metrics = exps[r["name"]]["metrics"]["metrics/eval.json"]["data"]
        assert metrics[BUILT]["accuracy"] == r["metrics"][BUILT]["accuracy"]
        # Each experiment carries the gate's verdict on its own figures, refused or not.
        gap = metrics["merged_pytorch"]["accuracy"] - metrics[BUILT]["accuracy"]
        assert metrics["gate"]["verdict"] == ("passed" if gap <= 0.02 + 1e-9 else "refused"), metrics["gate"]
    # The jobs' clones are gone; the workspace's params are untouched by the jobs.
    assert not list(_latest_sweep(private_run).glob("*/ws"))
    assert yaml.safe_load((private_run / "params.yaml").read_text())["lora"]["r"] == 16


def test_sweep_through_submitit_records_a_job_the_gate_did_not_pass_and_picks_the_one_it_did(private_run: Path):
    """The SLURM launcher's code path (submitit), run by its local executor, over two gates.

    Both jobs are the finished run's config (lora.r=16, the tiny preset's), whose model passed the default
    gate: one job keeps it (every stage from DVC's run cache), the other loosens it past its bound, so
    only evaluate (and the adapter stage after it) reruns and its verdict is `loose`. The sweep succeeds,
    records both experiments with their verdicts, and picks the job the gate passed."""
    tolerance = load_params(private_run / "params.yaml").evaluate.parity_tolerance
    out = make(
        "sweep", private_run, f"ARGS=hydra/launcher=local_processes lora.r=16 evaluate.parity_tolerance={tolerance},0.5"
    )
    results = {r["overrides"][-1]: r for r in collect(_latest_sweep(private_run))}
    kept, loose = results[f"evaluate.parity_tolerance={tolerance}"], results["evaluate.parity_tolerance=0.5"]
    assert kept["stages"]["ran"] == [], kept["stages"]  # up to date, or restored from the run cache
    # adapter reruns after evaluate: the adapter's manifest carries the gate's verdict
    assert loose["stages"]["ran"] == ["evaluate", "adapter"], loose["stages"]
    assert kept["metrics"]["gate"]["verdict"] == "passed" and loose["metrics"]["gate"]["verdict"] == "loose"
    assert best(list(results.values()))["name"] == kept["name"]
    assert f"| ★ | {kept['name']} " in out.stdout and "the parity gate did not pass 1 of 2" in out.stdout
    exps = _experiments(private_run)
    for r in (kept, loose):
        gate = exps[r["name"]]["metrics"]["metrics/eval.json"]["data"]["gate"]
        assert gate["verdict"] == r["metrics"]["gate"]["verdict"]


def test_sweep_job_with_a_bad_value_fails_before_any_work(private_run: Path):
    cmd = ["make", "--no-print-directory", "sweep", f"VENV={sys.prefix}", "ARGS=lora.dropout=1.5"]
    proc = run_group(cmd, 600, cwd=private_run)
    assert proc.returncode != 0
    assert "lora.dropout" in proc.stderr
    assert not list(_latest_sweep(private_run).glob("*/ws")) and not list(_latest_sweep(private_run).glob("*/dvc.log"))


def test_a_failed_job_is_listed_and_the_other_jobs_go_on(private_run: Path):
    """Job 0 fails in prepare (no such data file); job 1 (the committed config) still runs; exit 1 at the end."""
    cmd = ["make", "--no-print-directory", "sweep", f"VENV={sys.prefix}"]
    cmd.append("ARGS=data.path=data/missing.jsonl,data/tones.jsonl")
    proc = run_group(cmd, 1200, cwd=private_run)
    assert proc.returncode != 0
    failed, done = sorted(collect(_latest_sweep(private_run)), key=lambda r: r["overrides"][0])
    assert failed["overrides"] == ["data.path=data/missing.jsonl"] and "missing.jsonl" in failed["failed"]
    assert "failed" not in done and done["objective"] == done["metrics"][BUILT]["accuracy"]
    assert "1 of 2 jobs failed" in proc.stdout + proc.stderr
    assert "| ✗ |" in proc.stdout and "| ★ |" in proc.stdout


def test_config_dry_run_names_the_stages_to_rerun(finished_run: Path):
    before = (finished_run / "params.yaml").read_text()
    out = make("config", finished_run, "ARGS=lora.r=8").stdout
    listed = out.split("would run:")[1]
    assert "train" in listed and "params lora" in listed
    assert "prepare" not in listed and "base" not in listed
    assert (finished_run / "params.yaml").read_text() == before
    assert "none: every stage is up to date" in make("config", finished_run).stdout


def test_ejected_olive_config_runs_with_olive_run(private_run: Path):
    make("olive-config", private_run)
    config_path = private_run / "olive-config" / "olive_config.json"
    workflow = json.loads(config_path.read_text())
    passes = ["CompletionLoRA", "MergeAdapterWeights", "ModelBuilder"]
    assert [p["type"] for p in workflow["passes"].values()] == passes
    shutil.rmtree(private_run / "olive-config" / "output", ignore_errors=True)
    package = private_run / "olive-config" / "olive_package_config.json"
    run(["olive", "run", "--config", str(config_path), "--package-config", str(package)], private_run)
    output = private_run / "olive-config" / "output"
    genai = next(output.rglob("genai_config.json")).parent
    assert (genai / "model.onnx").is_file()
    # Olive alone gives a working classifier with the same prompt. Not a bit-identical one: Olive's LoRA
    # pass does not seed the adapter's initialisation (the Trainer's seed applies after the adapter
    # exists); slmkit's train stage seeds torch before calling Olive, which makes its runs repeatable.
    cfg = load_params(private_run / "params.yaml")
    test = read_split(private_run / "artifacts" / "prepare" / "test.jsonl")
    preds = load(genai, data=cfg.data).classify([e.text for e in test])
    accuracy = sum(p.label == e.label for p, e in zip(preds, test, strict=True)) / len(test)
    assert accuracy > 1 / len(cfg.data.labels) + 0.1, f"{accuracy:.4f}: no better than guessing"


def test_qlora_adapter_goes_to_int4_through_the_full_precision_merge(private_run: Path):
    """QLoRA end to end on CPU: 4-bit base -> adapter -> merge into the fp32 base -> int4 ONNX -> evaluate."""
    # A tolerance past the gate's bound: every stage runs, and the verdict is recorded but never `passed`.
    make("evaluate", private_run, f"ARGS=experiment=tiny_qlora {QUICK} evaluate.parity_tolerance=0.5")
    adapter = json.loads((private_run / "artifacts/train/adapter/adapter_config.json").read_text())
    # Olive's QLoRA pass adapts every 4-bit linear layer (not the embeddings).
    assert set(adapter["target_modules"]) == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}
    merged = json.loads((private_run / "artifacts/merge/model/config.json").read_text())
    assert "quantization_config" not in merged  # the merged model is full precision
    assert (private_run / "artifacts/quantize/model/model.onnx").is_file()
    metrics = json.loads((private_run / "metrics/eval.json").read_text())
    verdict = json.loads((private_run / "artifacts/evaluate/gate.json").read_text())
    assert verdict["accuracy"] == metrics[BUILT]["accuracy"]
    assert verdict["reference_accuracy"] == metrics["merged_pytorch"]["accuracy"]
    assert verdict["verdict"] == ("loose" if verdict["gap"] <= 0.5 else "refused"), verdict
    # Not what users get: classify and `make finetune`'s last step refuse it.
    refused = run_group([sys.executable, "-m", "slmkit.cli", "classify", "Hi"], 300, cwd=private_run)
    assert refused.returncode == 1 and "--ungated" in refused.stderr, refused.stderr[-2000:]
    gate = run_group([sys.executable, "-m", "slmkit.cli", "gate"], 300, cwd=private_run)
    assert gate.returncode == 1 and "not shippable" in gate.stderr


def test_optuna_search_returns_accuracy_and_finds_the_best(private_run: Path):
    # A search over the builder: the adapter comes from the finished run (DVC's run cache), and a trial
    # builds and scores its model (int4_onnx or fp32_onnx, the objective follows it).
    make("sweep", private_run, "ARGS=hydra/sweeper=search hydra.sweeper.n_trials=2 'builder=choice(int4_cpu,fp32_cpu)'")
    sweep_dir = _latest_sweep(private_run)
    results = collect(sweep_dir)
    assert len(results) == 2
    best = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    assert best["best_value"] == max(r["objective"] for r in results)


def test_a_sweep_over_builders_ranks_each_job_by_the_model_it_built(private_run: Path):
    # evaluate names the built model by its precision (int4_onnx, fp32_onnx): the objective follows it.
    make("sweep", private_run, f"ARGS=builder=int4_cpu,fp32_cpu {QUICK}")
    results = {r["overrides"][0]: r for r in collect(_latest_sweep(private_run))}
    assert set(results) == {"builder=int4_cpu", "builder=fp32_cpu"}
    for override, model in (("builder=int4_cpu", "int4_onnx"), ("builder=fp32_cpu", "fp32_onnx")):
        r = results[override]
        assert "failed" not in r, r
        assert r["objective_model"] == model and r["objective"] == r["metrics"][model]["accuracy"]
        assert "quantize" in r["stages"]["ran"], r["stages"]
    # One adapter for both builders: whichever job ran second reused the first one's training.
    assert sum("train" in r["stages"]["ran"] for r in results.values()) <= 1
    summary = (_latest_sweep(private_run) / "summary.md").read_text()
    assert "| fp32_onnx |" in summary and "| int4_onnx |" in summary
