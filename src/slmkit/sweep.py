"""Sweep jobs: each Hydra multirun job is one DVC experiment, run in its own clone of the repo.

A job composes and validates its config, clones the repo at HEAD (plus the workspace's uncommitted
changes; `git clone --shared`, so no objects are copied) into `sweeps/<sweep>/<job>/ws`, points the
clone at the main DVC cache, writes its own params.yaml there, runs `dvc exp run` and pushes the
experiment back with `dvc exp push`. Jobs never share a params.yaml, a DVC lock or DVC's in-flight
experiment refs (a git worktree would share those, and parallel jobs would clobber each other); they
share the cache and the run cache, so stages whose inputs did not change (prepare, base) are reused,
and `dvc exp show` in the main workspace lists every job.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

from slmkit.config import Config, to_yaml, validate
from slmkit.files import write_json
from slmkit.gate import PASSED
from slmkit.paths import EVAL_JSON, onnx_metrics_key
from slmkit.stage import StageError

log = logging.getLogger("slmkit.sweep")

RESULT_FILE = "result.json"
# The figure a sweep optimises and ranks by: this metric of the ONNX model the job's builder made
# (metrics/eval.json's `int4_onnx`, `fp32_onnx`, ...: a sweep may range over builders): a classifier's
# accuracy, a generative model's exact match (the one the parity gate judges).
OBJECTIVE_METRICS = ("accuracy", "exact_match")


def primary(model_metrics: dict[str, Any]) -> str:
    """The objective metric a model's metrics carry (accuracy for a classifier, exact_match for answers)."""
    return next((k for k in OBJECTIVE_METRICS if k in model_metrics), OBJECTIVE_METRICS[0])


STAGE_LINE = re.compile(r"Stage '([\w-]+)' didn't change, skipping|Running stage '([\w-]+)'")


def repo_root() -> Path:
    out = subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True, check=False)
    if out.returncode:
        raise StageError("a sweep runs in a git repository: run it from the slmkit checkout")
    return Path(out.stdout.strip())


def _git(*args: str, cwd: Path, stdin: bytes | None = None) -> bytes:
    out = subprocess.run(["git", *args], cwd=cwd, input=stdin, capture_output=True, check=False)
    if out.returncode:
        raise StageError(f"git {' '.join(args)} failed in {cwd}: {out.stderr.decode(errors='replace').strip()}")
    return out.stdout


def experiment_name(sweep_id: str, job: int) -> str:
    """A DVC experiment name (a valid git ref component) unique to the sweep and job."""
    return re.sub(r"[^A-Za-z0-9-]", "-", f"{sweep_id}-{job}").strip("-")


def thread_budget(parallel_jobs: int) -> int:
    """Threads per job so parallel jobs do not oversubscribe the cores (measured: 40x slower when they do)."""
    return max(1, (os.cpu_count() or 1) // max(1, parallel_jobs))


def make_clone(root: Path, ws: Path) -> None:
    """A clone at HEAD carrying the workspace's uncommitted changes to tracked files."""
    head = _git("rev-parse", "HEAD", cwd=root).decode().strip()
    diff = _git("diff", "HEAD", "--binary", cwd=root)
    if ws.exists():
        shutil.rmtree(ws)
    _git("clone", "--quiet", "--shared", "--no-checkout", str(root), str(ws), cwd=root)
    _git("checkout", "--quiet", "--detach", head, cwd=ws)
    if diff.strip():
        _git("apply", "--whitespace=nowarn", cwd=ws, stdin=diff)


def cache_dir(root: Path) -> Path:
    out = subprocess.run(["dvc", "cache", "dir"], cwd=root, capture_output=True, text=True, check=False)
    if out.returncode:
        raise StageError(f"`dvc cache dir` failed in {root}: {out.stderr.strip()}")
    return Path(out.stdout.strip())


def stage_report(dvc_output: str) -> dict[str, list[str]]:
    """Which stages ran and which DVC reused (from `dvc exp run`'s own lines)."""
    ran, reused = [], []
    for match in STAGE_LINE.finditer(dvc_output):
        skipped, running = match.groups()
        if skipped and skipped not in reused:
            reused.append(skipped)
        if running and running not in ran:
            ran.append(running)
    return {"ran": ran, "reused": reused}


# The neighbouring runs a recipe's parity gap is measured over (`make bench-family`): the default, two other
# ranks, the data without its first 1 % of lines, two other seeds (which also split the data differently).
FAMILY_OVERRIDES = {
    "default": [],
    "lora.r=4": ["lora.r=4"],
    "lora.r=8": ["lora.r=8"],
    "seed=1": ["seed=1"],
    "seed=2": ["seed=2"],
}
WITHOUT_FIRST_1PCT = "data without its first 1%"


def family(data_path: str) -> list[tuple[str, list[str], dict[str, str]]]:
    """(name, overrides, files to write into the job's clone) for each run of the family, the data variant
    (`data_path` without its first 1 % of lines, rounded up, beside it) fourth."""
    lines = Path(data_path).read_text(encoding="utf-8").splitlines(keepends=True)
    drop = -(-len(lines) // 100)
    variant = str(Path(data_path).with_name(f"{Path(data_path).stem}_without_first_1pct{Path(data_path).suffix}"))
    members = [(name, overrides, {}) for name, overrides in FAMILY_OVERRIDES.items()]
    members.insert(3, (WITHOUT_FIRST_1PCT, [f"data.path={variant}"], {variant: "".join(lines[drop:])}))
    return members


def _run_group(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    """Run `cmd` (stderr into stdout) in its own process group, and end the whole group if this process is
    interrupted: `dvc exp run` runs the stages as its children, which would otherwise keep training, orphaned."""
    proc = subprocess.Popen(cmd, stderr=subprocess.STDOUT, start_new_session=True, **kwargs)
    try:
        return subprocess.CompletedProcess(cmd, proc.wait())
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        raise


def run_job(
    cfg: Config,
    overrides: list[str],
    job_dir: Path,
    name: str,
    threads: int,
    root: Path | None = None,
    files: dict[str, str] | None = None,
    keep: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Run one sweep job as the DVC experiment `name`; return its result record (also in job_dir).

    `files`: text files to write into the job's clone first (path relative to the repo: content), e.g. a
    variant of the data that the job's data.path names. `keep`: outputs (paths relative to the repo) copied
    into job_dir before the clone is removed (make bench-adapters serves the job's adapter)."""
    root = root or repo_root()
    job_dir.mkdir(parents=True, exist_ok=True)
    ws = job_dir / "ws"
    started = time.time()
    make_clone(root, ws)
    env = dict(
        os.environ,
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        # The job's stages import slmkit from its own clone (the code this experiment records).
        PYTHONPATH=os.pathsep.join(filter(None, [str(ws / "src"), os.environ.get("PYTHONPATH")])),
    )
    try:
        subprocess.run(
            ["dvc", "cache", "dir", "--local", str(cache_dir(root))], cwd=ws, check=True, capture_output=True
        )
        (ws / "params.yaml").write_text(to_yaml(cfg), encoding="utf-8")
        for rel, text in (files or {}).items():
            (ws / rel).parent.mkdir(parents=True, exist_ok=True)
            (ws / rel).write_text(text, encoding="utf-8")
        # Outputs of the baseline (prepare, base, ...) come from the shared cache, so unchanged stages are reused.
        subprocess.run(["dvc", "checkout", "--quiet"], cwd=ws, env=env, capture_output=True, check=False)
        log_path = job_dir / "dvc.log"
        log.info("job %s: dvc exp run (log: %s)", name, log_path)
        with open(log_path, "w", encoding="utf-8") as out:
            proc = _run_group(["dvc", "exp", "run", "--name", name], cwd=ws, env=env, stdout=out)
            if proc.returncode == 0:  # the experiment ref (and its commit) into the main repo
                proc = _run_group(["dvc", "exp", "push", "--no-cache", "origin", name], cwd=ws, env=env, stdout=out)
        text = log_path.read_text(encoding="utf-8", errors="replace")
        if proc.returncode:
            lines = text.splitlines()
            reason = next((ln.strip() for ln in reversed(lines) if ": error: " in ln), lines[-1] if lines else "")
            record = {"failed": reason, "log": str(log_path), "objective": None}
            write_json(job_dir / RESULT_FILE, _job_record(name, overrides, started, threads, record))
            tail = "\n".join(f"    {line}" for line in lines[-15:])
            raise StageError(f"sweep job {name} ({' '.join(overrides)}) failed:\n{tail}\n  full log: {log_path}")
        metrics = json.loads((ws / EVAL_JSON).read_text(encoding="utf-8"))
        for rel in keep:
            shutil.rmtree(job_dir / rel, ignore_errors=True)
            shutil.copytree(ws / rel, job_dir / rel)
    finally:
        shutil.rmtree(ws, ignore_errors=True)
    key = onnx_metrics_key(cfg.builder.precision)
    outcome = {
        "metrics": metrics,
        "objective_model": key,
        "objective": objective(metrics, key, log_path),
        "stages": stage_report(text),
    }
    result = _job_record(name, overrides, started, threads, outcome)
    write_json(job_dir / RESULT_FILE, result)
    return result


def objective(metrics: dict[str, Any], key: str, source: Path | str = EVAL_JSON) -> float:
    """The job's objective: the accuracy (or exact match) of the ONNX model its builder made (`key`, e.g.
    fp32_onnx)."""
    try:
        return float(metrics[key][primary(metrics[key])])
    except (KeyError, TypeError):
        models = ", ".join(
            k for k, v in metrics.items() if isinstance(v, dict) and any(m in v for m in OBJECTIVE_METRICS)
        )
        raise StageError(
            f"{EVAL_JSON} of this job has no {key}.{'/'.join(OBJECTIVE_METRICS)} (models: {models or 'none'}); "
            f"the evaluate stage names the built model by builder.precision: see {source}"
        ) from None


def _job_record(name: str, overrides: list[str], started: float, threads: int, outcome: dict) -> dict[str, Any]:
    """The result.json of a job, finished or failed: who it was, what came of it, how long it took."""
    return {
        "name": name,
        "overrides": overrides,
        **outcome,
        "seconds": round(time.time() - started, 1),
        "threads": threads,
    }


def job_config(raw) -> Config:
    """Validate a Hydra job's config (the same schema and checks as `make params`)."""
    from omegaconf import OmegaConf

    from slmkit import arch

    cfg = validate(OmegaConf.to_container(raw, resolve=True), source="sweep job config")
    arch.check(cfg)
    return cfg


def collect(sweep_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text(encoding="utf-8")) for p in sorted(sweep_dir.glob(f"*/{RESULT_FILE}"))]


def failed(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in results if r.get("failed") is not None]


def verdict(result: dict[str, Any]) -> str | None:
    """A finished job's parity-gate verdict (passed | refused | loose), from its metrics; None for a crash."""
    if result.get("failed") is not None:
        return None
    return (result["metrics"].get("gate") or {}).get("verdict")


def best(results: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The job to pick: the highest objective among those whose model the parity gate passed."""
    shippable = [r for r in results if verdict(r) == PASSED]
    return max(shippable, key=lambda r: r["objective"]) if shippable else None


def summary_table(results: list[dict[str, Any]]) -> str:
    """Markdown table of every job: overrides, accuracy of each model, the gate's verdict, stages run/reused;
    the pick (★) is the best job the gate passed.

    A job that crashed is listed last with the error line of the stage that failed."""
    if not results:
        return "(no finished jobs)"
    done = [r for r in results if r.get("failed") is None]
    pick = best(results)
    lines = [
        "| | experiment | overrides | ONNX score | ONNX model | merged score | gate | stages run | reused | s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(done, key=lambda r: -r["objective"]):
        m = r["metrics"]
        merged = m.get("merged_pytorch", {})
        merged = merged.get(primary(merged))
        gate = m.get("gate") or {}
        judged = f"{gate['verdict']} ({100 * gate['gap']:+.1f} pts)" if gate else "-"
        lines.append(
            f"| {'★' if r is pick else ''} | {r['name']} | {' '.join(r['overrides']) or '(defaults)'} | "
            # result.json files written before the objective followed the builder: int4.
            f"{r['objective']:.4f} | {r.get('objective_model', 'int4_onnx')} | "
            f"{'-' if merged is None else f'{merged:.4f}'} | {judged} | "
            f"{', '.join(r['stages']['ran']) or '-'} | {', '.join(r['stages']['reused']) or '-'} | {r['seconds']} |"
        )
    for r in failed(results):
        reason = r["failed"].replace("|", "/")
        lines.append(
            f"| ✗ | {r['name']} | {' '.join(r['overrides']) or '(defaults)'} | failed | {reason} "
            f"(log: {r['log']}) | | | | | {r['seconds']} |"
        )
    return "\n".join(lines)


def summarise(sweep_dir: Path) -> str:
    results = collect(sweep_dir)
    table = summary_table(results)
    (sweep_dir / "summary.md").write_text(table + "\n", encoding="utf-8")
    write_json(sweep_dir / "summary.json", results)
    return table


# Jobs of the sweep that just ended which failed (set by SweepSummary; scripts/sweep.py exits 1 if any).
FAILED_JOBS: list[str] = []


class SweepSummary(Callback):
    """Hydra callback: after the last job, print every job's params and metrics with the best marked."""

    def on_multirun_end(self, config, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            return
        table = summarise(sweep_dir)
        results = collect(sweep_dir)
        print(f"\nsweep {sweep_dir} ({len(results)} jobs):\n{table}\n")
        print("compare with DVC: dvc exp show   |   plots: dvc plots diff <exp> <exp>")
        FAILED_JOBS[:] = [r["name"] for r in failed(results)]
        unshipped = [r["name"] for r in results if verdict(r) not in (None, PASSED)]
        if unshipped:
            # A finding, not a failure: the experiment and its verdict are recorded (dvc exp show).
            print(
                f"slmkit sweep: the parity gate did not pass {len(unshipped)} of {len(results)}: {', '.join(unshipped)}"
            )
        if not best(results) and not FAILED_JOBS:
            print("slmkit sweep: no job's model passed the parity gate: none is picked")
        if FAILED_JOBS:
            print(f"slmkit sweep: {len(FAILED_JOBS)} of {len(results)} jobs failed: {', '.join(FAILED_JOBS)}")
