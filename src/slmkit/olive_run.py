"""Run an Olive workflow, keep its log, and check what it produced: Olive can exit 0 after a pass failed."""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
from pathlib import Path

from slmkit.interrupt import raise_if_interrupted
from slmkit.paths import stage_dir
from slmkit.redact import RedactFilter, redact_all_handlers
from slmkit.stage import StageError

# What each Olive-driven stage keeps of its Olive run: the config (stable) in its output, the log (times,
# timings) in its run folder, outside the DVC-tracked output (slmkit.lineage).
RECORD_FILES = ("olive_config.json",)
RUN_FILES = ("olive.log",)

log = logging.getLogger(__name__)


def _relevant_lines(log_path: Path, limit: int = 12) -> str:
    """The lines of Olive's log that say what went wrong (errors and the last traceback line)."""
    if not log_path.exists():
        return "(no Olive log)"
    lines = log_path.read_text(encoding="utf-8", errors="replace").splitlines()
    picked = [ln for ln in lines if "ERROR" in ln or "Error" in ln or "Exception" in ln]
    return "\n".join(f"    {ln[:300]}" for ln in (picked or lines)[-limit:])


def opt_out_of_telemetry() -> None:
    """Make OLIVE_DISABLE_TELEMETRY=1 (slmkit's default) a complete opt-out, and exits prompt.

    Olive 0.13 queues a heartbeat event *before* it reads OLIVE_DISABLE_TELEMETRY (by design, Olive PR
    #2405); without a network the exporter then retries for ~12 s when the process exits. Disabled, it
    still counts the events it drops and waits 2 s at exit for their (never coming) delivery. Measured
    on the merge stage: 20.9 s wall for 8.3 s of work. Olive checks its CI variables before the
    heartbeat, so the telemetry singleton is created here with CI set (then CI is put back), shut down
    at once, and left without a logger: its log() and shutdown() do nothing without one."""
    if os.environ.get("OLIVE_DISABLE_TELEMETRY") != "1":
        return
    saved = os.environ.get("CI")
    os.environ["CI"] = "1"
    try:
        from olive.telemetry.telemetry import Telemetry

        telemetry = Telemetry()
        telemetry.shutdown(timeout_millis=0, callback_timeout_millis=0)
        telemetry._logger = telemetry._cache_handler = None
    except ImportError:  # another Olive version: nothing to do
        pass
    finally:
        if saved is None:
            del os.environ["CI"]
        else:
            os.environ["CI"] = saved


def run_workflow(config: dict, work_dir: Path, what: str, package_config: Path | None = None) -> Path:
    """Run `config` with Olive, logging to work_dir/olive.log; return Olive's output folder.

    `package_config`: the file of Olive's package config that registers slmkit's own passes
    (slmkit.olive_passes.write_package_config), for a workflow that uses them."""
    opt_out_of_telemetry()
    from olive.workflows import run

    redact_all_handlers()  # Olive logs to the console through its own handler
    work_dir.mkdir(parents=True, exist_ok=True)
    (work_dir / "olive_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    log_path = work_dir / "olive.log"
    handler = logging.FileHandler(log_path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
    handler.addFilter(RedactFilter())
    olive_logger = logging.getLogger("olive")
    olive_logger.addHandler(handler)
    log.info("running Olive %s (log: %s)", what, log_path)
    try:
        package = str(package_config) if package_config else None
        run(copy.deepcopy(config), package_config=package)  # Olive mutates the dict it is given
    except Exception as err:
        raise StageError(
            f"Olive {what} failed: {type(err).__name__}: {err}\n{_relevant_lines(log_path)}\n  full log: {log_path}"
        ) from err
    finally:
        olive_logger.removeHandler(handler)
        handler.close()
    raise_if_interrupted()  # Olive may have caught the signal's exception and carried on
    return Path(config["output_dir"])


def require(paths: list[Path], what: str, log_path: Path) -> None:
    """Fail the stage if Olive did not write the expected files (it may exit 0 after a failed pass)."""
    missing = [p for p in paths if not p.exists() or (p.is_file() and p.stat().st_size == 0)]
    if missing:
        names = ", ".join(str(p) for p in missing)
        raise StageError(
            f"Olive {what} produced no usable output (missing or empty: {names}).\n"
            f"{_relevant_lines(log_path)}\n  full log: {log_path}"
        )


def tensor_names(files: list[Path], what: str, log_path: Path) -> list[str]:
    from safetensors import safe_open

    names: list[str] = []
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                names += list(f.keys())
        except Exception as err:
            raise StageError(
                f"Olive {what} wrote {file}, but it is not a readable safetensors file ({err}).\n"
                f"{_relevant_lines(log_path)}\n  full log: {log_path}"
            ) from None
    return names


def lora_matrices(adapter: Path, log_path: Path) -> list[str]:
    """The names of the LoRA A and B matrices the trained adapter holds."""
    names = tensor_names([adapter / "adapter_model.safetensors"], "LoRA training", log_path)
    return [n for n in names if "lora_A" in n or "lora_B" in n]


def check_adapter(adapter: Path, target_modules: list[str], log_path: Path) -> None:
    """Fail unless the adapter holds LoRA A and B weights for every configured target module."""
    names = tensor_names([adapter / "adapter_model.safetensors"], "LoRA training", log_path)
    lora = [n for n in names if "lora_" in n]
    missing = [m for m in target_modules if not any(f".{m}." in n for n in lora)]
    if not lora or missing:
        raise StageError(
            f"Olive LoRA training wrote an adapter without LoRA weights for {missing or target_modules} "
            f"(lora.target_modules); it has {len(names)} tensors.\n  full log: {log_path}"
        )


# adapter_config.json keys PEFT keeps as sets and writes as lists in set order, which follows Python's
# per-process string hashing: seen, two runs with byte-identical weights wrote target_modules in two
# orders, and DVC reran everything downstream of an unchanged adapter.
SET_VALUED_ADAPTER_KEYS = ("target_modules", "exclude_modules")


def canonical_adapter_config(adapter: Path) -> None:
    """Rewrite adapter/adapter_config.json with its set-valued lists sorted, so the same adapter is the same bytes."""
    path = adapter / "adapter_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    for key in SET_VALUED_ADAPTER_KEYS:
        if isinstance(config.get(key), list):
            config[key] = sorted(config[key])
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def check_merged(model: Path, log_path: Path) -> None:
    """Fail unless the merged model's weights are readable and hold no LoRA tensors (the merge happened)."""
    files = sorted(model.glob("*.safetensors"))
    names = tensor_names(files, "adapter merge", log_path)
    left = [n for n in names if "lora_" in n]
    if not names or left:
        raise StageError(
            f"Olive adapter merge wrote {model} with {len(names)} tensors, {len(left)} of them still LoRA "
            f"weights: the adapter was not merged.\n{_relevant_lines(log_path)}\n  full log: {log_path}"
        )


def check_lora_branches(model: Path, expected: int, log_path: Path) -> None:
    """Fail unless ModelBuilder built the adapter's LoRA branches (builder.adapter=separate), all of them
    in full precision: a branch it skipped would silently drop part of the fine-tuning, and one it
    quantized would put int4 rounding back on the adapter."""
    import onnx

    graph = onnx.load(str(model / "model.onnx"), load_external_data=False).graph
    branches = [n for n in graph.node if "/lora_A/" in n.name or "/lora_B/" in n.name]
    quantized = sorted(n.name for n in branches if n.op_type != "MatMul")
    if len(branches) != expected or quantized:
        raise StageError(
            f"ModelBuilder wrote {model / 'model.onnx'} with {len(branches)} LoRA-branch nodes where the adapter "
            f"has {expected} LoRA matrices, {len(quantized)} of them quantized ({quantized[:3]}): "
            "the adapter is not kept apart in full precision (builder.adapter=separate). Use "
            f"builder.adapter=merged.\n{_relevant_lines(log_path)}\n  full log: {log_path}"
        )


def check_excluded(model: Path, modules: list[str], log_path: Path) -> None:
    """Fail unless every module of builder.exclude has its base MatMuls in full precision and none quantized:
    a name the model does not use would be ignored by ModelBuilder (and slmkit.int8), silently."""
    import onnx

    graph = onnx.load(str(model / "model.onnx"), load_external_data=False).graph
    for module in modules:
        nodes = [n for n in graph.node if f"/{module}/MatMul" in n.name and "/lora_" not in n.name]
        kept = [n for n in nodes if n.op_type == "MatMul"]
        if not kept or len(kept) != len(nodes):
            raise StageError(
                f"builder.exclude names {module!r}, but the build wrote {len(kept)} full-precision and "
                f"{len(nodes) - len(kept)} quantized MatMuls for it in {model / 'model.onnx'}: use the model's module "
                f"names (lora.target_modules has them).\n  full log: {log_path}"
            )


def check_logits(model: Path, pruned: bool, log_path: Path) -> None:
    """Fail unless the model's logits cover the positions the config asked for: the last one alone with
    builder.prune_lm_head (ModelBuilder ignores the option, e.g. beside exclude_lm_head, and exits 0)."""
    import onnx

    graph = onnx.load(str(model / "model.onnx"), load_external_data=False).graph
    outputs = {o.name: o.type.tensor_type.shape.dim for o in graph.output}
    if "logits" not in outputs:
        raise StageError(f"ModelBuilder wrote {model / 'model.onnx'} without a logits output.\n  full log: {log_path}")
    positions = outputs["logits"][1]
    if pruned != (positions.dim_value == 1):
        got = positions.dim_value or positions.dim_param
        raise StageError(
            f"ModelBuilder wrote {model / 'model.onnx'} with logits over {got!r} positions, but "
            f"builder.prune_lm_head={str(pruned).lower()}: the LM head was {'not ' if pruned else ''}pruned to "
            f"the last position.\n{_relevant_lines(log_path)}\n  full log: {log_path}"
        )


def scratch_dir(stage: str) -> Path:
    """Where a stage runs Olive (artifacts/.olive-<stage>)."""
    return stage_dir(stage).with_name(f".olive-{stage}")


def scratch(stage: str) -> Path:
    """A clean work folder for a stage's Olive run: kept after a failure (its log), removed after success."""
    work = scratch_dir(stage)
    shutil.rmtree(work, ignore_errors=True)
    return work


def keep_record(work: Path, out: Path, stage: str) -> None:
    """Copy the Olive config that made an output into the output folder, and Olive's log to the run folder."""
    from slmkit.lineage import run_dir

    for name in RECORD_FILES:
        shutil.copy2(work / name, out / name)
    run_dir(stage).mkdir(parents=True, exist_ok=True)
    for name in RUN_FILES:
        shutil.copy2(work / name, run_dir(stage) / name)
