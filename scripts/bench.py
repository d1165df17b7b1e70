"""`make bench`: latency, decode speed, memory and size of int4 ONNX vs fp32 ONNX vs PyTorch; pipeline overhead.

    python scripts/bench.py                 # the pipeline's models + medium Phi-3-layout model -> metrics/bench.json
    python scripts/bench.py --overhead      # kit's train+merge+quantize vs the same Olive configs by `olive run`
    python scripts/bench.py --serve         # batched vs one-at-a-time classify; `slmkit serve` at 1, 4, 16 clients
    python scripts/bench.py --train         # the train stage's training vs a plain HF + PEFT loop, same batches
    python scripts/bench.py --formats       # each number format: accuracy, speed, and its kernel's peak
    python scripts/bench.py --family        # the recipe's parity gap over neighbouring runs (DVC experiments)

The pipeline models are the last run's (artifacts/merge/model, artifacts/quantize/model) plus an fp32
ONNX build of the merged model. The medium model has the real Phi-3 layout (vocab 32064) at ~220 M
parameters with random weights, built once into artifacts/bench/ and converted by the same Olive
ModelBuilder configs as the quantize stage. Every model is measured on the same test phrases, each in
its own process. Timings are for this machine only: metrics/bench.json records which one.
"""

import argparse
import copy
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from slmkit import bench, olive_config
from slmkit.build import build_onnx
from slmkit.config import QUANTIZED, compose, load_params
from slmkit.data import read_split
from slmkit.files import read_json, write_json
from slmkit.paths import ARTIFACTS, METRICS, onnx_metrics_key, stage_dir
from slmkit.prompt import build_prompt
from slmkit.stage import StageError, log, main

BENCH_JSON = METRICS / "bench.json"
BENCH_DIR = ARTIFACTS / "bench"


def build_plain(cfg, builder: str, hf_model: Path, out: Path) -> Path:
    """A plain model folder (no adapter) built as the quantize stage builds `builder` (conf/builder/<builder>.yaml)."""
    cfg = copy.deepcopy(cfg)
    cfg.builder = dataclasses.replace(compose([f"builder={builder}"]).builder, adapter="merged")
    work = out.with_name(f".olive-{out.name}").resolve()
    shutil.rmtree(work, ignore_errors=True)
    output = build_onnx(cfg, work, hf_model, None, hf_model)
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(
        output, out, ignore=shutil.ignore_patterns("*footprint.json", "model_config.json", "run_history.txt")
    )
    shutil.rmtree(work, ignore_errors=True)
    return out


def medium_models(cfg, layout: bench.MediumModel, texts: list[str]) -> dict[str, Path]:
    """Build (once per layout) the medium model in PyTorch, int4 ONNX and fp32 ONNX form."""
    root = BENCH_DIR / "medium"
    stamp = root / "layout.json"
    wanted = json.dumps({"layout": vars(layout), "seed": cfg.seed}, sort_keys=True)
    paths = {"int4_onnx": root / "int4", "fp32_onnx": root / "fp32", "pytorch": root / "hf"}
    if stamp.exists() and stamp.read_text() == wanted and all(p.exists() for p in paths.values()):
        return paths
    shutil.rmtree(root, ignore_errors=True)
    start = time.perf_counter()
    info = bench.build_medium(paths["pytorch"], texts, cfg.seed, layout)
    log.info("medium model: %d parameters (%.0f s)", info["parameters"], time.perf_counter() - start)
    for name, builder in (("int4_onnx", "int4_cpu"), ("fp32_onnx", "fp32_cpu")):
        start = time.perf_counter()
        build_plain(cfg, builder, paths["pytorch"], paths[name])
        log.info("medium %s built in %.0f s", name, time.perf_counter() - start)
    stamp.write_text(wanted)
    return paths


def measure_all(paths: dict[str, Path], prompts: list[str], args) -> dict:
    results = {}
    for name, path in paths.items():
        log.info("measuring %s (%s)", name, path)
        results[name] = bench.measure_in_subprocess(
            path,
            prompts,
            label_tokens=args.label_tokens,
            decode_tokens=args.decode_tokens,
            repeats=args.repeats,
            threads=args.threads,
        )
        log.info("%s: %s", name, results[name])
    quantized = next((k for k in results if k.endswith("_onnx") and k != "fp32_onnx"), None)
    if quantized and {"fp32_onnx", "pytorch"} <= results.keys():
        results["ratios"] = bench.ratios(quantized, results[quantized], results["pytorch"], results["fp32_onnx"])
    return results


def latency(args) -> dict:
    cfg = load_params()
    test = read_split(stage_dir("prepare") / "test.jsonl")
    prompts = [build_prompt(cfg.data, e.text) for e in test[: args.phrases]]
    out: dict = {"machine": bench.machine(), "phrases": len(prompts), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if cfg.builder.precision not in QUANTIZED:
        raise StageError(
            f"make bench compares the quantized model with fp32 and PyTorch; builder.precision is "
            f"{cfg.builder.precision}: run `make finetune` with builder=int8_cpu or builder=int4_cpu first"
        )
    # The pipeline's own model (the shipped default: SmolLM2-135M), in its three forms.
    pipeline = {
        onnx_metrics_key(cfg.builder.precision): stage_dir("quantize") / "model",
        "fp32_onnx": build_plain(cfg, "fp32_cpu", stage_dir("merge") / "model", BENCH_DIR / "pipeline_fp32"),
        "pytorch": stage_dir("merge") / "model",
    }
    out["pipeline"] = {"model": cfg.model.name, **measure_all(pipeline, prompts, args)}
    if args.layout != "none":
        h, n, heads, inter, vocab = (int(x) for x in args.layout.split(","))
        layout = bench.MediumModel(h, n, heads, inter, vocab)
        train = read_split(stage_dir("prepare") / "train.jsonl")
        paths = medium_models(cfg, layout, [build_prompt(cfg.data, e.text) + e.label for e in train])
        out["medium"] = {"layout": vars(layout), **measure_all(paths, prompts, args)}
    return out


def _timed(cmd: list[str]) -> tuple[float, str]:
    """Wall seconds of a command, and its standard output."""
    # CI=1: Olive then skips its heartbeat, as the kit does (olive_run.opt_out_of_telemetry); without it
    # a bare `olive run` waits ~12 s at exit trying to send it, which is no part of the work compared.
    env = {**os.environ, "OLIVE_DISABLE_TELEMETRY": "1", "CI": "1"}
    start = time.perf_counter()
    result = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode:
        raise StageError(f"{' '.join(cmd)} failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    return seconds, result.stdout


def olive_command(work: Path) -> list[str]:
    """`olive run` with the package config of slmkit's passes (written to `work`); append the config's path."""
    from slmkit import olive_passes

    package = olive_passes.write_package_config(work)
    olive = str(Path(sys.executable).with_name("olive"))
    return [olive, "run", "--package-config", str(package), "--config"]


def _rendered_splits(cfg, base: str, work: Path) -> None:
    """The train and val splits as the train stage hands them to Olive: work/train.jsonl, work/val.jsonl."""
    from transformers import AutoTokenizer

    eos = AutoTokenizer.from_pretrained(base, trust_remote_code=cfg.model.trust_remote_code).eos_token
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    for split in ("train", "val"):
        olive_config.render_split(
            cfg.data, read_split(stage_dir("prepare") / f"{split}.jsonl"), eos, work / f"{split}.jsonl"
        )


def training_dtypes(steps: int, dtypes: list[str]) -> dict:
    """Steady seconds per step of the train stage's Olive LoRA pass with the frozen base in each of `dtypes`
    (train.torch_dtype; the LoRA weights and optimizer state stay fp32 in every case, PEFT's default), on the
    same batches, N and 2N steps each, interleaved by step count."""
    cfg = load_params()
    base = read_json(stage_dir("base") / "base.json")["model_path"]
    work = (BENCH_DIR / "train_dtypes").resolve()
    _rendered_splits(cfg, base, work)
    olive = olive_command(work)
    seconds: dict[str, dict[int, float]] = {d: {} for d in dtypes}
    losses: dict[str, list] = {}
    for n in (steps, 2 * steps):
        for dtype in dtypes:
            run_cfg = copy.deepcopy(cfg)
            t = run_cfg.train
            t.max_steps, t.eval_steps, t.logging_steps = n, n, min(t.logging_steps, n)
            t.torch_dtype = dtype
            out = work / f"{dtype}{n}"
            config = olive_config.train_workflow(run_cfg, base, work / "train.jsonl", work / "val.jsonl", out)
            path = work / f"{dtype}{n}.json"
            path.write_text(json.dumps(config, indent=2))
            seconds[dtype][n], _ = _timed([*olive, str(path)])
            (state,) = (out / "checkpoints").glob("checkpoint-*/trainer_state.json")
            losses[f"{dtype}/{n}"] = [
                round(e["loss"], 4) for e in json.loads(state.read_text())["log_history"] if "loss" in e
            ]
            log.info("%d steps, base in %s: %.1f s", n, dtype, seconds[dtype][n])
    shutil.rmtree(work, ignore_errors=True)
    result: dict = {"steps": [steps, 2 * steps], "batch_size": cfg.train.batch_size, "model": cfg.model.name}
    for dtype, times in seconds.items():
        result[dtype] = {
            "seconds": {str(n): round(s, 1) for n, s in times.items()},
            "seconds_per_step": round((times[2 * steps] - times[steps]) / steps, 3),
        }
    result["logged_loss"] = losses
    if "float32" in seconds:
        for dtype in dtypes:
            if dtype != "float32":
                ratio = result["float32"]["seconds_per_step"] / result[dtype]["seconds_per_step"]
                result[f"{dtype}_speedup_vs_fp32"] = round(ratio, 2)
    result.update(machine=bench.machine(), load_average=round(os.getloadavg()[0], 2))
    result["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    return result


def training(steps: int) -> dict:
    """Steady seconds per step of the train stage's Olive LoRA pass and of a plain HF + PEFT loop
    (slmkit.plain_lora) on the same batches: each side runs `steps` and 2 x `steps` steps in its own process,
    interleaved, and (time(2N) - time(N)) / N cancels what is paid once (imports, model load, the one
    evaluation at the end)."""
    cfg = load_params()
    base = read_json(stage_dir("base") / "base.json")["model_path"]
    work = (BENCH_DIR / "train").resolve()
    _rendered_splits(cfg, base, work)
    olive = olive_command(work)
    seconds: dict[str, dict[int, float]] = {"kit": {}, "plain": {}}
    tokens: dict[int, int] = {}
    losses: dict[int, dict] = {}  # each side's logged loss windows: close only when the batches are the same
    for n in (steps, 2 * steps):
        run_cfg = copy.deepcopy(cfg)
        t = run_cfg.train
        t.max_steps, t.eval_steps, t.logging_steps = n, n, min(t.logging_steps, n)
        config = olive_config.train_workflow(run_cfg, base, work / "train.jsonl", work / "val.jsonl", work / f"kit{n}")
        path = work / f"kit{n}.json"
        path.write_text(json.dumps(config, indent=2))
        seconds["kit"][n], _ = _timed([*olive, str(path)])
        plain_cmd = [sys.executable, "-m", "slmkit.plain_lora", base, str(work / "train.jsonl"), "--steps", str(n)]
        plain, out = _timed(plain_cmd)
        seconds["plain"][n] = plain
        plain_run = json.loads(out.strip().splitlines()[-1])
        tokens[n] = plain_run["tokens"]
        (state,) = (work / f"kit{n}" / "checkpoints").glob("checkpoint-*/trainer_state.json")
        kit_loss = [round(e["loss"], 4) for e in json.loads(state.read_text())["log_history"] if "loss" in e]
        losses[n] = {"kit": kit_loss, "plain": plain_run["logged_loss"]}
        log.info("%d steps: kit (Olive LoRA pass) %.1f s, plain HF + PEFT loop %.1f s", n, seconds["kit"][n], plain)
    shutil.rmtree(work, ignore_errors=True)
    steady_tokens = tokens[2 * steps] - tokens[steps]
    result: dict = {}
    for side, times in seconds.items():
        per_step = (times[2 * steps] - times[steps]) / steps
        result[side] = {
            "seconds": {str(n): round(s, 1) for n, s in times.items()},
            "seconds_per_step": round(per_step, 3),
            "tokens_per_s": round(steady_tokens / (per_step * steps), 1),
        }
    result["logged_loss"] = {str(n): pair for n, pair in losses.items()}
    result["kit_vs_plain_per_step"] = round(result["kit"]["seconds_per_step"] / result["plain"]["seconds_per_step"], 3)
    t = cfg.train
    result["settings"] = {
        "model": cfg.model.name,
        "steps": [steps, 2 * steps],
        "batch_size": t.batch_size,
        "torch_dtype": t.torch_dtype,
        "lora": {"r": cfg.lora.r, "alpha": cfg.lora.alpha, "targets": list(cfg.lora.target_modules or [])},
        "tokens_per_step": round(steady_tokens / steps, 1),
    }
    result.update(machine=bench.machine(), load_average=round(os.getloadavg()[0], 2))
    result["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    return result


def overhead() -> dict:
    """The kit's train+merge+quantize (forced `dvc repro`) vs `olive run` on the same three workflow configs."""
    cfg = load_params()
    base = read_json(stage_dir("base") / "base.json")["model_path"]
    work = (BENCH_DIR / "bare_olive").resolve()
    _rendered_splits(cfg, base, work)
    olive = olive_command(work)
    adapter = work / "train/output/adapter"
    # Built when their turn comes: the separate build reads the adapter the bare train run wrote.
    configs = {
        "train": lambda: olive_config.train_workflow(
            cfg, base, work / "train.jsonl", work / "val.jsonl", work / "train"
        ),
        "merge": lambda: olive_config.merge_workflow(cfg, base, adapter, work / "merge"),
        # As the quantize stage builds: the base + the adapter (builder.adapter=separate), or the merged model.
        "quantize": lambda: (
            olive_config.quantize_workflow(cfg, base, work / "quantize", adapter)
            if cfg.builder.adapter == "separate"
            else olive_config.quantize_workflow(cfg, work / "merge/output/model", work / "quantize")
        ),
    }
    dvc = str(Path(sys.executable).with_name("dvc"))
    bare, kit, load = {}, {}, {}
    # Interleaved, stage by stage, so that load from other work on the machine hits both sides alike.
    for name, config in configs.items():
        path = work / f"{name}.json"
        path.write_text(json.dumps(config(), indent=2))
        bare[name] = round(_timed([*olive, str(path)])[0], 1)
        kit[name] = round(_timed([dvc, "repro", "--force", "--single-item", name])[0], 1)
        load[name] = round(os.getloadavg()[0], 2)
        log.info("%s: bare olive run %.1f s, kit (dvc repro -f -s %s) %.1f s", name, bare[name], name, kit[name])
    shutil.rmtree(work, ignore_errors=True)
    total_kit, total_bare = sum(kit.values()), sum(bare.values())
    return {
        "kit_seconds": kit,
        "bare_olive_seconds": bare,
        "kit_total_s": round(total_kit, 1),
        "bare_total_s": round(total_bare, 1),
        "overhead_ratio": round(total_kit / total_bare, 3),
        "load_average": load,
        "machine": bench.machine(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


# The number formats `make bench-formats` builds and measures side by side: conf/builder options (+ overrides).
FORMATS = {
    "int4_acc4": ["builder=int4_cpu"],  # the int4 reference recipe (MatMulNBits, accuracy level 4)
    "int4_acc1": ["builder=int4_cpu", "builder.int4_accuracy_level=1"],
    # The kit's int4 on the weights' own grid (slmkit.int4) at level 4, and at level 1 (fp32 compute: the default).
    "int4_grid": ["builder=int4_grid_cpu", "builder.int4_accuracy_level=4"],
    "int4_grid_acc1": ["builder=int4_grid_cpu", "builder.int4_accuracy_level=1"],
    "int8": ["builder=int8_cpu"],  # the adapter's branches beside the int8 base, in fp32
    "int8_merged": ["builder=int8_cpu", "builder.adapter=merged"],
    "fp32": ["builder=fp32_cpu"],
}
# The merged model in PyTorch, as saved (fp32) and cast to bf16 at load.
TORCH_FORMATS = {"pytorch_fp32": None, "pytorch_bf16": "bfloat16"}
REFERENCE_FORMAT = "int4_acc4"


def _all_phrases(n: int) -> list[str]:
    """Every phrase of the prepared data (all three splits), repeated up to n."""
    phrases = [
        e.text for split in ("train", "val", "test") for e in read_split(stage_dir("prepare") / f"{split}.jsonl")
    ]
    return (phrases * (n // len(phrases) + 1))[:n]


def formats(args) -> dict:
    """Each format built from this run's base + adapter by the quantize stage's own build (slmkit.build),
    measured in its own process on the same phrases, beside the peak of the kernel it runs on."""
    from slmkit import formats as fm
    from slmkit.inference import default_threads, save_prompt_config

    cfg = load_params()
    if not cfg.data.labels:
        raise StageError("make bench-formats measures a classifier: run `make finetune` on the default data first")
    threads = args.format_threads or default_threads()
    test = [(e.text, e.label) for e in read_split(stage_dir("prepare") / "test.jsonl")]
    speed = _all_phrases(args.batch_phrases)
    base_path = read_json(stage_dir("base") / "base.json")["model_path"]
    merged = stage_dir("merge") / "model"
    root = BENCH_DIR / "formats"
    paths: dict[str, Path] = {}
    builders = {}
    for name, overrides in FORMATS.items():
        run_cfg = copy.deepcopy(cfg)
        run_cfg.builder = compose(overrides).builder
        if cfg.builder.adapter == "merged":  # the run's adapter cannot be kept apart (experiment=tiny, DoRA)
            run_cfg.builder = dataclasses.replace(run_cfg.builder, adapter="merged")
        builders[name] = run_cfg.builder
        work = (root / f".olive-{name}").resolve()
        shutil.rmtree(work, ignore_errors=True)
        start = time.perf_counter()
        output = build_onnx(run_cfg, work, base_path, stage_dir("train") / "adapter", merged)
        paths[name] = root / name
        shutil.rmtree(paths[name], ignore_errors=True)
        shutil.copytree(output, paths[name], ignore=shutil.ignore_patterns("*footprint.json", "run_history.txt"))
        save_prompt_config(cfg.data, paths[name])
        shutil.rmtree(work, ignore_errors=True)
        log.info("%s built in %.0f s", name, time.perf_counter() - start)
    results: dict = {}
    layout = json.loads((merged / "config.json").read_text())
    torch_formats, not_measured = dict(TORCH_FORMATS), {}
    features = fm.cpu_features()
    if not (features["avx512_bf16"] or features["amx_bf16"]):
        not_measured["pytorch_bf16"] = "no bf16 instructions in this CPU (avx512_bf16, amx_bf16)"
        # No bf16 unit: PyTorch emulates bf16 products in software (on the AVX2-only machine one pass over the
        # phrases had not ended after 17 minutes), which says nothing of the format.
        log.info("pytorch_bf16 not measured: %s", not_measured["pytorch_bf16"])
        torch_formats.pop("pytorch_bf16")
    for name, path in [*paths.items(), *((n, merged) for n in torch_formats)]:
        log.info("measuring %s (%s, %d phrases, %d threads)", name, path, len(speed), threads)
        results[name] = fm.classify_in_subprocess(
            path, speed, test, cfg.evaluate.batch_size, threads, layout, torch_formats.get(name)
        )
        log.info("%s: %s", name, results[name])
    rows = round(cfg.evaluate.batch_size * results[REFERENCE_FORMAT]["prompt_tokens_per_phrase"])
    shape = (rows, layout["hidden_size"], layout["intermediate_size"])
    log.info("kernel peaks at %s x %s by %s x %s, %d threads", rows, shape[1], shape[1], shape[2], threads)
    peaks = fm.kernel_peaks(*shape, threads)
    merged_accuracy = results["pytorch_fp32"]["accuracy"]
    tolerance = cfg.evaluate.parity_tolerance
    for name, r in results.items():
        r["kernel"] = fm.FORMAT_KERNEL[name]
        r["kernel_peak_gflops"] = peaks[r["kernel"]]
        if r["prompt_gflops"]:
            r["share_of_kernel_peak"] = round(r["prompt_gflops"] / peaks[r["kernel"]], 3)
        r["gap_to_merged"] = round(merged_accuracy - r["accuracy"], 4)
        r["passes_gate"] = r["gap_to_merged"] <= tolerance
        r["speedup_vs_int4_reference"] = round(
            results[REFERENCE_FORMAT]["batch_ms_per_phrase"] / r["batch_ms_per_phrase"], 2
        )
    chosen = next((name for name, b in builders.items() if b == cfg.builder), None)
    tokens = round(results[REFERENCE_FORMAT]["prompt_tokens_per_phrase"])
    profiles = {}
    for name in dict.fromkeys([REFERENCE_FORMAT, *([chosen] if chosen else []), "fp32"]):
        profiles[name] = fm.profile_prompt(paths[name], cfg.evaluate.batch_size, tokens, threads)
        log.info("%s prompt pass: %s", name, profiles[name])
    out: dict = {
        "machine": bench.machine(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model": cfg.model.name,
        "kernel_shape": list(shape),
        "threads": threads,
        "kernel_peaks_gflops": peaks,
        "formats": results,
        "not_measured": not_measured,
        "reference": REFERENCE_FORMAT,
        "parity_tolerance": tolerance,
        "chosen": chosen,
        "prompt_profile": profiles,
    }
    if chosen:
        out["classify_speedup_vs_int4_reference"] = results[chosen]["speedup_vs_int4_reference"]
        out["chosen_passes_gate"] = results[chosen]["passes_gate"]
    return out


def family(args) -> dict:
    """The recipe (conf/'s default, or --recipe overrides of it) over sweep.family's runs, each a DVC experiment:
    each run's built model against its merged model, the gap the parity gate judges."""
    from slmkit import sweep
    from slmkit.inference import default_threads

    cfg = load_params()
    recipe = list(args.recipe or [])
    rows: dict = {}
    stamp = time.strftime("%Y%m%d-%H%M%S")
    members = sweep.family(cfg.data.path)
    for name, overrides, files in members:
        job_cfg = compose([*recipe, *overrides])
        slug = sweep.experiment_name("family", len(rows)) + f"-{stamp}"
        log.info("family run %d/%d: %s %s", len(rows) + 1, len(members), name, " ".join(recipe + overrides))
        result = sweep.run_job(
            job_cfg, [*recipe, *overrides], BENCH_DIR / "family" / slug, slug, default_threads(), files=files
        )
        metrics, key = result["metrics"], result["objective_model"]
        built, merged = metrics[key]["accuracy"], metrics["merged_pytorch"]["accuracy"]
        rows[name] = {
            "overrides": overrides,
            "model": key,
            "accuracy": built,
            "merged_accuracy": merged,
            "gap_points": round(100 * (merged - built), 2),
            "verdict": metrics["gate"]["verdict"],
            "seconds": result["seconds"],
        }
        log.info("%s: %s", name, rows[name])
    gaps = [r["gap_points"] for r in rows.values()]
    return {
        "recipe": recipe or "default",
        "builder": dataclasses.asdict(compose(recipe).builder),
        "runs": rows,
        "worst_gap_points": max(gaps),
        "mean_gap_points": round(sum(gaps) / len(gaps), 2),
        "all_pass": all(r["verdict"] == "passed" for r in rows.values()),
        "parity_tolerance_points": round(100 * cfg.evaluate.parity_tolerance, 2),
        "machine": bench.machine(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def serving(args) -> dict:
    """Batched vs one-at-a-time classification (both backends), then `slmkit serve` under load (the built model)."""
    cfg = load_params()
    texts = [e.text for e in read_split(stage_dir("prepare") / "test.jsonl")]
    phrases = _all_phrases(args.batch_phrases)
    out: dict = {"machine": bench.machine(), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    built = onnx_metrics_key(cfg.builder.precision)  # the pipeline's ONNX model (int8_onnx by default)
    models = {built: stage_dir("quantize") / "model", "merged_pytorch": stage_dir("merge") / "model"}
    runs = {
        built: [(None, "constrained"), (1, "constrained"), (None, "stop")],
        "merged_pytorch": [(None, "constrained")],
    }
    out["batch_vs_loop"] = {}
    for name, path in models.items():
        for threads, decoding in runs[name]:  # threads None: one per core
            result = bench.batch_vs_loop(path, phrases, cfg.evaluate.batch_size, threads, decoding)
            out["batch_vs_loop"].setdefault(name, []).append(result)
            log.info("%s batched vs one at a time: %s", name, result)
    port = bench.free_port()
    server = bench.start_server(models[built], port, ["--queue-size", str(max(args.concurrency) * 2)])
    # (--queue-size: room for every client, so the figures are of serving, not of refusing)
    url = f"http://127.0.0.1:{port}"
    try:
        bench.load_test(url, texts, 2, 20, 30)  # warm-up: every prompt length the test phrases have, roughly
        out["load"] = []
        for concurrency in args.concurrency:
            result = bench.load_test(url, texts, concurrency, args.requests, args.max_seconds)
            out["load"].append(result)
            log.info("serve, %d concurrent clients: %s", concurrency, result)
    finally:
        server.terminate()
        server.wait(timeout=30)
    out["load_settings"] = {"model": built, "phrases_per_request": 1, "server": "slmkit serve (defaults)"}
    return out


# The second fine-tune of make bench-adapters: a neighbouring run of another rank (one base takes any rank).
SECOND_ADAPTER = ["lora.r=8"]
KEEP = ("artifacts/adapter", "artifacts/quantize")


def adapters(args) -> dict:
    """Two fine-tunes on one base in one `slmkit serve` against a server of one dedicated model: peak memory
    (rss_ratio), requests/s with requests alternating between the adapters (throughput_ratio), and every test
    phrase's label through the shared base against its own dedicated model's (labels_identical)."""
    from slmkit import adapters as ad
    from slmkit import sweep
    from slmkit.inference import default_threads

    overrides = list(args.second or SECOND_ADAPTER)
    slug = f"adapters-{'-'.join(o.replace('=', '').replace('.', '') for o in overrides)}"
    job_dir = BENCH_DIR / "adapters" / slug
    log.info("the second fine-tune (%s): a DVC experiment, reused when cached", " ".join(overrides))
    job = sweep.run_job(compose(overrides), overrides, job_dir, slug, default_threads(), keep=KEEP)
    runs = {"default": Path("."), slug: job_dir}
    folders = {name: ws / "artifacts/adapter/adapter" for name, ws in runs.items()}
    dedicated = {name: ws / "artifacts/quantize/model" for name, ws in runs.items()}
    base = stage_dir("adapter") / "base"
    for name, folder in folders.items():
        ad.check(base, ad.resolve(name, folder))  # a mismatch stops the bench here, saying what differs
    texts = [e.text for e in read_split(stage_dir("prepare") / "test.jsonl")]
    names = list(runs)
    extra = ["--ungated", "--queue-size", str(args.adapter_clients * 2)]  # verdicts recorded below, not judged
    out: dict = {"machine": bench.machine(), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}

    def served(model: Path, flags: list[str], models: list[str] | None) -> dict:
        port = bench.free_port()
        server = bench.start_server(model, port, [*extra, *flags])
        url = f"http://127.0.0.1:{port}"
        try:
            labels = {m: bench.classify_all(url, texts, m) for m in (models or [None])}
            load = bench.load_test(url, texts, args.adapter_clients, args.requests, args.max_seconds, models)
            return {"labels": labels, "load": load, "peak_rss_mb": bench.process_peak_rss_mb(server.pid)}
        finally:
            server.terminate()
            server.wait(timeout=30)

    flags = [f"--adapter={name}={folders[name]}" for name in names]
    shared = served(base, flags, names)
    log.info("one server, %d adapters on one base: %s", len(names), shared["load"])
    alone = {}
    for name in names:
        alone[name] = served(dedicated[name], [], None)
        log.info("dedicated model of %s: %s, peak %.1f MB", name, alone[name]["load"], alone[name]["peak_rss_mb"])
    same = {name: shared["labels"][name] == alone[name]["labels"][None] for name in names}
    first = names[0]
    out.update(
        {
            "adapters": {
                name: {
                    "overrides": overrides if name == slug else [],
                    "verdict": (ad.resolve(name, folders[name]).manifest.get("gate") or {}).get("verdict"),
                    "labels_identical": same[name],
                    "labels_differing": sum(
                        a != b for a, b in zip(shared["labels"][name], alone[name]["labels"][None], strict=True)
                    ),
                }
                for name in names
            },
            "phrases": len(texts),
            "clients": args.adapter_clients,
            # Each server: one with every adapter on the shared base (requests alternating), one per built model.
            "servers": {
                name: {"peak_rss_mb": run["peak_rss_mb"], "requests_per_s": run["load"]["requests_per_s"]}
                for name, run in {"shared": shared, **alone}.items()
            },
            "rss_ratio": round(shared["peak_rss_mb"] / alone[first]["peak_rss_mb"], 3),
            "throughput_ratio": round(shared["load"]["requests_per_s"] / alone[first]["load"]["requests_per_s"], 3),
            "labels_identical": all(same.values()),
            "load": {"shared": shared["load"], **{n: alone[n]["load"] for n in names}},
            "second_run_seconds": job["seconds"],
        }
    )
    return out


def run() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--phrases", type=int, default=32, help="test phrases, the same for every model")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes over the phrases")
    parser.add_argument("--label-tokens", type=int, default=8, help="tokens generated per phrase (classify)")
    parser.add_argument("--decode-tokens", type=int, default=64, help="tokens generated for decode speed")
    parser.add_argument(
        "--layout",
        default="1024,12,16,2816,32064",
        help="medium model: hidden,layers,heads,intermediate,vocab ('none' to skip)",
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="compute threads per model (default 1: see docs/benchmarks.md)"
    )
    parser.add_argument("--overhead", action="store_true", help="measure pipeline overhead instead")
    parser.add_argument(
        "--serve", action="store_true", help="batched vs one-at-a-time classify, and `slmkit serve` under load"
    )
    parser.add_argument(
        "--train", action="store_true", help="the train stage's training vs a plain HF + PEFT loop, same batches"
    )
    parser.add_argument(
        "--formats", action="store_true", help="each number format's accuracy and speed beside its kernel's peak"
    )
    parser.add_argument(
        "--family", action="store_true", help="the recipe over neighbouring runs (ranks, data, seeds): each gap"
    )
    parser.add_argument("--recipe", nargs="*", help="--family: overrides of the recipe to test (default: params.yaml)")
    parser.add_argument("--format-threads", type=int, default=None, help="--formats: threads (default: one per core)")
    parser.add_argument(
        "--train-dtypes",
        default=None,
        help="--train: instead, the train stage with the frozen base in each of these dtypes (float32,bfloat16)",
    )
    parser.add_argument("--train-steps", type=int, default=20, help="--train: N of the N and 2N step runs")
    parser.add_argument("--batch-phrases", type=int, default=1000, help="--serve, --formats: phrases classified")
    parser.add_argument("--concurrency", type=lambda v: [int(x) for x in v.split(",")], default=[1, 4, 16])
    parser.add_argument("--requests", type=int, default=500, help="--serve: requests per concurrency level")
    parser.add_argument("--max-seconds", type=float, default=60, help="--serve: time cap per concurrency level")
    parser.add_argument(
        "--adapters", action="store_true", help="two adapters on one base in one server vs a dedicated model"
    )
    parser.add_argument("--second", nargs="*", help=f"--adapters: overrides of the second run ({SECOND_ADAPTER})")
    parser.add_argument("--adapter-clients", type=int, default=4, help="--adapters: concurrent clients")
    parser.add_argument("--out", type=Path, default=BENCH_JSON)
    args = parser.parse_args()
    results = read_json(args.out) if args.out.exists() else {}
    if args.overhead:
        results["overhead"] = overhead()
    elif args.serve:
        results["serving"] = serving(args)
    elif args.train and args.train_dtypes:
        results["training_dtypes"] = training_dtypes(args.train_steps, args.train_dtypes.split(","))
    elif args.train:
        results["training"] = training(args.train_steps)
    elif args.formats:
        results["formats"] = formats(args)
    elif args.adapters:
        results["adapters"] = adapters(args)
    elif args.family:
        results.setdefault("family", {})[" ".join(args.recipe or []) or "default"] = family(args)
    else:
        results.update(latency(args))
    write_json(args.out, results)
    log.info("wrote %s", args.out)


if __name__ == "__main__":
    main("bench", run)
