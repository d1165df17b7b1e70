"""`make bench-formats`' measuring parts on small inputs (the bench itself runs on the pipeline's model)."""

from __future__ import annotations

import json
from pathlib import Path

from slmkit import formats


def test_projection_flops_count_every_projection_weight_twice(tiny_model_dirs):
    import torch
    from transformers import AutoModelForCausalLM

    path = tiny_model_dirs["pytorch"]
    model = AutoModelForCausalLM.from_pretrained(path)
    layers = [m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in name]
    head = model.get_output_embeddings().weight.numel()
    f = formats.projection_flops(json.loads((path / "config.json").read_text()))
    assert f["per_token"] == 2 * sum(m.weight.numel() for m in layers)
    assert f["lm_head"] == 2 * head


def test_kernel_peaks_measure_every_kernel_a_format_runs_on():
    peaks = formats.kernel_peaks(32, 64, 96, threads=1, min_seconds=0.01)
    assert set(formats.FORMAT_KERNEL.values()) <= peaks.keys()
    assert all(v > 0 for v in peaks.values())


def test_cpu_features_name_the_flags_it_checks():
    features = formats.cpu_features()
    assert set(features) == set(formats.CPU_FEATURES)
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    assert features["avx2"] == (" avx2" in flags)


def test_classify_run_measures_both_runtimes_on_the_same_phrases(tiny_model_dirs):
    test = [("I love it", "joy"), ("This is awful", "anger"), ("Fine", "neutral")]
    speed = [t for t, _ in test] * 3
    layout = json.loads((tiny_model_dirs["pytorch"] / "config.json").read_text())
    for path, dtype in ((tiny_model_dirs["onnx"], None), (tiny_model_dirs["pytorch"], "bfloat16")):
        r = formats.classify_run(path, speed, test, batch_size=2, threads=1, layout=layout, dtype=dtype)
        assert 0 <= r["accuracy"] <= 1 and r["phrases"] == len(speed)
        assert r["labels_identical_one_at_a_time"] is True
        assert r["batch_ms_per_phrase"] > 0 and r["decode_tokens_per_s"] > 0
        assert r["prompt_gflops"] > 0 and r["prompt_tokens_per_phrase"] > 2


def test_prompt_profile_splits_the_time_by_operator(tiny_model_dirs):
    p = formats.profile_prompt(tiny_model_dirs["onnx"], rows=2, tokens=5, threads=1, passes=2)
    assert p["ms_per_pass"] > 0 and 0.9 <= sum(p["share_by_op"].values()) <= 1.01
    assert "MatMulNBits" in p["share_by_op"]  # the tiny folder is int4


def test_kernel_note_says_what_a_cpu_without_the_features_falls_back_to(tiny_model_dirs):
    none = dict.fromkeys(formats.CPU_FEATURES, False)
    assert "no VNNI" in formats.kernel_note("int8", none) and "AVX2/SSE int8 path" in formats.kernel_note("int8", none)
    assert "VNNI" in formats.kernel_note("int8", {**none, "avx512_vnni": True})
    assert "AMX" in formats.kernel_note("int4", {**none, "amx_int8": True, "avx512_vnni": True})
    assert "AVX2 int8 dot products" in formats.kernel_note("int4", {**none, "avx2": True})
    assert formats.kernel_note("fp32", {**none, "avx2": True}) == "fp32 projections: AVX2"
    assert formats.onnx_precision(tiny_model_dirs["onnx"]) == "int4"
