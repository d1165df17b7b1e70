"""Slow tier: the real pipeline end to end on the tiny model, in a temporary copy of the repo."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest
from workspace import BUILT, VENV, make, run

from slmkit import gate
from slmkit.config import compose, load_params
from slmkit.data import sha256_file
from slmkit.paths import STAGES

pytestmark = pytest.mark.slow


def test_finetune_ends_with_model_and_accuracy(finished_run: Path):
    out = (finished_run / "finetune.log").read_text()
    assert "artifacts/quantize/model" in out
    assert BUILT in out and "Test accuracy" in out


def test_every_stage_wrote_its_folder_with_lineage(finished_run: Path):
    data_sha = sha256_file(finished_run / "data" / "tones.jsonl")
    for stage in STAGES:
        raw = (finished_run / "artifacts" / stage / "lineage.json").read_bytes()
        lineage = json.loads(raw)
        assert lineage["stage"] == stage
        assert lineage["data_sha256"] == data_sha
        assert "git_commit" not in lineage and "created" not in lineage  # volatile: in the run record
        run = json.loads((finished_run / "artifacts" / "runs" / stage / "run.json").read_text())
        assert run["git_commit"] and run["finished"]
        assert run["lineage_sha256"] == hashlib.sha256(raw).hexdigest()
    assert not list((finished_run / "artifacts").glob(".*")), "temporary folders left behind"


def test_manifest_hashes_and_counts(finished_run: Path):
    manifest = json.loads((finished_run / "artifacts/prepare/manifest.json").read_text())
    assert manifest["source"]["sha256"] == sha256_file(finished_run / "data/tones.jsonl")
    total = 0
    for name, split in manifest["splits"].items():
        path = finished_run / "artifacts/prepare" / split["file"]
        assert split["sha256"] == sha256_file(path), name
        assert split["count"] == sum(1 for _ in path.open()) > 0
        total += split["count"]
    assert total == manifest["examples"]


def test_int4_model_folder_runs_with_onnxruntime_genai_alone(finished_run: Path):
    model = finished_run / "artifacts/quantize/model"
    for name in (
        "model.onnx",
        "genai_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "slmkit_prompt.json",
    ):
        assert (model / name).is_file(), name
    # A separate process that imports only onnxruntime_genai, not slmkit.
    code = (
        "import onnxruntime_genai as og, sys; m = og.Model(sys.argv[1]); t = og.Tokenizer(m); "
        "print(len(t.encode('hello')))"
    )
    assert int(run([sys.executable, "-c", code, str(model)], finished_run).stdout.strip()) > 0


def test_adapter_and_loss_curve(finished_run: Path):
    adapter = finished_run / "artifacts/train/adapter"
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    expected = load_params(finished_run / "params.yaml")  # the workspace's own (tiny) config
    assert cfg["r"] == expected.lora.r
    assert set(cfg["target_modules"]) == set(expected.lora.target_modules)
    rows = (finished_run / "metrics/train_loss.csv").read_text().splitlines()
    assert rows[0] == "step,loss,eval_loss"
    losses = [float(r.split(",")[1]) for r in rows[1:] if r.split(",")[1]]
    assert len(losses) >= 5
    assert losses[-1] < losses[0], "training loss did not go down"


def test_eval_metrics(finished_run: Path):
    metrics = json.loads((finished_run / "metrics/eval.json").read_text())
    n_test = json.loads((finished_run / "artifacts/prepare/manifest.json").read_text())["splits"]["test"]["count"]
    labels = compose().data.labels
    for name in (BUILT, "merged_pytorch", "bag_of_words"):
        assert metrics[name]["n"] == n_test
        assert 0 <= metrics[name]["accuracy"] <= 1
    chance = 1 / len(labels)
    # The fine-tuned model must beat guessing clearly.
    assert metrics["merged_pytorch"]["accuracy"] > chance + 0.1
    preds = [json.loads(line) for line in (finished_run / "artifacts/evaluate/predictions.jsonl").open()]
    assert len(preds) == n_test
    assert {p[f"{BUILT}_pred"] for p in preds} <= {*labels, None}
    # Each accuracy is what the predictions say, phrase by phrase.
    for name in (BUILT, "merged_pytorch"):
        correct = sum(p[f"{name}_pred"] == p["label"] for p in preds)
        assert metrics[name]["accuracy"] == pytest.approx(correct / n_test, abs=5e-5), name  # 4 decimals
    # The gate's verdict is on these figures and on the model in place, and it lets the model ship.
    verdict = json.loads((finished_run / "artifacts/evaluate/gate.json").read_text())
    assert verdict["verdict"] == "passed", verdict
    assert verdict["accuracy"] == metrics[BUILT]["accuracy"]
    assert verdict["reference_accuracy"] == metrics["merged_pytorch"]["accuracy"]
    assert gate.check(finished_run / "artifacts/quantize/model") == verdict


def test_classify_prints_a_label(finished_run: Path):
    out = make("classify", finished_run, "TEXT=I can't stop smiling, best day ever").stdout
    labels = compose().data.labels
    last = out.strip().splitlines()[-1]
    assert last.split("\t")[0] in labels, out


def test_rerun_with_nothing_changed_reruns_nothing(finished_run: Path):
    out = make("finetune", finished_run)
    text = out.stdout + out.stderr
    assert "Running stage" not in text, text
    assert "up to date" in text
    status = run([str(VENV / "bin" / "dvc"), "status"], finished_run).stdout
    assert "up to date" in status


def test_override_reuses_upstream_stages(private_run: Path):
    """Changing only the builder reruns quantize + evaluate; the adapter is reused."""
    adapter_before = sha256_file(private_run / "artifacts/train/adapter/adapter_model.safetensors")
    out = make("finetune", private_run, "ARGS=builder=fp32_cpu")
    text = out.stdout + out.stderr
    assert "Running stage 'quantize'" in text
    for stage in ("prepare", "base", "train", "merge"):
        assert f"Running stage '{stage}'" not in text, stage
    assert sha256_file(private_run / "artifacts/train/adapter/adapter_model.safetensors") == adapter_before
    metrics = json.loads((private_run / "metrics/eval.json").read_text())
    assert "fp32_onnx" in metrics
