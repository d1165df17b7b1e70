"""What every pipeline stage shares: its output folder, atomic writes, logging and user-facing errors."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterator
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

log = logging.getLogger("slmkit")


def stage_dir(stage: str) -> Path:
    if STAGES and stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; stages (dvc.yaml): {', '.join(STAGES)}")
    return ARTIFACTS / stage


# Environment variables whose values never go into a log or an error message.
SECRET_ENV = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|API_KEY|ACCESS_KEY|CREDENTIAL", re.IGNORECASE)
# Hugging Face user/org tokens, wherever they come from.
SECRET_PATTERN = re.compile(r"\bhf_[A-Za-z0-9]{20,}")
REDACTED = "***"


def redact(text: str) -> str:
    """`text` with the values of secret-looking environment variables and hub tokens replaced by ***."""
    for name, value in os.environ.items():
        if len(value) >= 8 and SECRET_ENV.search(name) and value in text:
            text = text.replace(value, REDACTED)
    return SECRET_PATTERN.sub(REDACTED, text)


class RedactFilter(logging.Filter):
    """Redact secrets from every record a handler writes (ours and the libraries' alike)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        return True


def redact_all_handlers() -> None:
    """Put RedactFilter on every handler that exists now: the root's and those libraries attach to their loggers."""
    loggers = [
        logging.getLogger(),
        *(lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger)),
    ]
    for logger in loggers:
        for handler in logger.handlers:
            if not any(isinstance(f, RedactFilter) for f in handler.filters):
                handler.addFilter(RedactFilter())


def setup_logging() -> None:
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    # Optuna (imported with Olive's search code) sets up alembic, which logs its plugins at INFO.
    logging.getLogger("alembic").setLevel(logging.WARNING)
    redact_all_handlers()
    # Olive sends anonymous usage data at exit unless told not to; it also costs seconds per stage.
    os.environ.setdefault("OLIVE_DISABLE_TELEMETRY", "1")


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a fresh temporary folder next to `final`; move it into place only if the block succeeds.

    A crash or kill leaves the previous `final` (or none), never a half-written one.
    """
    final = Path(final)
    _clean_stale(final)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        raise_if_interrupted()  # a library may have swallowed the signal's exception: never commit then
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    # Signals wait until both renames are done (SIGKILL cannot wait: _clean_stale handles that case).
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, INTERRUPT_SIGNALS)
    try:
        if final.exists():
            final.rename(old)
        tmp.rename(final)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    shutil.rmtree(old, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _clean_stale(final: Path) -> None:
    """Remove what a killed earlier run of atomic_dir left (SIGKILL runs no cleanup).

    A temp folder is never trusted. An `.old-` folder is the previous complete output, moved aside
    just before the new one was moved in: if the kill fell between the two renames, put it back.
    """
    if not final.parent.is_dir():
        return
    for kind in ("tmp", "old"):
        for path in final.parent.glob(f".{final.name}.{kind}-*"):
            pid = path.name.rsplit("-", 1)[-1]
            if not pid.isdigit() or _alive(int(pid)):
                continue
            if kind == "old" and not final.exists():
                log.warning("restoring the previous %s (a run was killed while replacing it)", final)
                path.rename(final)
            else:
                log.info("removing %s, left by a killed run", path)
                shutil.rmtree(path, ignore_errors=True)


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


class Interrupted(BaseException):  # like KeyboardInterrupt: `except Exception` does not catch it
    """The stage got SIGINT, SIGTERM or SIGHUP: unwinds so that atomic_dir removes its temp folder."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


INTERRUPT_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
OUT_OF_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


_received: list[int] = []  # the signal this process got, if any


def _on_signal(signum: int, frame: object) -> None:
    # Once: a second Ctrl-C must not interrupt the cleanup of the first.
    for sig in INTERRUPT_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    _received.append(signum)
    raise Interrupted(signum)


def raise_if_interrupted() -> None:
    """Raise Interrupted again if a signal came, even if its first exception was swallowed.

    Measured: SIGINT during Olive's `import onnxruntime` surfaces as an ImportError, which Olive catches
    and logs as "ORT ... module isn't installed", then carries on. Checked before an output is committed.
    """
    if _received:
        raise Interrupted(_received[0])


def _out_of_space(err: BaseException) -> OSError | None:
    """The disk-full (or file-size-limit) error behind `err`, if that is what it is."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in OUT_OF_SPACE:
            return err
        err = err.__cause__ or err.__context__
    return None


def _free_space(path: Path) -> str:
    try:
        return f"{shutil.disk_usage(path).free / 1e6:.0f} MB free"
    except OSError:
        return "free space unknown"


def main(stage: str, body: Callable[[], None]) -> None:
    """Run a stage's body: user mistakes print one clear message and exit 1, not a traceback.

    A signal (SIGINT/SIGTERM/SIGHUP) or a full disk ends the stage with one message too; either way
    its output folder is the previous complete one or none (atomic_dir).
    """
    from slmkit.config import ConfigError
    from slmkit.data import DataError

    setup_logging()
    for sig in INTERRUPT_SIGNALS:
        signal.signal(sig, _on_signal)
    start = time.perf_counter()
    log.info("stage %s: start", stage)
    # Tools that are not pipeline stages (eject, bench, report) run under the same wrapper.
    output = f"{stage_dir(stage)}/" if stage in STAGES else "its output"
    unchanged = f"{output} is unchanged (the previous complete output, or none)"
    started = time.time()
    try:
        body()
        raise_if_interrupted()
        if stage in STAGES:  # time, commit, host: beside the output, never in it (slmkit.lineage)
            from slmkit import lineage

            lineage.write_run(stage, started, time.time())
    except (ConfigError, DataError, StageError) as err:
        # A tool that hit a full disk may only say so in its log (quoted in the StageError).
        full = _out_of_space(err) or next(
            (OSError(code, os.strerror(code)) for code in OUT_OF_SPACE if os.strerror(code) in str(err)), None
        )
        _fail(stage, str(err) if full is None else f"{err}\n  {_disk_message(full, unchanged)}", 1)
    except Interrupted as err:
        _fail(stage, f"interrupted by {err}; {unchanged}. Run it again to finish", 128 + err.signum)
    except OSError as err:
        if _out_of_space(err) is None:
            raise
        _fail(stage, _disk_message(err, unchanged), 1)
    log.info("stage %s: done in %.1f s", stage, time.perf_counter() - start)


def _disk_message(err: OSError, unchanged: str) -> str:
    where = f" writing {err.filename}" if err.filename else ""
    return (
        f"out of disk space{where} ({os.strerror(err.errno)}; {_free_space(ARTIFACTS.parent.resolve())} "
        f"where artifacts/ lives); {unchanged}. Free some space (or raise the file size limit) and run it again"
    )


def _fail(stage: str, message: str, code: int) -> None:
    print(f"\nslmkit {stage}: error: {redact(message)}", file=sys.stderr)
    sys.exit(code)
