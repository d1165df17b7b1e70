"""Slow tier: content addressing. A stage that reruns and writes the same bytes changes nothing downstream,
and two fresh copies of the repo record the same dvc.lock (no time, commit or host inside an output)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from workspace import copy_repo, make, run

pytestmark = pytest.mark.slow


def _lock(ws: Path) -> dict:
    return yaml.safe_load((ws / "dvc.lock").read_text(encoding="utf-8"))["stages"]


def test_a_forced_rerun_with_the_same_output_reruns_nothing_downstream(private_run: Path, tmp_path: Path):
    # prepare, the cheapest stage, with base downstream of it.
    first = private_run
    before = _lock(first)
    run_before = json.loads((first / "artifacts/runs/prepare/run.json").read_text())

    forced = run(["dvc", "repro", "--force", "prepare"], first)
    assert "Running stage 'prepare'" in forced.stdout, forced.stdout
    assert _lock(first) == before  # same output hash: dvc.lock does not move
    after = run(["dvc", "repro", "base"], first).stdout
    assert "Running stage 'base'" not in after and "'base' didn't change" in after, after
    # The run record is the forced run's and still belongs to the output; lineage shows its commit.
    run_after = json.loads((first / "artifacts/runs/prepare/run.json").read_text())
    assert run_after["lineage_sha256"] == run_before["lineage_sha256"] and run_after["git_commit"]
    shown = run(["python", "-m", "slmkit.cli", "lineage", "artifacts/base"], first).stdout
    assert f"git {run_after['git_commit'][:12]}" in shown and "no run record" not in shown

    # A second fresh copy (another commit, another time) records the same dvc.lock for the same inputs.
    second = copy_repo(tmp_path / "second")
    make("base", second)
    # (The copy's other dvc.lock entries are the committed ones of the repo, not run here.)
    ran = ("prepare", "base")
    assert {s: _lock(second)[s] for s in ran} == {s: before[s] for s in ran}
