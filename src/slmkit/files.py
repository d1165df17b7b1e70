"""Atomic writes: an output folder or file is the previous complete one or the new complete one, never half."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

from slmkit.interrupt import INTERRUPT_SIGNALS, raise_if_interrupted

log = logging.getLogger("slmkit")


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a fresh temporary folder next to `final`; move it into place only if the block succeeds.

    A crash or kill leaves the previous `final` (or none), never a half-written one. Paths into the
    workspace that the block (or a tool it ran) wrote into text files become relative to it
    (workspace_relative), and tokenizer configs lose their load flags (drop_load_flags): an output's bytes
    do not depend on the folder the repo lives in or on HF_HUB_OFFLINE.
    """
    final = Path(final)
    _clean_stale(final)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        raise_if_interrupted()  # a library may have swallowed the signal's exception: never commit then
        workspace_relative(tmp)
        drop_load_flags(tmp)
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


# Small text files of an output, where a tool may have written a path (configs, model cards, records).
TEXT_SUFFIXES = (".json", ".md", ".txt", ".yaml", ".yml", ".jsonl", ".csv")
TEXT_MAX_BYTES = 1 << 20


def _text_files(folder: Path) -> Iterator[Path]:
    for path in sorted(folder.rglob("*")):
        if path.suffix in TEXT_SUFFIXES and path.is_file() and path.stat().st_size <= TEXT_MAX_BYTES:
            yield path


def _workspace_prefix() -> str | None:
    root = Path.cwd().resolve()
    return None if root == Path(root.anchor) else f"{root}/"


def workspace_relative(folder: Path) -> list[Path]:
    """Rewrite absolute paths into the workspace (the current folder) as paths relative to it, in the text
    files of `folder`; returns the files changed.

    Olive and PEFT record the base model as an absolute path (adapter_config.json's
    base_model_name_or_path, the adapter's README), and a data path may be given absolutely: left as is,
    an output's bytes depend on the folder the repo was cloned into, and no other clone reproduces
    dvc.lock. The stages run from the workspace root, so the relative path resolves the same.
    """
    prefix = _workspace_prefix()
    changed = []
    for path in _text_files(folder) if prefix else ():
        text = path.read_text(encoding="utf-8", errors="surrogateescape")
        if prefix in text:
            path.write_text(text.replace(prefix, ""), encoding="utf-8", errors="surrogateescape")
            changed.append(path)
    return changed


# Keys transformers writes into tokenizer_config.json about how the tokenizer was loaded, not what it is:
# local_files_only follows HF_HUB_OFFLINE, so the same tokenizer saved with and without it differed by a byte.
LOAD_FLAGS = ("local_files_only",)


def drop_load_flags(folder: Path) -> list[Path]:
    """Remove LOAD_FLAGS from every tokenizer_config.json in `folder`; returns the files changed."""
    changed = []
    for path in sorted(folder.rglob("tokenizer_config.json")):
        config = json.loads(path.read_text(encoding="utf-8"))
        if any(key in config for key in LOAD_FLAGS):
            kept = {k: v for k, v in config.items() if k not in LOAD_FLAGS}
            path.write_text(json.dumps(kept, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
            changed.append(path)
    return changed


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
