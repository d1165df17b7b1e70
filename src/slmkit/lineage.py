"""Lineage records: where an artifact came from.

Two records per stage output, split by whether a rerun changes them:
- `lineage.json`, inside the DVC-tracked output: stable facts only (data and split sha256, config section
  hash, lock-file hash, package versions). A rerun that writes the same weights writes the same bytes, so
  DVC sees an unchanged output and nothing downstream reruns (early cutoff), and a fresh clone's run can
  reproduce the committed dvc.lock.
- `artifacts/runs/<stage>/run.json`, outside every DVC output (artifacts/ is git-ignored): the volatile
  facts of the run that wrote it (time, git commit, dirty flag, host, device) and its tool log. It names
  the sha256 of the lineage.json it was written with; an output DVC restored from its cache has no
  matching run record here, and `slmkit lineage` says so rather than show another run's commit.
"""

from __future__ import annotations

import hashlib
import platform
import subprocess
import sys
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
LOCK_FILES = (Path("requirements/cpu.txt"), Path("requirements/cuda.txt"), Path("requirements/models.txt"))


def write(
    out: Path,
    stage: str,
    cfg: Config,
    sections: tuple[str, ...],
    manifest: dict | None = None,
    inputs: dict[str, str] | None = None,
) -> dict:
    """Write `out`/lineage.json (the stable record) for a stage output and return the record.

    `manifest` defaults to the prepare stage's data manifest (prepare passes the one it is writing).
    `inputs`: sha256 of other files the output was made from (the base stage's GGUF checkpoint).
    The run record (time, commit) is written by `write_run` once the output is in place.
    """
    from slmkit.files import read_json, write_json
    from slmkit.paths import stage_dir

    if manifest is None:
        manifest = read_json(stage_dir("prepare") / "manifest.json")
    rec = record(stage, cfg, sections, manifest)
    if inputs:
        rec["inputs_sha256"] = dict(inputs)
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
    """The machine; and the GPU when the stage used PyTorch (a stage that never imported it, like prepare,
    does not pay the ~1 s import just to say which GPU it did not use)."""
    info: dict[str, object] = {"machine": platform.machine(), "python": platform.python_version()}
    torch = sys.modules.get("torch")
    if torch is not None:
        info["cuda"] = torch.version.cuda
        info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return info


def record(stage: str, cfg: Config, sections: tuple[str, ...], manifest: dict) -> dict:
    """The stable lineage record of one stage output; `manifest` is the prepare stage's data manifest.

    Nothing here may change when the same inputs are run again (no time, commit, host): see the module doc.
    """
    return {
        "stage": stage,
        "data_sha256": manifest["source"]["sha256"],
        "split_sha256": {name: split["sha256"] for name, split in manifest["splits"].items()},
        "config_sections": list(sections),
        "config_sha256": section_hash(cfg, *sections),
        "lock_sha256": {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in LOCK_FILES if p.exists()},
        "python": platform.python_version(),
        "packages": _versions(),
    }


def run_dir(stage: str) -> Path:
    """Where a stage keeps what describes its last run here, not its output (artifacts/runs/<stage>/)."""
    from slmkit.paths import ARTIFACTS

    return ARTIFACTS / "runs" / stage


def run_record(stage: str, lineage_sha256: str, started: float, finished: float) -> dict:
    """The volatile facts of one run of a stage: when, which commit, where. Never inside a DVC output."""
    status = _git("status", "--porcelain")
    return {
        "stage": stage,
        "lineage_sha256": lineage_sha256,
        "started": datetime.fromtimestamp(started, UTC).isoformat(timespec="seconds"),
        "finished": datetime.fromtimestamp(finished, UTC).isoformat(timespec="seconds"),
        "seconds": round(finished - started, 1),
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(status) if status is not None else None,
        "host": platform.node(),
        "device": _device(),
    }


def write_run(stage: str, started: float, finished: float) -> dict | None:
    """Write the run record of a stage whose output (with its lineage.json) is now in place."""
    from slmkit.files import write_json
    from slmkit.paths import stage_dir

    file = stage_dir(stage) / "lineage.json"
    if not file.exists():  # a stage that failed before committing its output: nothing to describe
        return None
    rec = run_record(stage, hashlib.sha256(file.read_bytes()).hexdigest(), started, finished)
    write_json(run_dir(stage) / "run.json", rec)
    return rec


def _matching_run(stage: str, lineage_bytes: bytes) -> dict | None:
    """The run record that was written with exactly this lineage.json, if this workspace has it."""
    import json

    file = run_dir(stage) / "run.json"
    try:
        rec = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return rec if rec.get("lineage_sha256") == hashlib.sha256(lineage_bytes).hexdigest() else None


def chain(path: str | Path) -> list[dict]:
    """Lineage records of the stage that wrote `path` and of every stage before it, oldest first."""
    from slmkit.paths import ARTIFACTS, STAGES

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

            raw = file.read_bytes()
            records.append({**json.loads(raw), "run": _matching_run(name, raw)})
    return records


def format_chain(records: list[dict]) -> str:
    """One line per stage: stable facts, then the run's time and commit (or why they are not known here)."""
    lines = []
    for r in records:
        pk = r.get("packages", {})
        run = r.get("run")
        if run:
            dirty = " (dirty)" if run.get("git_dirty") else ""
            when = f"{run['finished']}  git {(run.get('git_commit') or 'no git')[:12]}{dirty}"
            where = f"  device {(run.get('device') or {}).get('gpu') or 'cpu'}"
        else:
            when, where = "(no run record here: restored from the DVC cache or built elsewhere)", ""
        lines.append(
            f"{r['stage']:<9} {when}  data {str(r.get('data_sha256'))[:12]}  "
            f"config[{','.join(r['config_sections'])}] {r['config_sha256'][:12]}  "
            f"olive {pk.get('olive-ai')} torch {pk.get('torch')}{where}"
            + "".join(f"  {name} {sha[:12]}" for name, sha in r.get("inputs_sha256", {}).items())
        )
    return "\n".join(lines)


def model_card(cfg: Config, base: dict, manifest: dict, final_loss: dict, rec: dict) -> str:
    """README.md for a shipped model folder, rendered from the config, the data manifest and lineage."""
    m, lo, t, b = cfg.model, cfg.lora, cfg.train, cfg.builder
    if base["source"] == "tiny":
        base_line = (
            f"tiny Phi-3 architecture built locally ({base['parameters']:,} parameters, vocab {base['vocab_size']})"
        )
    elif base["source"] == "gguf":
        base_line = (
            f"GGUF checkpoint `{base['gguf_file']}` (sha256 `{base['gguf_sha256'][:12]}`, {base['gguf_architecture']}, "
            f"{'/'.join(base['gguf_tensor_types'])}), dequantized to fp32: {base['parameters']:,} parameters"
        )
    else:
        base_line = f"`{base.get('hub_id') or base['model_path']}` at revision `{base.get('revision')}`"
    splits = ", ".join(f"{k} {v['count']}" for k, v in manifest["splits"].items())
    precision = b.precision + {
        "int4": f", block size {b.int4_block_size}",
        "int8": " (per-channel weights, activations quantized at run time)",
    }.get(b.precision, "")
    pk = rec["packages"]
    locks = ", ".join(f"`{name}` `{sha[:12]}`" for name, sha in rec["lock_sha256"].items()) or "none"
    # QLoRA has no module list in the config: Olive adapts every 4-bit linear layer.
    modules = ", ".join(lo.target_modules) if lo.target_modules else "every 4-bit linear layer"
    if cfg.data.labels:
        kind, metric, writes = f"{'/'.join(cfg.data.labels)} classifier", "accuracy", "the label"
        usage = 'slmkit.load("path/to/this/folder").classify(["I can\'t stop smiling"])[0].label'
    else:
        kind, metric, writes = "question answering model", "exact match", "the answer"
        usage = 'slmkit.load("path/to/this/folder").generate(["What is the capital of France?"])[0]'
    return f"""# {m.name}: {kind} ({b.precision} ONNX for onnxruntime-genai)

Made by slmkit. Test metrics: `metrics/eval.json`; full lineage: `make lineage` / `lineage.json`.
Ships only once the parity gate passed it (its {b.precision} test {metric} within `evaluate.parity_tolerance`
of the merged model's): the verdict is `artifacts/evaluate/gate.json`, and `slmkit gate` prints it.
The git commit and build time are not in this folder, so that a rebuild writing the same weights is
byte-identical: `make lineage` shows them (from `artifacts/runs/`) where the model was built.

| | |
|---|---|
| base model | {base_line} |
| adapter | {lo.method}, r={lo.r}, alpha={lo.alpha}, dropout={lo.dropout}, on {modules} |
| training | {t.max_steps} steps, batch {t.batch_size}, learning rate {t.learning_rate}, seed {cfg.seed} |
| final loss | train {final_loss.get("loss")}, validation {final_loss.get("eval_loss")} ({writes[4:]} + EOS) |
| data | `{manifest["source"]["path"]}` sha256 `{manifest["source"]["sha256"]}`; {splits} |
| build | Olive ModelBuilder, {precision}, execution provider {b.execution_provider} |
| inputs | config sha256 `{rec["config_sha256"]}`; lock files {locks} |
| versions | olive-ai {pk.get("olive-ai")}, onnxruntime-genai {pk.get("onnxruntime-genai")}, torch {pk.get("torch")} |

Prompt ({writes} is what the model writes; `slmkit_prompt.json` holds it for slmkit):

```
{cfg.data.template}
```

```python
import slmkit
print({usage})
```
"""
