"""The stage runner: logging, and one clear message (not a traceback) when a stage cannot finish.

What stages also share lives beside it, one job a module: slmkit.paths (where things are), slmkit.files
(atomic writes), slmkit.interrupt (signals), slmkit.redact (secrets out of logs).
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

from slmkit.interrupt import Interrupted, install_handlers, raise_if_interrupted, received
from slmkit.paths import ARTIFACTS, STAGES, stage_dir
from slmkit.redact import redact, redact_all_handlers

log = logging.getLogger("slmkit")

OUT_OF_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


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


class StageError(RuntimeError):
    """A stage could not produce a valid output; the message says why and what to do."""


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
    install_handlers()
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
    except Exception as err:
        # A library's own cleanup can turn the signal's exception into another one as it unwinds (measured:
        # SIGINT inside omegaconf's flag_override surfaced as an AttributeError): the signal still decides.
        if (got := received()) is not None:
            _fail(stage, f"interrupted by {got}; {unchanged}. Run it again to finish", 128 + got.signum)
        if not isinstance(err, OSError) or _out_of_space(err) is None:
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
