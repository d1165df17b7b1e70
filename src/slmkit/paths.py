"""Where the pipeline's files are: the stage list (dvc.yaml's), each stage's output folder, the metrics."""

from __future__ import annotations

from pathlib import Path

ARTIFACTS = Path("artifacts")
METRICS = Path("metrics")
TRAIN_LOSS_CSV = METRICS / "train_loss.csv"  # written by `train` (DVC plot)
EVAL_JSON = METRICS / "eval.json"  # written by `evaluate` (DVC metrics)


def onnx_metrics_key(precision: str) -> str:
    """The key of the built ONNX model's metrics in eval.json: `int4_onnx`, `fp32_onnx`, ... (by builder)."""
    return f"{precision}_onnx"


CONFUSION_DIR = METRICS / "confusion"  # <model>.csv, written by `evaluate` (DVC confusion plots)
# dvc.yaml of the checkout slmkit is installed from (-e); else the one where the pipeline runs (the
# container installs slmkit from /build/src and runs the pipeline in the mounted /workspace).
DVC_YAML = Path(__file__).resolve().parents[2] / "dvc.yaml"


def _pipeline_stages(path: Path | None = None) -> tuple[str, ...]:
    """The pipeline's stages in order, read from dvc.yaml: the one list (the Makefile reads it too).

    Without a dvc.yaml (slmkit installed only to load a model) there is no pipeline: no stages.
    """
    import yaml

    path = path or next((p for p in (DVC_YAML, Path("dvc.yaml")) if p.is_file()), None)
    if path is None or not path.is_file():
        return ()
    stages = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("stages")
    if not isinstance(stages, dict) or not stages:
        raise RuntimeError(f"{path}: no `stages:` mapping; restore dvc.yaml from git (`git checkout dvc.yaml`)")
    return tuple(stages)


# The pipeline, in order (dvc.yaml's order). scripts/<stage>.py, `make <stage>` and artifacts/<stage>/ follow it.
STAGES = _pipeline_stages()


def stage_dir(stage: str) -> Path:
    if STAGES and stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; stages (dvc.yaml): {', '.join(STAGES)}")
    return ARTIFACTS / stage
