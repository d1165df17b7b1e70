"""Sweep jobs and the dry-run planner: the parts that need no pipeline run (the slow tier runs real sweeps)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from slmkit import sweep
from slmkit.config import ConfigError, compose, to_dict
from slmkit.paths import STAGES
from slmkit.plan import changed_params, upstream
from slmkit.stage import StageError

REPO_ROOT = Path(__file__).resolve().parents[1]


def _committed(path: str) -> dict:
    text = subprocess.run(
        ["git", "show", f"HEAD:{path}"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    ).stdout
    return yaml.safe_load(text)


# --- dry run (make config) --------------------------------------------------------------------------


def test_pipeline_graph_from_dvc_yaml():
    graph = upstream(yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text()))
    assert list(graph) == list(STAGES)
    assert graph["prepare"] == set()
    assert graph["base"] == {"prepare"}
    assert graph["train"] == {"prepare", "base"}
    assert "merge" in graph["quantize"] and "quantize" in graph["evaluate"]


def test_every_stage_can_be_restored_from_the_run_cache():
    """DVC skips the run cache for a stage with an uncached output that is not a metric or plot
    (dvc/stage/__init__.py: no_cache_outs): switching data back would then retrain. Uncached outputs
    must be declared as metrics or plots."""
    stages = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        for out in stage.get("outs", []):
            props = next(iter(out.values())) if isinstance(out, dict) else {}
            assert props.get("cache", True), f"stage {name}: uncached `outs:` entry {out} disables its run cache"


def test_committed_lock_matches_committed_params():
    """dvc.lock was produced from params.yaml as committed: no stage is stale in a fresh clone."""
    params = _committed("params.yaml")
    cfg = compose()
    assert to_dict(cfg) == params
    assert changed_params(cfg, _committed("dvc.lock")) == {}


@pytest.mark.parametrize(
    ("overrides", "stages"),
    [
        # quantize reads every section for the model card it writes beside the model.
        # adapter records the same sections, and the rank and the recipe in the adapter's manifest.
        (["lora.r=8"], {"train", "quantize", "adapter"}),
        (["train.learning_rate=0.0005"], {"train", "quantize", "adapter"}),
        (["builder=fp32_cpu"], {"quantize", "evaluate", "adapter"}),  # evaluate names the precision it scores
        (["data.val_fraction=0.15"], {"prepare"}),
        (["model.path=other.gguf"], {"base", "quantize", "adapter"}),
        (["evaluate.batch_size=4"], {"evaluate"}),
    ],
)
def test_changed_params_name_the_stages_that_read_them(overrides, stages):
    changed = changed_params(compose(overrides), _committed("dvc.lock"))
    assert set(changed) == stages
    key = overrides[0].split("=")[0]
    if "." in key and not key.startswith("builder"):
        assert any(k == key or key.startswith(k + ".") for ks in changed.values() for k in ks)


# --- sweep jobs ---------------------------------------------------------------------------------------


def test_experiment_names_are_valid_git_refs():
    for sweep_id, job in [("sweep-20261123-071500", 0), ("sweep weird/id:*", 12)]:
        name = sweep.experiment_name(sweep_id, job)
        ok = subprocess.run(["git", "check-ref-format", f"refs/exps/{name}"], check=False).returncode == 0
        assert ok, name
        assert name.endswith(str(job))


def test_thread_budget_splits_the_cores(monkeypatch):
    monkeypatch.setattr(sweep.os, "cpu_count", lambda: 8)
    assert [sweep.thread_budget(n) for n in (1, 2, 3, 16)] == [8, 4, 2, 1]


def test_stage_report_reads_dvc_lines():
    out = (
        "Stage 'prepare' didn't change, skipping\nStage 'base' didn't change, skipping\n"
        "Running stage 'train':\n> python scripts/train.py\nRunning stage 'merge':\n"
    )
    assert sweep.stage_report(out) == {"ran": ["train", "merge"], "reused": ["prepare", "base"]}


def _result(name: str, int4: float, merged: float, verdict: str = "passed") -> dict:
    gate = {"verdict": verdict, "gap": round(merged - int4, 4), "tolerance": 0.02}
    return {
        "name": name,
        "overrides": [f"lora.r={name[-1]}"],
        "metrics": {"int4_onnx": {"accuracy": int4}, "merged_pytorch": {"accuracy": merged}, "gate": gate},
        "objective": int4,
        "stages": {"ran": ["train"], "reused": ["prepare", "base"]},
        "seconds": 1.0,
    }


def test_summary_marks_the_best_job_first(tmp_path: Path):
    for i, acc in enumerate([0.5, 0.7, 0.6]):
        sweep.write_json(tmp_path / str(i) / sweep.RESULT_FILE, _result(f"s-{i}", acc, acc))
    table = sweep.summarise(tmp_path)
    rows = [line for line in table.splitlines() if line.startswith("| ★") or "| s-" in line]
    assert rows[0].startswith("| ★ | s-1 ")
    assert sum("★" in row for row in rows) == 1
    assert (tmp_path / "summary.md").read_text().strip() == table


def test_summary_lists_a_failed_job_last_with_its_error(tmp_path: Path):
    sweep.write_json(tmp_path / "0" / sweep.RESULT_FILE, _result("s-0", 0.5, 0.5))
    failure = {"name": "s-1", "overrides": ["lora.r=1"], "objective": None, "seconds": 2.0, "log": "x/dvc.log"}
    failure["failed"] = "slmkit evaluate: error: parity gate: int4_onnx accuracy 0.39 is 5.3 points below"
    sweep.write_json(tmp_path / "1" / sweep.RESULT_FILE, failure)
    rows = [line for line in sweep.summarise(tmp_path).splitlines() if "| s-" in line]
    assert rows[0].startswith("| ★ | s-0 ")
    assert rows[1].startswith("| ✗ | s-1 ") and "parity gate" in rows[1] and "x/dvc.log" in rows[1]
    assert [r["name"] for r in sweep.failed(sweep.collect(tmp_path))] == ["s-1"]


def test_job_config_refuses_a_bad_value_naming_the_key():
    raw = OmegaConf.create(to_dict(compose()))
    raw.lora.r = 0
    with pytest.raises(ConfigError, match="lora.r"):
        sweep.job_config(raw)
    raw = OmegaConf.create(to_dict(compose()))
    raw.lora.target_modules = ["qkv_proj"]
    with pytest.raises(ConfigError, match="lora.target_modules"):
        sweep.job_config(raw)


@pytest.mark.parametrize("launcher", sorted(p.stem for p in (REPO_ROOT / "conf/hydra/launcher").glob("*.yaml")))
def test_launcher_configs_compose_with_their_plugin(launcher: str):
    """Each shipped launcher config composes against the installed Hydra plugin it extends."""
    import importlib.util

    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    if launcher == "ray_cluster" and importlib.util.find_spec("hydra_plugins.hydra_ray_launcher") is None:
        pytest.skip("hydra-ray-launcher is the unlocked `cluster` extra: pip install -e .[cluster]")

    with initialize_config_dir(config_dir=str(REPO_ROOT / "conf"), version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=[f"hydra/launcher={launcher}"], return_hydra_config=True)
    target = cfg.hydra.launcher._target_
    assert target.startswith("hydra_plugins.")
    module, cls = target.rsplit(".", 1)
    __import__(module)


def test_search_sweeper_maximises_accuracy():
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO_ROOT / "conf"), version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=["hydra/sweeper=search"], return_hydra_config=True)
    assert cfg.hydra.sweeper._target_.endswith("OptunaSweeper")
    assert cfg.hydra.sweeper.direction == "maximize"


def test_objective_follows_the_builder_precision():
    # evaluate writes the built model's metrics under `{builder.precision}_onnx`: a sweep over builders
    # must read fp32_onnx for an fp32 job (it read int4_onnx and crashed with a KeyError).
    int4 = {"int4_onnx": {"accuracy": 0.61}, "merged_pytorch": {"accuracy": 0.62}}
    fp32 = {"fp32_onnx": {"accuracy": 0.64}, "merged_pytorch": {"accuracy": 0.62}}
    for builder, metrics, expected in (("int4_cpu", int4, 0.61), ("fp32_cpu", fp32, 0.64)):
        key = sweep.onnx_metrics_key(compose([f"builder={builder}"]).builder.precision)
        assert sweep.objective(metrics, key) == expected
    with pytest.raises(StageError, match=r"no int4_onnx\.accuracy/exact_match \(models: fp32_onnx, merged_pytorch\)"):
        sweep.objective(fp32, "int4_onnx")
    # A generative job's objective is its built model's exact match (the metric the gate judges).
    answers = {"int4_onnx": {"exact_match": 0.55, "token_f1": 0.7}, "merged_pytorch": {"exact_match": 0.56}}
    assert sweep.objective(answers, "int4_onnx") == 0.55


def test_summary_of_a_sweep_over_builders_ranks_each_job_by_its_own_model(tmp_path: Path):
    fp32 = _result("s-0", 0.0, 0.62)
    gate = {"verdict": "passed", "gap": -0.02, "tolerance": 0.02}
    fp32["metrics"] = {"fp32_onnx": {"accuracy": 0.64}, "merged_pytorch": {"accuracy": 0.62}, "gate": gate}
    fp32.update(objective=0.64, objective_model="fp32_onnx")
    int4 = _result("s-1", 0.58, 0.62)
    int4["objective_model"] = "int4_onnx"
    sweep.write_json(tmp_path / "0" / sweep.RESULT_FILE, fp32)
    sweep.write_json(tmp_path / "1" / sweep.RESULT_FILE, int4)
    rows = [line for line in sweep.summarise(tmp_path).splitlines() if "| s-" in line]
    assert rows[0].startswith("| ★ | s-0 ") and "| 0.6400 | fp32_onnx | 0.6200 | passed (-2.0 pts) |" in rows[0]
    assert rows[1].startswith("|  | s-1 ") and "| 0.5800 | int4_onnx | 0.6200 | passed (+4.0 pts) |" in rows[1]


def test_the_pick_is_the_best_job_the_gate_passed_and_refusals_are_listed(tmp_path: Path):
    jobs = [
        _result("s-0", 0.80, 0.90, "refused"),  # the highest accuracy, 10 points below its merged model
        _result("s-1", 0.70, 0.71),
        _result("s-2", 0.75, 0.90, "loose"),  # passed only a tolerance past the bound
        _result("s-3", 0.60, 0.60),
    ]
    for i, job in enumerate(jobs):
        sweep.write_json(tmp_path / str(i) / sweep.RESULT_FILE, job)
    rows = [line for line in sweep.summarise(tmp_path).splitlines() if "| s-" in line]
    assert [row.split(" | ")[1] for row in rows] == ["s-0", "s-2", "s-1", "s-3"]  # by accuracy, all listed
    assert rows[0].startswith("|  | s-0 ") and "| refused (+10.0 pts) |" in rows[0]
    assert rows[2].startswith("| ★ | s-1 ")
    assert sweep.best(sweep.collect(tmp_path))["name"] == "s-1"
    assert sweep.failed(sweep.collect(tmp_path)) == []  # a refusal is a result, not a failure
    assert sweep.best([_result("s-0", 0.8, 0.9, "refused")]) is None


def test_family_is_the_default_two_ranks_two_seeds_and_the_data_without_its_first_percent(tmp_path: Path):
    data = tmp_path / "tones.jsonl"
    data.write_text("".join(f'{{"phrase": "p{i}", "tone": "Joy"}}\n' for i in range(250)))
    members = sweep.family(str(data))
    names = [m[0] for m in members]
    assert names == ["default", "lora.r=4", "lora.r=8", sweep.WITHOUT_FIRST_1PCT, "seed=1", "seed=2"]
    name, overrides, files = members[3]
    ((variant, text),) = files.items()
    assert overrides == [f"data.path={variant}"] and variant != str(data)
    lines = text.splitlines()
    assert len(lines) == 247 and lines[0] == '{"phrase": "p3", "tone": "Joy"}'  # 1 % of 250, rounded up: 3
    assert all(not m[2] for i, m in enumerate(members) if i != 3)
    for _, overrides, _ in members:  # each a valid config
        compose(overrides)


def test_an_interrupted_job_ends_the_stages_dvc_started(tmp_path: Path):
    """Killing a sweep or bench-family must not leave a job's training running, orphaned (it did: a stage
    kept both cores busy for half an hour after its sweep was stopped)."""
    import os
    import signal
    import time

    pid_file = tmp_path / "child.pid"

    def interrupt(*_):
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, 1.0)
    try:
        with pytest.raises(KeyboardInterrupt):
            sweep._run_group(["sh", "-c", f"sleep 60 & echo $! > {pid_file}; wait"], stdout=subprocess.DEVNULL)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    child = int(pid_file.read_text())
    for _ in range(50):
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    raise AssertionError(f"the job's child {child} outlived the interrupted job")
