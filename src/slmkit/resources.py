"""Up-front memory and disk estimates: warn before a stage that may not fit, refuse one that cannot."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from slmkit.config import Config, ModelConfig
from slmkit.stage import ARTIFACTS, StageError

log = logging.getLogger(__name__)

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
PRECISION_BYTES = {"fp32": 4.0, "fp16": 2.0, "int4": 0.5 + 1 / 16}  # int4: 4 bits + a scale per 32 weights
# Below this many times the estimate, a stage is warned about: estimates are rough and tools make copies.
MARGIN = 2.0


def parameters(model: ModelConfig, model_path: str | Path | None = None) -> int | None:
    """Parameter count of the base model: from the tiny sizes, or from a config.json; None when unknown."""
    if model.source == "tiny" and model.tiny is not None:
        t = model.tiny
        h, i, v = t.hidden_size, t.intermediate_size, t.vocab_size
        per_layer = h * 3 * h + h * h + h * 2 * i + i * h + 2 * h  # qkv, o, gate_up, down, two norms
        return 2 * v * h + t.num_hidden_layers * per_layer + h  # embeddings + LM head (untied), final norm
    config = Path(model_path) / "config.json" if model_path else None
    if config is None or not config.is_file():
        return None
    c = json.loads(config.read_text(encoding="utf-8"))
    try:
        h, i, v, n = c["hidden_size"], c["intermediate_size"], c["vocab_size"], c["num_hidden_layers"]
    except KeyError:
        return None
    kv = c.get("num_key_value_heads") or c.get("num_attention_heads") or 1
    heads = c.get("num_attention_heads") or 1
    qkv = h * (h + 2 * kv * (h // heads))
    per_layer = qkv + h * h + h * 2 * i + i * h + 2 * h
    return (1 if c.get("tie_word_embeddings") else 2) * v * h + n * per_layer + h


def need(stage: str, cfg: Config, n_params: int) -> tuple[int, int]:
    """(disk bytes, memory bytes) a stage needs for a model of n_params parameters, roughly."""
    weights = n_params * DTYPE_BYTES[cfg.train.torch_dtype]
    fp32 = n_params * 4
    if stage == "base":
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
