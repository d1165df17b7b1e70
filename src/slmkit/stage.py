"""What every pipeline stage shares: its output folder, atomic writes, logging and user-facing errors."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

ARTIFACTS = Path("artifacts")
METRICS = Path("metrics")
TRAIN_LOSS_CSV = METRICS / "train_loss.csv"  # written by `train` (DVC plot)
EVAL_JSON = METRICS / "eval.json"  # written by `evaluate` (DVC metrics)
CONFUSION_DIR = METRICS / "confusion"  # <model>.csv, written by `evaluate` (DVC confusion plots)
# The pipeline, in order. dvc.yaml, the Makefile and scripts/ use the same names.
STAGES = ("prepare", "base", "train", "merge", "quantize", "evaluate")

log = logging.getLogger("slmkit")


def stage_dir(stage: str) -> Path:
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
    return ARTIFACTS / stage


def setup_logging() -> None:
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    # Olive sends anonymous usage data at exit unless told not to; it also costs seconds per stage.
    os.environ.setdefault("OLIVE_DISABLE_TELEMETRY", "1")


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a fresh temporary folder next to `final`; move it into place only if the block succeeds.

    A crash or kill leaves the previous `final` (or none), never a half-written one.
    """
    final = Path(final)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def write_text(path: Path, text: str) -> None:
    """Write a file atomically (temp file + rename): readers see the old or the new content, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def write_json(path: Path, data: object) -> None:
    write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))


class StageError(RuntimeError):
    """A stage could not produce a valid output; the message says why and what to do."""


def main(stage: str, body: Callable[[], None]) -> None:
    """Run a stage's body: user mistakes print one clear message and exit 1, not a traceback."""
    from slmkit.config import ConfigError
    from slmkit.data import DataError

    setup_logging()
    start = time.perf_counter()
    log.info("stage %s: start", stage)
    try:
        body()
    except (ConfigError, DataError, StageError) as err:
        print(f"\nslmkit {stage}: error: {err}", file=sys.stderr)
        sys.exit(1)
    log.info("stage %s: done in %.1f s", stage, time.perf_counter() - start)
