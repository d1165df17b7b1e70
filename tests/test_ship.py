"""Slow tier: what ships with a run — the parity gate on a broken model, the report, the benchmark, the CLI."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from workspace import BUILT, _env, run

from slmkit.config import compose

pytestmark = pytest.mark.slow


def test_parity_gate_refuses_a_model_built_from_the_untrained_base(finished_run: Path, tmp_path: Path):
    """Swap in a model built from the base (no adapter): evaluate records a refusal
    naming both figures, and the model is not what classify or `make finetune`'s gate check give users."""
    from slmkit.build import build_onnx
    from slmkit.config import load_params
    from slmkit.inference import save_prompt_config

    ws = tmp_path / "ws"
    for rel in ("params.yaml", "scripts/evaluate.py", "artifacts/prepare", "artifacts/base", "artifacts/merge"):
        src, dst = finished_run / rel, ws / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, dst)
    cfg = load_params(ws / "params.yaml")
    work = tmp_path / "olive"
    base = ws / "artifacts/base/model"  # built as the quantize stage builds, from the base: no fine-tuning in it
    output = build_onnx(cfg, work, base, None, base)
    broken = ws / "artifacts/quantize/model"
    shutil.copytree(output, broken)
    shutil.copy2(finished_run / "artifacts/quantize/lineage.json", broken.parent)
    save_prompt_config(cfg.data, broken)

    result = subprocess.run(
        [sys.executable, "scripts/evaluate.py"], cwd=ws, env=_env(), capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stderr[-3000:]  # recorded, not raised
    metrics = json.loads((ws / "metrics/eval.json").read_text())
    built, merged = metrics[BUILT]["accuracy"], metrics["merged_pytorch"]["accuracy"]
    assert merged - built > cfg.evaluate.parity_tolerance
    assert metrics["gate"]["verdict"] == "refused"
    verdict = json.loads((ws / "artifacts/evaluate/gate.json").read_text())
    assert verdict["verdict"] == "refused" and verdict["accuracy"] == built
    # `make finetune` ends with this check: it fails, naming both figures.
    gate = subprocess.run(
        [sys.executable, "-m", "slmkit.cli", "gate"], cwd=ws, env=_env(), capture_output=True, text=True, timeout=300
    )
    assert gate.returncode == 1 and "parity gate refused it" in gate.stderr
    assert f"{built:.4f}" in gate.stderr and f"{merged:.4f}" in gate.stderr, gate.stderr[-2000:]
    # The refused model is not what users get: classify names the verdict and how to use it anyway.
    cmd = [sys.executable, "-m", "slmkit.cli", "classify", "I can't stop smiling"]
    refused = subprocess.run(cmd, cwd=ws, env=_env(), capture_output=True, text=True, timeout=300)
    assert refused.returncode == 1 and "parity gate refused it" in refused.stderr and "--ungated" in refused.stderr
    anyway = subprocess.run([*cmd, "--ungated"], cwd=ws, env=_env(), capture_output=True, text=True, timeout=300)
    assert anyway.returncode == 0 and anyway.stdout.strip().endswith("I can't stop smiling"), anyway.stderr[-2000:]


def test_eval_has_three_models_in_depth_and_confusion_plots(finished_run: Path):
    metrics = json.loads((finished_run / "metrics/eval.json").read_text())
    labels = compose().data.labels
    for name in ("base_pytorch", "merged_pytorch", BUILT):
        m = metrics[name]
        assert set(m["per_class"]) == set(labels)
        assert 0 <= m["macro_f1"] <= 1
        assert sum(map(sum, m["confusion"]["matrix"])) == m["n"]
        rows = (finished_run / f"metrics/confusion/{name}.csv").read_text().splitlines()
        assert rows[0] == "actual,predicted" and len(rows) == m["n"] + 1
    # The comparison of decodings is opt-in.
    assert metrics["decoding"] == "constrained" and "decoding_comparison" not in metrics
    # Times differ on every run: in the run record, not in the DVC metrics (whose hash would change each time).
    assert "seconds" not in json.dumps(metrics)
    timings = json.loads((finished_run / "artifacts/runs/evaluate/timings.json").read_text())["seconds_per_example"]
    assert set(timings) == {"base_pytorch", "merged_pytorch", BUILT}
    assert all(t["constrained"] > 0 for t in timings.values())
    shown = run([str(Path(sys.executable).with_name("dvc")), "plots", "show", "--json"], finished_run).stdout
    assert f"metrics/confusion/{BUILT}.csv" in shown


def test_report_is_one_self_contained_page(private_run: Path):
    run([sys.executable, "scripts/report.py"], private_run)
    page = (private_run / "reports/report.html").read_text()
    assert page.count("data:image/png;base64,") >= 2  # confusion matrices + loss curve
    assert "<img" in page and 'src="http' not in page
    for needle in ("base_pytorch", "merged_pytorch", BUILT, "macro-F1", "Lineage", "params.yaml"):
        assert needle in page


def test_bench_runs_and_writes_ratios(private_run: Path, tmp_path: Path):
    """Small counts and a mini layout: the benchmark's code path, not its numbers."""
    out = tmp_path / "bench.json"
    args = ["--phrases", "2", "--repeats", "1", "--decode-tokens", "4", "--layout", "64,1,2,128,2112"]
    run([sys.executable, "scripts/bench.py", *args, "--out", str(out)], private_run)
    bench = json.loads(out.read_text())
    # The pipeline's own model as its builder made it (int4 on the weights' grid by default); the medium model in int4.
    for size, built in (("pipeline", BUILT), ("medium", "int4_onnx")):
        for name in (built, "fp32_onnx", "pytorch"):
            m = bench[size][name]
            assert (
                m["latency_p50_ms"] > 0 and m["decode_tokens_per_s"] > 0 and m["size_mb"] > 0 and m["peak_rss_mb"] > 0
            )
            assert m["device"] == "cpu"
        quantized = built.removesuffix("_onnx")
        assert bench[size]["ratios"][f"{quantized}_size_share_of_fp32_onnx"] < 1
    assert bench["machine"]["cores"] >= 1


def test_bench_train_runs_the_stage_and_the_plain_loop_on_the_same_batches(private_run: Path, tmp_path: Path):
    """make bench-train's code path on the tiny run: both sides train 2 and 4 steps on the same data and
    log the same number of loss windows, within 10 % of each other (the tiny model's losses sit near ln(vocab)
    whatever the batch, and the bare `olive run` side adds its LoRA weights from another random state: a
    CI run saw 7.40 vs 7.20), and the figures land in the --out file."""
    out = tmp_path / "bench.json"
    run([sys.executable, "scripts/bench.py", "--train", "--train-steps", "2", "--out", str(out)], private_run)
    training = json.loads(out.read_text())["training"]
    assert set(training["logged_loss"]) == {"2", "4"}
    for pair in training["logged_loss"].values():
        assert len(pair["kit"]) == len(pair["plain"]) >= 1
        for kit, plain in zip(pair["kit"], pair["plain"], strict=True):
            assert kit > 0 and plain > 0 and abs(kit - plain) <= 0.1 * kit, pair
    assert training["settings"]["tokens_per_step"] > 0
    assert isinstance(training["kit_vs_plain_per_step"], float)
    assert not (private_run / "artifacts/bench/train").exists()  # its scratch folder is removed


def test_bench_train_dtypes_trains_the_stage_in_each_dtype_on_the_same_batches(private_run: Path, tmp_path: Path):
    """make bench-train-dtypes' code path on the tiny run: the train stage's Olive pass with the base in fp32
    and in bf16, 2 and 4 steps each; each logs its own losses, and the ratio is of the two per-step times."""
    out = tmp_path / "bench.json"
    args = ["--train", "--train-dtypes", "float32,bfloat16", "--train-steps", "2", "--out", str(out)]
    run([sys.executable, "scripts/bench.py", *args], private_run)
    t = json.loads(out.read_text())["training_dtypes"]
    assert t["steps"] == [2, 4] and set(t["logged_loss"]) == {"float32/2", "bfloat16/2", "float32/4", "bfloat16/4"}
    for key, losses in t["logged_loss"].items():
        assert losses and all(loss > 0 for loss in losses), key
    # Same batches, same start: the two dtypes' first logged losses agree to a few percent.
    first = {d: t["logged_loss"][f"{d}/4"][0] for d in ("float32", "bfloat16")}
    assert abs(first["float32"] - first["bfloat16"]) <= 0.05 * first["float32"], first
    per_step = {d: t[d]["seconds_per_step"] for d in ("float32", "bfloat16")}
    assert t["bfloat16_speedup_vs_fp32"] == pytest.approx(per_step["float32"] / per_step["bfloat16"], abs=0.01)
    assert not (private_run / "artifacts/bench/train_dtypes").exists()  # its scratch folder is removed


def test_bench_formats_builds_and_measures_each_format_beside_its_kernel(private_run: Path, tmp_path: Path):
    """make bench-formats' code path on the tiny run: every format built by the quantize stage's own build,
    measured on the test split, with its kernel's peak and a prompt profile; few phrases, not its numbers."""
    out = tmp_path / "bench.json"
    run([sys.executable, "scripts/bench.py", "--formats", "--batch-phrases", "16", "--out", str(out)], private_run)
    f = json.loads(out.read_text())["formats"]
    assert set(f["formats"]) | set(f["not_measured"]) == {
        "int4_acc4",
        "int4_acc1",
        "int4_grid",
        "int4_grid_acc1",
        "int8",
        "int8_merged",
        "fp32",
        "pytorch_fp32",
        "pytorch_bf16",
    }
    bf16 = f["machine"]["features"]["avx512_bf16"] or f["machine"]["features"]["amx_bf16"]
    assert ("pytorch_bf16" in f["formats"]) == bf16 and ("pytorch_bf16" in f["not_measured"]) == (not bf16)
    for name, r in f["formats"].items():
        assert 0 <= r["accuracy"] <= 1 and r["batch_ms_per_phrase"] > 0 and r["phrases"] == 16, name
        assert r["kernel_peak_gflops"] == f["kernel_peaks_gflops"][r["kernel"]] > 0
        assert r["passes_gate"] == (r["gap_to_merged"] <= f["parity_tolerance"])
    assert f["formats"]["int8"]["batch_invariant"] is False and f["formats"]["fp32"]["batch_invariant"] is True
    assert f["formats"]["int8"]["batched_anyway"]["batch_ms_per_phrase"] > 0
    # The tiny run's builder is the default's: the grid in fp32 compute.
    assert f["chosen"] == "int4_grid_acc1" and f["classify_speedup_vs_int4_reference"] > 0
    assert f["formats"]["int4_grid"]["batch_invariant"] is True  # level 4 rounds activations per row and block
    assert f["formats"]["int4_grid_acc1"]["batch_invariant"] is True
    assert set(f["prompt_profile"]) == {"int4_acc4", "int4_grid_acc1", "fp32"}
    assert set(f["machine"]["features"]) >= {"avx512_vnni", "amx_int8"}


def test_classify_file_json_and_chat(finished_run: Path, tmp_path: Path):
    labels = compose().data.labels
    phrases = tmp_path / "phrases.jsonl"
    phrases.write_text('{"phrase": "I can\'t stop smiling"}\n\n{"phrase": "Something moved in the dark."}\n')
    cli = [sys.executable, "-m", "slmkit.cli"]
    out = run([*cli, "classify", "--file", str(phrases), "--json", "--model", "merged"], finished_run).stdout
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["text"] for r in rows] == ["I can't stop smiling", "Something moved in the dark."]
    assert all(r["label"] in labels for r in rows)
    plain = subprocess.run(
        [*cli, "classify", "--model", "base"],
        input="a plain phrase\n",
        cwd=finished_run,
        env=_env(),
        capture_output=True,
        text=True,
    )
    assert plain.returncode == 0 and plain.stdout.split("\t")[0] in labels, plain.stderr[-2000:]
    reply = run([*cli, "chat", "--json", "I can't stop smiling"], finished_run).stdout
    assert json.loads(reply)["reply"].strip() in labels  # the fine-tuned model answers with a tone
