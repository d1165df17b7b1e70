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


def write(out: Path, stage: str, cfg: Config, sections: tuple[str, ...], manifest: dict | None = None) -> dict:
    """Write `out`/lineage.json for a stage output and return the record.

    `manifest` defaults to the prepare stage's data manifest (prepare passes the one it is writing).
    """
    from slmkit.stage import read_json, stage_dir, write_json

    if manifest is None:
        manifest = read_json(stage_dir("prepare") / "manifest.json")
    rec = record(stage, cfg, sections, manifest)
    write_json(out / "lineage.json", rec)
    return rec


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


def record(stage: str, cfg: Config, sections: tuple[str, ...], manifest: dict) -> dict:
    """The lineage record of one stage output; `manifest` is the prepare stage's data manifest."""
    status = _git("status", "--porcelain")
    return {
        "stage": stage,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "data_sha256": manifest["source"]["sha256"],
        "split_sha256": {name: split["sha256"] for name, split in manifest["splits"].items()},
        "config_sections": list(sections),
        "config_sha256": section_hash(cfg, *sections),
        "lock_sha256": {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in LOCK_FILES if p.exists()},
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(status) if status is not None else None,
        "packages": _versions(),
        "device": _device(),
    }


def chain(path: str | Path) -> list[dict]:
    """Lineage records of the stage that wrote `path` and of every stage before it, oldest first."""
    from slmkit.stage import ARTIFACTS, STAGES

    path = Path(path).resolve()
    artifacts = ARTIFACTS.resolve()
    try:
        stage = path.relative_to(artifacts).parts[0]
    except (ValueError, IndexError):
        raise FileNotFoundError(
            f"{path} is not inside {ARTIFACTS}/; give a pipeline output, e.g. artifacts/quantize/model"
        ) from None
    if stage not in STAGES:
        raise FileNotFoundError(f"{path}: '{stage}' is not a pipeline stage ({', '.join(STAGES)})")
    records = []
    for name in STAGES[: STAGES.index(stage) + 1]:
        file = artifacts / name / "lineage.json"
        if file.exists():
            import json

            records.append(json.loads(file.read_text(encoding="utf-8")))
    return records


def format_chain(records: list[dict]) -> str:
    lines = []
    for r in records:
        dirty = " (dirty)" if r.get("git_dirty") else ""
        commit = (r.get("git_commit") or "no git")[:12]
        pk = r.get("packages", {})
        lines.append(
            f"{r['stage']:<9} {r['created']}  data {str(r.get('data_sha256'))[:12]}  "
            f"config[{','.join(r['config_sections'])}] {r['config_sha256'][:12]}  git {commit}{dirty}  "
            f"olive {pk.get('olive-ai')} torch {pk.get('torch')}  device {r['device'].get('gpu') or 'cpu'}"
        )
    return "\n".join(lines)


def model_card(cfg: Config, base: dict, manifest: dict, final_loss: dict, rec: dict) -> str:
    """README.md for a shipped model folder, rendered from the config, the data manifest and lineage."""
    m, lo, t, b = cfg.model, cfg.lora, cfg.train, cfg.builder
    if base["source"] == "tiny":
        base_line = (
            f"tiny Phi-3 architecture built locally ({base['parameters']:,} parameters, vocab {base['vocab_size']})"
        )
    else:
        base_line = f"`{base.get('hub_id') or base['model_path']}` at revision `{base.get('revision')}`"
    splits = ", ".join(f"{k} {v['count']}" for k, v in manifest["splits"].items())
    precision = b.precision + (f", block size {b.int4_block_size}" if b.precision == "int4" else "")
    pk = rec["packages"]
    # QLoRA has no module list in the config: Olive adapts every 4-bit linear layer.
    modules = ", ".join(lo.target_modules) if lo.target_modules else "every 4-bit linear layer"
    return f"""# {m.name}: {"/".join(cfg.data.labels)} classifier ({b.precision} ONNX for onnxruntime-genai)

Made by slmkit. Test metrics: `metrics/eval.json`; full lineage: `make lineage` / `lineage.json`.

| | |
|---|---|
| base model | {base_line} |
| adapter | {lo.method}, r={lo.r}, alpha={lo.alpha}, dropout={lo.dropout}, on {modules} |
| training | {t.max_steps} steps, batch {t.batch_size}, learning rate {t.learning_rate}, seed {cfg.seed} |
| final loss | train {final_loss.get("loss")}, validation {final_loss.get("eval_loss")} (label + EOS) |
| data | `{manifest["source"]["path"]}` sha256 `{manifest["source"]["sha256"]}`; {splits} |
| build | Olive ModelBuilder, {precision}, execution provider {b.execution_provider} |
| code | git `{rec["git_commit"]}`{" (uncommitted changes)" if rec["git_dirty"] else ""} |
| versions | olive-ai {pk.get("olive-ai")}, onnxruntime-genai {pk.get("onnxruntime-genai")}, torch {pk.get("torch")} |

Prompt (the label is what the model writes; `slmkit_prompt.json` holds it for slmkit):

```
{cfg.data.template}
```

```python
import slmkit
print(slmkit.load("path/to/this/folder").classify(["I can't stop smiling"])[0].label)
```
"""
