"""Lineage records: where an artifact came from (data hash, config hash, code and package versions, device)."""

from __future__ import annotations

import hashlib
import platform
import subprocess
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

from slmkit.config import Config, section_hash

PACKAGES = (
    "torch",
    "transformers",
    "peft",
    "olive-ai",
    "onnxruntime",
    "onnxruntime-genai",
    "onnx",
    "datasets",
    "dvc",
    "hydra-core",
)
LOCK_FILES = (Path("requirements/cpu.txt"), Path("requirements/cuda.txt"))


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def _device() -> dict[str, object]:
    import torch

    info: dict[str, object] = {"machine": platform.machine(), "python": platform.python_version()}
    info["cuda"] = torch.version.cuda
    info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return info


def record(stage: str, cfg: Config, sections: tuple[str, ...], data_sha256: str | None) -> dict:
    """The lineage record of one stage output."""
    status = _git("status", "--porcelain")
    return {
        "stage": stage,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "data_sha256": data_sha256,
        "config_sections": list(sections),
        "config_sha256": section_hash(cfg, *sections),
        "lock_sha256": {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in LOCK_FILES if p.exists()},
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(status) if status is not None else None,
        "packages": _versions(),
        "device": _device(),
    }
