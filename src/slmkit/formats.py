"""`make bench-formats`: each number format's speed beside the machine's own peak for its kernel.

- kernel_peaks: GFLOP/s of one matrix product at the model's prompt shape (batch rows x hidden by hidden x
  intermediate) on every kernel the formats use: PyTorch fp32 and bf16 (oneDNN), onnxruntime fp32 MatMul,
  int8 dynamic quantization (DynamicQuantizeMatMul, u8 weights as the kit writes them), int4 MatMulNBits at
  accuracy levels 1 and 4, and the kit's int4 on the weights' grid at levels 4 and 1 (integer zero points plus the
  blocks' minimums: slmkit.int4).
- classify_run (`python -m slmkit.formats MODEL_DIR`, one process per model so its memory is its own):
  accuracy on the test split, batched, constrained decoding; the same phrases one at a time (the labels must
  be the same) and with stop decoding; batched ms/phrase over many phrases; the prompt's GFLOP/s from the
  model's projection sizes and the tokens it read; decode tokens/s (64 tokens, greedy); peak memory; size.
- profile_prompt: where an ONNX model's batched prompt pass spends its time, by operator (onnxruntime's profiler).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

# The CPU features the kernels dispatch on (Linux /proc/cpuinfo flag names).
CPU_FEATURES = ("amx_tile", "amx_bf16", "amx_int8", "avx512_bf16", "avx512_vnni", "avx_vnni", "avx512f", "avx2")
# Tokens generated past the prompt for decode speed (exactly this many: no early stop).
DECODE_TOKENS = 64
# Which kernel each format's projections run on (keys of kernel_peaks).
FORMAT_KERNEL = {
    "int4_acc4": "ort_int4_acc4",
    "int4_acc1": "ort_int4_acc1",
    "int4_grid": "ort_int4_grid",
    "int4_grid_acc1": "ort_int4_grid_acc1",
    "int8": "ort_int8",
    "int8_merged": "ort_int8",
    "fp32": "ort_fp32",
    "pytorch_fp32": "torch_fp32",
    "pytorch_bf16": "torch_bf16",
}


def cpu_features() -> dict[str, bool]:
    """Which of CPU_FEATURES this CPU reports (all False where /proc/cpuinfo is absent)."""
    info = Path("/proc/cpuinfo")
    flags: set[str] = set()
    if info.exists():
        for line in info.read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    return {f: f in flags for f in CPU_FEATURES}


# What onnx_precision calls int4 blocks computed in fp32 (accuracy level 0 or 1: builder=int4_grid_cpu).
INT4_FP32_COMPUTE = "int4 (fp32 compute)"


def onnx_precision(path: Path) -> str:
    """int8, int4, INT4_FP32_COMPUTE or fp32: how an ONNX model folder's projections compute (read from its
    graph's operators and, for int4, their accuracy level: at 4 onnxruntime rounds the input to int8)."""
    import onnx

    graph = onnx.load(str(path / "model.onnx"), load_external_data=False).graph
    ops = {n.op_type for n in graph.node}
    if ops & {"MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat"}:
        return "int8"
    nbits = [n for n in graph.node if n.op_type == "MatMulNBits"]
    if not nbits:
        return "fp32"
    levels = {next((a.i for a in n.attribute if a.name == "accuracy_level"), 0) for n in nbits}
    return INT4_FP32_COMPUTE if levels <= {0, 1} else "int4"


def kernel_note(precision: str, features: dict[str, bool] | None = None) -> str:
    """One line on which of this CPU's kernels a model's projections run on, and what they fell back to."""
    f = features if features is not None else cpu_features()
    vnni = f.get("avx512_vnni") or f.get("avx_vnni")
    fp32 = "AVX-512" if f.get("avx512f") else "AVX2" if f.get("avx2") else "SSE fallback"
    if precision == INT4_FP32_COMPUTE:
        return f"{precision} projections: int4 blocks unpacked in fp32 kernels ({fp32}); activations not rounded"
    if precision in ("int8", "int4"):
        if f.get("amx_int8"):
            unit = "AMX int8 tiles"
        elif vnni:
            unit = "VNNI int8 dot products"
        elif precision == "int8":
            unit = (
                "no VNNI on this CPU: onnxruntime's AVX2/SSE int8 path (u8 weights keep it exact; measured slower "
                "than fp32 here: metrics/int8_no_vnni_run.json, builder=fp32_cpu)"
            )
        else:
            unit = "no VNNI on this CPU: onnxruntime's AVX2 int8 dot products, the input rounded to int8 per block"
        return f"{precision} projections: {unit}"
    return f"fp32 projections: {fp32}"


def _rate(fn, flops: float, min_seconds: float) -> float:
    """GFLOP/s of `fn` (one product of `flops`), best of three timed windows after a warm-up."""
    fn()
    best = 0.0
    for _ in range(3):
        n, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < min_seconds:
            fn()
            n += 1
        best = max(best, flops * n / elapsed / 1e9)
    return round(best, 1)


def _ort_matmul(folder: Path, weight, name: str):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    m, k = None, weight.shape[0]
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="/proj/MatMul")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(weight, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    path = folder / f"{name}.onnx"
    onnx.save(model, str(path))
    return path


def kernel_peaks(m: int, k: int, n: int, threads: int, min_seconds: float = 0.5) -> dict[str, float]:
    """GFLOP/s of an (m x k) by (k x n) product on each kernel, `threads` compute threads each."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    from slmkit import int4, int8

    flops = 2.0 * m * k * n
    rng = np.random.default_rng(0)
    x = rng.standard_normal((m, k), dtype=np.float32)
    w = (rng.standard_normal((k, n), dtype=np.float32) * 0.05).astype(np.float32)
    peaks: dict[str, float] = {}
    torch.set_num_threads(threads)
    tx, tw = torch.from_numpy(x), torch.from_numpy(w)
    peaks["torch_fp32"] = _rate(lambda: tx @ tw, flops, min_seconds)
    bx, bw = tx.bfloat16(), tw.bfloat16()
    peaks["torch_bf16"] = _rate(lambda: bx @ bw, flops, min_seconds)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        fp32 = _ort_matmul(folder, w, "fp32")
        models = {"ort_fp32": fp32}
        weight_type = getattr(QuantType, int8.WEIGHT_TYPE_NAME)  # the int8 recipe's weights
        quantize_dynamic(fp32, folder / "int8.onnx", weight_type=weight_type, per_channel=True)
        models["ort_int8"] = folder / "int8.onnx"
        for level in (1, 4):
            quantizer = MatMulNBitsQuantizer(onnx.load(str(fp32)), block_size=32, accuracy_level=level)
            quantizer.process()
            quantizer.model.save_model_to_file(str(folder / f"int4_{level}.onnx"))
            models[f"ort_int4_acc{level}"] = folder / f"int4_{level}.onnx"
        for level, name in ((4, "ort_int4_grid"), (1, "ort_int4_grid_acc1")):
            grid = folder / name
            grid.mkdir()
            shutil.copy(fp32, grid / "model.onnx")
            int4.quantize(grid, [], 32, level)
            models[name] = grid / "model.onnx"
        for name, path in models.items():
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            peaks[name] = _rate(lambda s=session: s.run(None, {"x": x}), flops, min_seconds)
    return peaks


def projection_flops(config: dict) -> dict[str, int]:
    """FLOPs of a Llama/Phi-3-layout model's projections: per token through the layers, and the LM head once."""
    h, layers, inter = config["hidden_size"], config["num_hidden_layers"], config["intermediate_size"]
    heads = config["num_attention_heads"]
    kv = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or h // heads
    per_layer = h * heads * head_dim + 2 * h * kv * head_dim + heads * head_dim * h + 3 * h * inter
    return {"per_token": 2 * layers * per_layer, "lm_head": 2 * h * config["vocab_size"]}


def classify_run(
    path: Path,
    speed_texts: list[str],
    test: list[tuple[str, str]],
    batch_size: int,
    threads: int,
    layout: dict,
    dtype: str | None = None,
) -> dict:
    """Accuracy, batched speed, the prompt's GFLOP/s, decode tokens/s and memory of one model folder.

    `layout`: the model's config.json (Hugging Face's: the sizes its projections have)."""
    from slmkit.bench import _Genai, _Torch, folder_size, peak_rss_kb
    from slmkit.inference import Classifier, GenaiModel, TorchModel, load_prompt_config
    from slmkit.prompt import build_prompt

    data = load_prompt_config(path)
    genai = (path / "genai_config.json").exists()
    model = GenaiModel(path, threads=threads) if genai else TorchModel(path, threads=threads, dtype=dtype)
    clf = Classifier(model, data, batch_size=batch_size)
    texts, gold = [t for t, _ in test], [label for _, label in test]
    clf.classify(speed_texts[: batch_size * 2])  # warm-up: first calls allocate
    batched = [p.label for p in clf.classify(texts)]
    one = [p.label for p in clf.classify(texts, batch_size=1)]
    stop = [p.label for p in clf.classify(texts, decoding="stop")]
    start = time.perf_counter()
    clf.classify(speed_texts)
    seconds = time.perf_counter() - start
    variant = None
    if not clf.batch_invariant:  # what batching would give, had its labels not depended on the batch
        clf.allow_batch_variance = True
        labels = [p.label for p in clf.classify(texts)]
        start = time.perf_counter()
        clf.classify(speed_texts)
        variant = {
            "batch_ms_per_phrase": round(1000 * (time.perf_counter() - start) / len(speed_texts), 2),
            "accuracy": round(sum(p == g for p, g in zip(labels, gold, strict=True)) / len(gold), 4),
            "labels_differing_from_one_at_a_time": sum(p != q for p, q in zip(labels, one, strict=True)),
        }
        clf.allow_batch_variance = False
    tokens = sum(len(model.encode(build_prompt(data, t))) for t in speed_texts)
    f = projection_flops(layout)
    prompt_gflops = round((tokens * f["per_token"] + len(speed_texts) * f["lm_head"]) / seconds / 1e9, 1)
    rss = peak_rss_kb()  # before the decode runner loads the model a second time
    invariant = clf.batch_invariant
    del clf, model
    runner = _Genai(path, threads) if genai else _Torch(path, threads, dtype=dtype)
    ids = runner.encode(build_prompt(data, texts[0]))
    runner.run(ids, 4)
    stamps = runner.run(ids, DECODE_TOKENS)
    return {
        "accuracy": round(sum(p == g for p, g in zip(batched, gold, strict=True)) / len(gold), 4),
        "stop_accuracy": round(sum(p == g for p, g in zip(stop, gold, strict=True)) / len(gold), 4),
        "labels_identical_one_at_a_time": batched == one,
        "batch_invariant": invariant,
        "batched_anyway": variant,
        "phrases": len(speed_texts),
        "batch_ms_per_phrase": round(1000 * seconds / len(speed_texts), 2),
        "prompt_tokens_per_phrase": round(tokens / len(speed_texts), 1),
        "prompt_gflops": prompt_gflops,
        "decode_tokens_per_s": round((len(stamps) - 1) / (stamps[-1] - stamps[0]), 1),
        "peak_rss_mb": round(rss / 1024, 1),
        "size_mb": round(folder_size(path) / 1e6, 1),
        "threads": threads,
        "batch_size": batch_size,
        "load_average": round(os.getloadavg()[0], 2),
    }


def profile_prompt(path: Path, rows: int, tokens: int, threads: int, passes: int = 5) -> dict:
    """Where one batched prompt pass of an ONNX model spends its time: onnxruntime's profiler over the decoder
    graph (`rows` prompts of `tokens` tokens, no cache), as shares of the kernels' time by operator type, and
    the full-precision MatMuls split into the down projections, LoRA branches and the rest."""
    import collections

    import numpy as np
    import onnxruntime as ort

    model = json.loads((path / "genai_config.json").read_text())["model"]
    decoder = {**model["decoder"], "vocab_size": model["vocab_size"]}
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.enable_profiling = True
    with tempfile.TemporaryDirectory() as tmp:
        options.profile_file_prefix = str(Path(tmp) / "profile")
        session = ort.InferenceSession(str(path / "model.onnx"), options, providers=["CPUExecutionProvider"])
        rng = np.random.default_rng(0)
        feeds = {
            "input_ids": rng.integers(0, decoder["vocab_size"], (rows, tokens), dtype=np.int64),
            "attention_mask": np.ones((rows, tokens), np.int64),
        }
        empty = np.zeros((rows, decoder["num_key_value_heads"], 0, decoder["head_size"]), np.float32)
        for i in range(decoder["num_hidden_layers"]):
            feeds[f"past_key_values.{i}.key"] = feeds[f"past_key_values.{i}.value"] = empty
        names = {i.name for i in session.get_inputs()}
        feeds = {k: v for k, v in feeds.items() if k in names}
        start = time.perf_counter()
        for _ in range(passes):
            session.run(None, feeds)
        seconds = (time.perf_counter() - start) / passes
        events = json.loads(Path(session.end_profiling()).read_text())
    by_op: collections.Counter = collections.Counter()
    matmul: collections.Counter = collections.Counter()
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time"):
            continue
        op = e["args"]["op_name"]
        by_op[op] += e["dur"]
        if op == "MatMul":
            part = "lora" if "/lora_" in e["name"] else "down_proj" if "/down_proj/" in e["name"] else "other"
            matmul[part] += e["dur"]
    total = sum(by_op.values())
    return {
        "rows": rows,
        "tokens": tokens,
        "threads": threads,
        "ms_per_pass": round(1000 * seconds, 1),
        "share_by_op": {k: round(v / total, 3) for k, v in by_op.most_common() if v / total >= 0.001},
        "fp32_matmul_share": {k: round(v / total, 3) for k, v in matmul.most_common()},
    }


def classify_in_subprocess(
    path: Path, speed_texts, test, batch_size: int, threads: int, layout: dict, dtype=None
) -> dict:
    """classify_run in a fresh Python process (its peak memory and warm caches are the model's own)."""
    import subprocess

    args = [sys.executable, "-m", "slmkit.formats", str(path), "--batch-size", str(batch_size)]
    args += ["--threads", str(threads)] + (["--dtype", dtype] if dtype else [])
    payload = json.dumps({"speed": speed_texts, "test": test, "layout": layout})
    result = subprocess.run(args, input=payload, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"benchmark of {path} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _main() -> None:
    parser = argparse.ArgumentParser(description="classify_run on one model folder; texts as JSON on stdin")
    parser.add_argument("path", type=Path)
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--dtype", default=None, help="PyTorch only: load the weights as this dtype (bfloat16)")
    args = parser.parse_args()
    payload = json.loads(sys.stdin.read())
    test = [tuple(row) for row in payload["test"]]
    result = classify_run(
        args.path, payload["speed"], test, args.batch_size, args.threads, payload["layout"], args.dtype
    )
    print(json.dumps(result))


if __name__ == "__main__":
    _main()
