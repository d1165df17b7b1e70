"""Slow: the generative pipeline end to end (`make finetune ARGS="data=qa"`) on the tiny model, one run shared by
the tests below (a module fixture; each test only reads it)."""

from __future__ import annotations

import html
import json
import subprocess
from pathlib import Path

import pytest
from workspace import VENV, _env, copy_repo, run_group

from slmkit.evaluate import GENERATIVE_METRICS

pytestmark = pytest.mark.slow

# data=qa builds fp32 ONNX (conf/data/qa.yaml says why): the built model is scored as fp32_onnx.
MODELS = ("fp32_onnx", "merged_pytorch", "base_pytorch")


@pytest.fixture(scope="module")
def qa_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    ws = copy_repo(tmp_path_factory.mktemp("qa"))
    cmd = ["make", "--no-print-directory", "finetune", f"VENV={VENV}", "ARGS=data=qa"]
    result = run_group(cmd, timeout=1200, cwd=ws, env=_env())
    (ws / "finetune.log").write_text(result.stdout + result.stderr)
    return ws, result


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_the_run_ends_as_its_gate_says(qa_run):
    """make finetune exits 0 exactly when the gate passed the built model; a refusal names exact match."""
    ws, result = qa_run
    metrics = json.loads((ws / "metrics/eval.json").read_text())
    verdict = metrics["gate"]["verdict"]
    assert verdict in ("passed", "refused"), result.stderr[-3000:]
    assert (result.returncode == 0) == (verdict == "passed"), result.stdout[-3000:] + result.stderr[-3000:]
    if verdict == "refused":
        assert "exact match" in result.stderr and "not shippable" in result.stderr
    assert "Test answers (greedy): exact match, token F1, ROUGE-L" in result.stdout


def test_every_model_and_the_floor_are_scored_on_the_test_split(qa_run):
    ws, _ = qa_run
    metrics = json.loads((ws / "metrics/eval.json").read_text())
    manifest = json.loads((ws / "artifacts/prepare/manifest.json").read_text())
    n_test = manifest["splits"]["test"]["count"]
    assert manifest["examples"] == sum(s["count"] for s in manifest["splits"].values()) == 650
    assert "labels" not in manifest["splits"]["test"]
    for name in (*MODELS, "nearest_neighbour"):
        m = metrics[name]
        assert m["n"] == n_test
        assert all(0.0 <= m[key] <= 1.0 for key in GENERATIVE_METRICS), (name, m)
    assert metrics["merged_pytorch"]["heldout_loss"] > 0
    assert "heldout_loss" not in metrics["base_pytorch"]
    gate = json.loads((ws / "artifacts/evaluate/gate.json").read_text())
    assert gate["metric"] == "exact_match"
    assert gate["model"] == "fp32_onnx" and gate["exact_match"] == metrics["fp32_onnx"]["exact_match"]
    assert gate["reference_exact_match"] == metrics["merged_pytorch"]["exact_match"]


def test_the_predictions_are_the_answers_slmkit_generate_writes(qa_run):
    """predictions.jsonl has each question, its reference and every model's answer; the merged model's
    answers there are what `slmkit generate --model merged` writes for the same questions (greedy)."""
    ws, _ = qa_run
    rows = read_jsonl(ws / "artifacts/evaluate/predictions.jsonl")
    test = read_jsonl(ws / "artifacts/prepare/test.jsonl")
    assert [(r["question"], r["reference"]) for r in rows] == [(t["text"], t["label"]) for t in test]
    assert all({*MODELS, "nearest_neighbour"} <= r.keys() for r in rows)
    for name in MODELS:
        assert sum(r[f"{name}_exact_match"] for r in rows) == round(
            json.loads((ws / "metrics/eval.json").read_text())[name]["exact_match"] * len(rows)
        )
    questions = ws / "questions.txt"
    questions.write_text("".join(r["question"] + "\n" for r in rows[:12]), encoding="utf-8")
    cmd = [str(VENV / "bin/python"), "-m", "slmkit.cli", "generate", "--model", "merged", "--file", str(questions)]
    out = run_group([*cmd, "--json"], timeout=300, cwd=ws, env=_env())
    assert out.returncode == 0, out.stderr[-2000:]
    answers = [json.loads(line)["answer"] for line in out.stdout.splitlines()]
    assert answers == [r["merged_pytorch"] for r in rows[:12]]


def test_the_report_shows_the_answers_the_models_got_wrong(qa_run):
    ws, _ = qa_run
    result = run_group(["make", "--no-print-directory", "report", f"VENV={VENV}"], timeout=300, cwd=ws, env=_env())
    assert result.returncode == 0, result.stderr[-2000:]
    page = (ws / "reports/report.html").read_text(encoding="utf-8")
    assert "<th>exact match</th>" in page and "nearest_neighbour" in page
    rows = read_jsonl(ws / "artifacts/evaluate/predictions.jsonl")
    missed = [
        r for r in rows if any(not r[f"{name}_exact_match"] for name in MODELS) or len({r[n] for n in MODELS}) > 1
    ]
    assert f"Answers some model got wrong or the models disagree on ({len(missed)} of {len(rows)})" in page
    assert missed, "the untrained base answers in its own words: some answer is wrong"
    assert html.escape(missed[0]["question"]) in page


def test_make_record_keeps_the_runs_figures(qa_run, tmp_path):
    """`make record NAME=...` copies the run's metrics, settings and stage times into metrics/<NAME>_run.json;
    the test runs it in a copy of the shared run's metrics and records (the shared workspace stays as it is)."""
    import shutil

    ws, _ = qa_run
    copy = tmp_path / "ws"

    def models(folder: str, names: list[str]) -> list[str]:  # the model folders are not read: leave them
        return ["model"] if Path(folder).parent == ws / "artifacts" else []

    shutil.copytree(ws, copy, symlinks=True, ignore=models)
    result = run_group(["make", "--no-print-directory", "record", f"VENV={VENV}", "NAME=qa"], 300, cwd=copy, env=_env())
    assert result.returncode == 0, result.stderr[-2000:]
    record = json.loads((copy / "metrics/qa_run.json").read_text())
    assert record["eval"] == json.loads((ws / "metrics/eval.json").read_text())
    assert record["data"]["path"] == "data/qa.jsonl" and record["data"]["labels"] == []
    assert set(record["stage_seconds"]) == {"prepare", "base", "train", "merge", "quantize", "evaluate"}
    assert record["pipeline_seconds"] == pytest.approx(sum(record["stage_seconds"].values()), abs=0.1)
    bad = run_group(["make", "--no-print-directory", "record", f"VENV={VENV}"], 60, cwd=copy, env=_env())
    assert bad.returncode == 2 and "usage: make record NAME=qa" in bad.stdout + bad.stderr
