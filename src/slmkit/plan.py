"""Dry run: which stages a config would rerun, from its params against dvc.lock and DVC's own status."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import yaml

from slmkit.config import Config, to_dict

MISSING = object()


def _get(tree: dict, dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return MISSING
        node = node[part]
    return node


def upstream(dvc_yaml: dict) -> dict[str, set[str]]:
    """stage -> the stages whose outputs it depends on (from dvc.yaml's deps and outs)."""
    stages = dvc_yaml["stages"]
    outs = {
        str(out if isinstance(out, str) else next(iter(out))): name
        for name, stage in stages.items()
        for out in stage.get("outs", [])
    }
    graph: dict[str, set[str]] = {name: set() for name in stages}
    for name, stage in stages.items():
        for dep in stage.get("deps", []):
            for path, producer in outs.items():
                if producer != name and (dep == path or dep.startswith(path.rstrip("/") + "/")):
                    graph[name].add(producer)
    return graph


def changed_params(cfg: Config, lock: dict) -> dict[str, list[str]]:
    """stage -> the params it reads whose value in cfg differs from the one dvc.lock recorded."""
    new = to_dict(cfg)
    changed: dict[str, list[str]] = {}
    for name, stage in lock.get("stages", {}).items():
        recorded = stage.get("params", {}).get("params.yaml", {})
        keys = [key for key, value in recorded.items() if _get(new, key) != value]
        if keys:
            changed[name] = keys
    return changed


def dvc_status(root: Path) -> dict[str, list[str]]:
    """stage -> what `dvc status` says changed besides params (code, data, missing outputs)."""
    out = subprocess.run(["dvc", "status", "--json"], cwd=root, capture_output=True, text=True, check=False)
    if out.returncode:
        return {"(dvc status)": [out.stderr.strip().splitlines()[0] if out.stderr.strip() else "failed"]}
    status = json.loads(out.stdout or "{}")
    reasons: dict[str, list[str]] = {}
    for name, entries in status.items():
        for entry in entries:
            if isinstance(entry, str):
                reasons.setdefault(name, []).append(entry)
                continue
            for kind in ("changed deps", "changed outs"):
                for path, state in entry.get(kind, {}).items():
                    if not path.startswith("params.yaml"):
                        reasons.setdefault(name, []).append(f"{path} {state}")
    return reasons


def stages_to_rerun(cfg: Config, root: Path = Path(".")) -> dict[str, list[str]]:
    """Every stage `dvc repro` would run with cfg as params.yaml, each with its reasons, in pipeline order."""
    dvc_yaml = yaml.safe_load((root / "dvc.yaml").read_text(encoding="utf-8"))
    lock_path = root / "dvc.lock"
    if not lock_path.exists():
        return {name: ["never run (no dvc.lock)"] for name in dvc_yaml["stages"]}
    lock = yaml.safe_load(lock_path.read_text(encoding="utf-8"))
    reasons: dict[str, list[str]] = {}
    for name in dvc_yaml["stages"]:
        if name not in lock.get("stages", {}):
            reasons.setdefault(name, []).append("never run")
    for name, keys in changed_params(cfg, lock).items():
        reasons.setdefault(name, []).append("params " + ", ".join(keys))
    for name, why in dvc_status(root).items():
        reasons.setdefault(name, []).extend(why)
    graph = upstream(dvc_yaml)
    ordered: dict[str, list[str]] = {}
    for name in dvc_yaml["stages"]:  # dvc.yaml lists stages in pipeline order
        why = list(reasons.get(name, []))
        why += [f"after {up}, if its outputs change" for up in sorted(graph[name]) if up in ordered]
        if why:
            ordered[name] = why
    return ordered
