"""Up-front memory and disk estimates: warn before a stage that may not fit, refuse one that cannot."""

from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path

from slmkit import arch
from slmkit.config import Config, ModelConfig
from slmkit.paths import ARTIFACTS
from slmkit.stage import StageError

log = logging.getLogger(__name__)

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# int4: 4 bits + a scale per 32 weights; int8: a byte (+ a scale per output channel)
PRECISION_BYTES = {"fp32": 4.0, "fp16": 2.0, "int8": 1.0, "int4": 0.5 + 1 / 16}
# Below this many times the estimate, a stage is warned about: estimates are rough and tools make copies.
MARGIN = 2.0


def parameters(model: ModelConfig, model_path: str | Path | None = None) -> int | None:
    """Parameter count of the base model, counted on the meta device (no memory, no weights).

    The layout comes from the config (tiny sizes, model.architecture, a local model's config.json) or
    else from the config.json in model_path (a downloaded hub model); None when it is unknown."""
    try:
        net = arch.meta_model(model)
        if net is None and model_path and (Path(model_path) / "config.json").is_file():
            net = arch.meta_model(dataclasses.replace(model, source="local", path=str(model_path)))
    except (OSError, ValueError, KeyError) as err:  # a config.json transformers cannot read
        log.info("parameter count unknown (%s): %s", model_path or model.path, err)
        return None
    return None if net is None else arch.parameter_count(net)


def peak_memory() -> dict[str, float | None]:
    """This process's peak GPU memory (None without CUDA) and peak resident memory, in GiB."""
    import resource

    import torch

    gpu = round(torch.cuda.max_memory_allocated() / 2**30, 3) if torch.cuda.is_available() else None
    return {
        "peak_gpu_memory_gib": gpu,
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
    }


def need(stage: str, cfg: Config, n_params: int) -> tuple[int, int]:
    """(disk bytes, memory bytes) a stage needs for a model of n_params parameters, roughly."""
    weights = n_params * DTYPE_BYTES[cfg.train.torch_dtype]
    fp32 = n_params * 4
    if stage == "base":
        if cfg.model.source == "gguf":
            return fp32, 3 * fp32  # the fp32 folder; GGUF tensors, dequantized copy and the saved model
        if cfg.model.source != "tiny":
            return 0, 0  # hub and local weights are used where they are, not copied
        return fp32, 4 * fp32  # weights + gradients + two Adam moments for the warm-up
    if stage == "train":
        return weights // 4, 2 * weights  # adapter + checkpoints; frozen weights + activations
    if stage == "merge":
        return 2 * weights, 2 * weights  # Olive's output + our copy; base and merged in memory
    if stage == "quantize":
        built = int(n_params * PRECISION_BYTES[cfg.builder.precision])
        return 2 * built + weights, 2 * weights  # builder output + our copy + ModelBuilder's scratch
    return 0, weights


def available_memory() -> int | None:
    """MemAvailable from /proc/meminfo, in bytes (None where there is no /proc)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def check(what: str, needed: int, available: int | None, where: str, fix: str) -> None:
    """Refuse if `needed` > `available`; warn if within MARGIN of it."""
    if available is None or needed <= 0:
        return
    mb = f"needs about {needed / 1e6:.0f} MB of {what}, {available / 1e6:.0f} MB available {where}"
    if needed > available:
        raise StageError(f"{mb}: it cannot fit. {fix}")
    if needed * MARGIN > available:
        log.warning("%s: it may not fit. %s", mb, fix)


def preflight(stage: str, cfg: Config, model_path: str | Path | None = None, out: Path = ARTIFACTS) -> None:
    """Check, before a stage starts, that its estimated disk and memory needs fit this machine."""
    n = parameters(cfg.model, model_path)
    if n is None:
        log.info("stage %s: model size unknown before it is downloaded; no resource check", stage)
        return
    disk, memory = need(stage, cfg, n)
    out.mkdir(parents=True, exist_ok=True)
    log.info(
        "stage %s: %.1f M parameters; needs about %.0f MB disk, %.0f MB memory",
        stage,
        n / 1e6,
        disk / 1e6,
        memory / 1e6,
    )
    check("disk", disk, shutil.disk_usage(out).free, f"on the filesystem of {out.resolve()}", "Free disk space.")
    check(
        "memory",
        memory,
        available_memory(),
        "on this machine",
        "Close other programs, use a smaller model or train.torch_dtype=bfloat16.",
    )
