"""Faults at unit and single-stage level: signals, a full disk, secrets, resource checks, the run lock.

Each test runs the real code (stage.main, atomic_dir, scripts/prepare.py or scripts/merge.py in a
temporary workspace) and checks both the message a user sees and that nothing was lost. The whole
pipeline under the same faults is in tests/test_faults_pipeline.py (slow tier).
"""

from __future__ import annotations

import json
import os
import re
import resource
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from slmkit import olive_config, resources
from slmkit.config import compose, to_yaml
from slmkit.files import atomic_dir
from slmkit.paths import ARTIFACTS
from slmkit.redact import redact
from slmkit.runlock import BUSY_EXIT
from slmkit.stage import StageError

REPO_ROOT = Path(__file__).resolve().parents[1]
FAKE_TOKEN = "hf_" + "Zq8" * 12  # looks like a Hugging Face token; never a real one


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("HF_TOKEN", None)
    env.update(extra)
    return env


def _workspace(tmp_path: Path, *overrides: str) -> Path:
    """A folder with params.yaml for the shipped data (absolute path), where stage scripts can run."""
    cfg = compose([f"data.path={REPO_ROOT / 'data' / 'tones.jsonl'}", *overrides])
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "params.yaml").write_text(to_yaml(cfg), encoding="utf-8")
    return tmp_path


def _prepare(ws: Path, limit_bytes: int | None = None, **env: str) -> subprocess.CompletedProcess:
    def limit() -> None:
        if limit_bytes is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    return subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "prepare.py")],
        cwd=ws,
        capture_output=True,
        text=True,
        timeout=120,
        env=_env(**env),
        preexec_fn=limit,
    )


# --- signals: the stage unwinds, its output folder stays the previous complete one ---------------

STAND_IN = textwrap.dedent(
    """
    import sys, time
    from slmkit.files import atomic_dir
    from slmkit.paths import stage_dir
    from slmkit.stage import main

    def run():
        with atomic_dir(stage_dir("train")) as out:
            (out / "half-written.bin").write_bytes(b"x" * 1000)
            print("writing", flush=True)
            time.sleep(60)

    main("train", run)
    """
)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=lambda s: s.name)
def test_signal_during_a_stage_keeps_the_previous_output_and_says_so(tmp_path: Path, sig: signal.Signals):
    previous = tmp_path / "artifacts" / "train"
    previous.mkdir(parents=True)
    (previous / "adapter.bin").write_bytes(b"complete")
    proc = subprocess.Popen(
        [sys.executable, "-c", STAND_IN], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "writing"
    assert list((tmp_path / "artifacts").glob(".train.tmp-*")), "the stage was not writing yet"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 128 + sig
    assert f"slmkit train: error: interrupted by {sig.name}" in err
    assert "artifacts/train/ is unchanged" in err and "Traceback" not in err
    assert sorted(p.name for p in (tmp_path / "artifacts").iterdir()) == ["train"], "temp folder left behind"
    assert _tree(previous) == {"adapter.bin": b"complete"}


SWALLOWING_STAND_IN = textwrap.dedent(
    """
    import time
    from slmkit.files import atomic_dir
    from slmkit.paths import stage_dir
    from slmkit.stage import main

    def run():
        with atomic_dir(stage_dir("train")) as out:
            try:  # a library that catches everything, as Olive does around `import onnxruntime`
                print("writing", flush=True)
                time.sleep(60)
            except BaseException:
                pass
            (out / "adapter.bin").write_bytes(b"made after the signal")

    main("train", run)
    """
)


def test_a_signal_swallowed_by_a_library_still_stops_the_commit(tmp_path: Path):
    previous = tmp_path / "artifacts" / "train"
    previous.mkdir(parents=True)
    (previous / "adapter.bin").write_bytes(b"complete")
    proc = subprocess.Popen(
        [sys.executable, "-c", SWALLOWING_STAND_IN],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "writing"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 128 + signal.SIGINT, err
    assert "interrupted by SIGINT" in err and "Traceback" not in err
    assert _tree(previous) == {"adapter.bin": b"complete"}
    assert sorted(p.name for p in (tmp_path / "artifacts").iterdir()) == ["train"]


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_after_sigkill_the_next_run_removes_the_leftover_temp_folder(tmp_path: Path):
    final = tmp_path / "artifacts" / "train"
    final.mkdir(parents=True)
    (final / "adapter.bin").write_bytes(b"complete")
    leftover = final.with_name(f".train.tmp-{_dead_pid()}")  # what SIGKILL mid-write leaves
    leftover.mkdir()
    (leftover / "half.bin").write_bytes(b"half")
    mine = final.with_name(f".train.tmp-{os.getppid()}")  # a live process's temp folder is left alone
    mine.mkdir()
    with atomic_dir(final) as out:
        assert not leftover.exists()
        (out / "adapter.bin").write_bytes(b"new")
    assert _tree(final) == {"adapter.bin": b"new"}
    assert mine.exists()


def test_after_sigkill_between_the_two_renames_the_previous_output_comes_back(tmp_path: Path):
    final = tmp_path / "artifacts" / "train"
    old = final.with_name(f".train.old-{_dead_pid()}")  # killed after moving final aside, before moving in
    old.mkdir(parents=True)
    (old / "adapter.bin").write_bytes(b"complete")
    with pytest.raises(RuntimeError), atomic_dir(final):
        assert _tree(final) == {"adapter.bin": b"complete"}, "previous output not restored"
        raise RuntimeError("this run fails too")
    assert _tree(final) == {"adapter.bin": b"complete"}
    assert sorted(p.name for p in final.parent.iterdir()) == ["train"]


# --- out of disk: no partial output, one clear message --------------------------------------------


def test_out_of_disk_during_prepare_leaves_the_previous_output(tmp_path: Path):
    ws = _workspace(tmp_path)
    assert _prepare(ws).returncode == 0
    before = _tree(ws / "artifacts" / "prepare")
    # The file size limit makes every write past 8 kB fail with EFBIG, as a full disk fails with ENOSPC.
    result = _prepare(ws, limit_bytes=8192)
    assert result.returncode == 1
    assert "slmkit prepare: error: out of disk space" in result.stderr, result.stderr
    assert "File too large" in result.stderr and "Free some space" in result.stderr
    assert "artifacts/prepare/ is unchanged" in result.stderr
    assert "Traceback" not in result.stderr
    assert _tree(ws / "artifacts" / "prepare") == before
    # runs/: the first prepare's run record (time, commit), kept outside the output.
    assert sorted(p.name for p in (ws / "artifacts").iterdir()) == ["prepare", "runs"], "temp folder left behind"


def test_out_of_disk_on_a_first_run_leaves_no_output(tmp_path: Path):
    result = _prepare(_workspace(tmp_path), limit_bytes=8192)
    assert result.returncode == 1 and "out of disk space" in result.stderr
    assert list((tmp_path / "artifacts").iterdir()) == []


@pytest.fixture
def small_filesystem(tmp_path: Path):
    """A real 1 MB filesystem (tmpfs), where mounting is allowed (root); skipped elsewhere."""
    mount = tmp_path / "fs"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_disk_full_during_prepare_on_a_real_small_filesystem(small_filesystem: Path):
    ws = _workspace(small_filesystem)
    assert _prepare(ws).returncode == 0
    before = _tree(ws / "artifacts" / "prepare")
    free = os.statvfs(ws).f_bavail * os.statvfs(ws).f_frsize
    (ws / "filler").write_bytes(b"\0" * (free - 16384))  # leave 16 kB: the splits need more
    result = _prepare(ws)
    assert result.returncode == 1
    assert "slmkit prepare: error: out of disk space (No space left on device" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert _tree(ws / "artifacts" / "prepare") == before
    # runs/: the first prepare's run record (time, commit), kept outside the output.
    assert sorted(p.name for p in (ws / "artifacts").iterdir()) == ["prepare", "runs"], "temp folder left behind"


# --- secrets: never in logs, messages or lineage ---------------------------------------------------


def test_redact_hides_secret_env_values_and_hub_tokens(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "tok-abc-123456")
    monkeypatch.setenv("MY_API_KEY", "key-987654321")
    monkeypatch.setenv("HOME_DIR", "/home/not-a-secret")
    text = f"auth tok-abc-123456 key key-987654321 token {FAKE_TOKEN} home /home/not-a-secret"
    assert redact(text) == "auth *** key *** token *** home /home/not-a-secret"


def test_secrets_never_reach_stage_logs_errors_or_lineage(tmp_path: Path):
    ws = _workspace(tmp_path)
    leak = textwrap.dedent(
        """
        import logging, os, sys
        from slmkit.stage import StageError, main

        own = logging.getLogger("somelib")  # a library logging through its own handler, not the root's
        own.addHandler(logging.StreamHandler(sys.stderr))
        own.propagate = False

        def run():
            logging.getLogger("olive.engine").info("using token %s", os.environ["HF_TOKEN"])
            own.warning("somelib sends %s", os.environ["HF_TOKEN"])
            raise StageError(f"hub refused token {os.environ['HF_TOKEN']}")

        main("base", run)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", leak], cwd=ws, capture_output=True, text=True, timeout=60, env=_env(HF_TOKEN=FAKE_TOKEN)
    )
    assert result.returncode == 1
    assert "using token ***" in result.stderr and "hub refused token ***" in result.stderr
    assert "somelib sends ***" in result.stderr
    assert FAKE_TOKEN not in result.stdout + result.stderr
    ok = _prepare(ws, HF_TOKEN=FAKE_TOKEN, HUGGING_FACE_HUB_TOKEN=FAKE_TOKEN)
    assert ok.returncode == 0, ok.stderr
    assert FAKE_TOKEN not in ok.stdout + ok.stderr
    for path in (ws / "artifacts").rglob("*"):
        if path.is_file():
            assert FAKE_TOKEN.encode() not in path.read_bytes(), path


# --- config paths: inputs may be anywhere, outputs only under the workspace's output folders -------


def test_data_outside_the_workspace_is_read_and_only_artifacts_written(tmp_path: Path):
    outside, ws = tmp_path / "elsewhere", tmp_path / "ws"
    outside.mkdir()
    ws.mkdir()
    data = outside / "data.jsonl"
    data.write_bytes((REPO_ROOT / "data" / "tones.jsonl").read_bytes())
    cfg = compose([f"data.path={ws}/../elsewhere/data.jsonl"])
    (ws / "params.yaml").write_text(to_yaml(cfg), encoding="utf-8")
    before_outside = _tree(outside)
    assert _prepare(ws).returncode == 0
    assert _tree(outside) == before_outside, "prepare wrote beside its input"
    written = {p.relative_to(ws).parts[0] for p in ws.rglob("*") if p.is_file()}
    assert written == {"params.yaml", "artifacts"}


def test_every_tool_output_folder_is_under_artifacts(tmp_path: Path):
    cfg = compose()
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text('{"target_modules": ["q_proj"]}')
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "config.json").write_text('{"num_hidden_layers": 2}')
    workflows = [
        olive_config.train_workflow(cfg, "base", Path("t.jsonl"), Path("v.jsonl"), ARTIFACTS / ".olive-train"),
        olive_config.merge_workflow(cfg, "base", "adapter", ARTIFACTS / ".olive-merge"),
        olive_config.quantize_workflow(
            compose(["builder.adapter=merged", "builder.exclude=[]"]), "merged", ARTIFACTS / ".olive-quantize"
        ),
        olive_config.quantize_workflow(cfg, tmp_path / "base", ARTIFACTS / ".olive-quantize", tmp_path / "adapter"),
    ]

    def dirs(node):
        if isinstance(node, dict):
            for key, value in node.items():
                if key.endswith("_dir") and isinstance(value, str):
                    yield key, value
                yield from dirs(value)
        elif isinstance(node, list):
            for value in node:
                yield from dirs(value)

    found = [kv for wf in workflows for kv in dirs(wf)]
    assert len(found) >= 6
    for key, value in found:
        assert Path(value).parts[0] == str(ARTIFACTS) and ".." not in Path(value).parts, (key, value)


def test_trust_remote_code_is_off_unless_the_model_config_turns_it_on(tmp_path: Path):
    assert compose().model.trust_remote_code is False
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "adapter_config.json").write_text('{"target_modules": ["q_proj"]}')
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "config.json").write_text('{"num_hidden_layers": 1}')
    on = compose(["model.trust_remote_code=true"])
    for cfg, expected in ((compose(), False), (on, True)):
        for wf in (
            olive_config.train_workflow(cfg, "b", Path("t"), Path("v"), Path("w")),
            olive_config.merge_workflow(cfg, "b", "a", Path("w")),
            olive_config.quantize_workflow(cfg, tmp_path / "b", Path("w"), tmp_path / "a"),
        ):
            values = re.findall(r'"trust_remote_code": (true|false)', json.dumps(wf))
            assert values and set(values) == {str(expected).lower()}


# --- resources: estimated up front, refused when clearly impossible --------------------------------


def test_parameter_estimate_from_a_config_json_matches_phi3_mini(tmp_path: Path):
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "model_type": "phi3",
                "hidden_size": 3072,
                "intermediate_size": 8192,
                "vocab_size": 32064,
                "num_hidden_layers": 32,
                "num_attention_heads": 32,
                "num_key_value_heads": 32,
                "tie_word_embeddings": False,
            }
        )
    )
    cfg = compose(["model.source=local", f"model.path={tmp_path}", "model.architecture=null"])
    n = resources.parameters(cfg.model, tmp_path)
    assert abs(n - 3_821_079_552) / 3_821_079_552 < 0.001  # Phi-3-mini-4k's published parameter count


def test_resource_check_refuses_what_cannot_fit_and_warns_near_the_limit(caplog):
    with pytest.raises(StageError, match=r"needs about 3000 MB of disk, 1000 MB available on /x: it cannot fit"):
        resources.check("disk", 3_000_000_000, 1_000_000_000, "on /x", "Free disk space.")
    with caplog.at_level("WARNING", logger="slmkit.resources"):
        resources.check("memory", 800_000_000, 1_000_000_000, "on this machine", "Use a smaller model.")
    assert "it may not fit" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="slmkit.resources"):
        resources.check("memory", 100_000_000, 1_000_000_000, "on this machine", "Use a smaller model.")
    assert caplog.text == ""


def test_merge_of_a_model_too_big_for_this_machine_is_refused_before_any_work(tmp_path: Path):
    model = tmp_path / "huge-model"
    model.mkdir()
    sizes = {"hidden_size": 65536, "intermediate_size": 262144, "vocab_size": 256000, "num_hidden_layers": 256}
    (model / "config.json").write_text(json.dumps({"model_type": "phi3", **sizes, "num_attention_heads": 128}))
    ws = _workspace(tmp_path / "ws", "model.source=local", f"model.path={model}", "model.architecture=null")
    (ws / "artifacts" / "base").mkdir(parents=True)
    (ws / "artifacts" / "base" / "base.json").write_text(json.dumps({"model_path": str(model)}))
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "merge.py")],
        cwd=ws,
        capture_output=True,
        text=True,
        timeout=120,
        env=_env(),
    )
    assert result.returncode == 1
    assert re.search(r"slmkit merge: error: needs about \d+ MB of (disk|memory), \d+ MB available", result.stderr)
    assert "it cannot fit" in result.stderr and "Traceback" not in result.stderr
    assert not (ws / "artifacts" / ".olive-merge").exists(), "Olive started anyway"
    assert not (ws / "artifacts" / "merge").exists()


# --- one run per workspace ---------------------------------------------------------------------------


def test_second_run_in_a_workspace_is_refused_and_a_killed_run_leaves_no_lock(tmp_path: Path):
    runlock = [sys.executable, "-m", "slmkit.runlock"]
    first = subprocess.Popen([*runlock, "sleep", "60"], cwd=tmp_path, start_new_session=True)
    lock = tmp_path / ".slmkit.lock"
    deadline = time.monotonic() + 30
    while not (lock.exists() and f"pid {first.pid}" in lock.read_text()):
        assert time.monotonic() < deadline and first.poll() is None, "first run never took the lock"
        time.sleep(0.05)
    second = subprocess.run([*runlock, "touch", "ran"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert second.returncode == BUSY_EXIT
    assert f"another slmkit run holds this workspace (pid {first.pid}, `sleep 60`" in second.stderr
    assert "Nothing was changed" in second.stderr
    assert not (tmp_path / "ran").exists()
    os.killpg(first.pid, signal.SIGKILL)  # the run and its command die without any cleanup
    first.wait()
    third = subprocess.run([*runlock, "touch", "ran"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert third.returncode == 0, third.stderr
    assert (tmp_path / "ran").exists()


def test_run_refuses_while_a_bare_dvc_command_holds_dvcs_lock(tmp_path: Path):
    """A `dvc` command started outside make holds DVC's repo lock (zc.lockfile, as DVC takes it)."""
    (tmp_path / ".dvc" / "tmp").mkdir(parents=True)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import zc.lockfile, time; lock = zc.lockfile.LockFile('.dvc/tmp/lock'); print('held', "
            "flush=True); time.sleep(60)",
        ],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        busy = subprocess.run(
            [sys.executable, "-m", "slmkit.runlock", "touch", "ran"], cwd=tmp_path, capture_output=True, text=True
        )
    finally:
        holder.kill()
        holder.wait()
    assert busy.returncode == BUSY_EXIT
    assert f"a dvc command is running in this workspace (pid {holder.pid}" in busy.stderr
    assert not (tmp_path / "ran").exists()
    after = subprocess.run([sys.executable, "-m", "slmkit.runlock", "touch", "ran"], cwd=tmp_path, timeout=60)
    assert after.returncode == 0 and (tmp_path / "ran").exists()


def test_every_stage_runs_under_the_workspace_lock():
    makefile = (REPO_ROOT / "Makefile").read_text(encoding="utf-8")
    assert "$(RUNLOCK) $(MAKE) --no-print-directory _finetune" in makefile
    assert "$(RUNLOCK) $(MAKE) --no-print-directory _stage STAGE=$@" in makefile
    # The stage targets are dvc.yaml's stages (test_dvc_deps checks make's expansion of STAGES).
    assert re.search(r"^\$\(STAGES\): env", makefile, re.M)


# --- the fault table (docs/troubleshooting.md) names real tests ---------------------------------------


def test_documented_fault_table_rows_are_tests():
    page = (REPO_ROOT / "docs" / "troubleshooting.md").read_text(encoding="utf-8")
    table = page.split("## Faults tried, each a test", 1)[1].split("\n\n", 2)[1]
    rows = [line for line in table.splitlines() if re.match(r"\| \d+b? \|", line)]
    assert len(rows) >= 20
    sources = "\n".join(p.read_text(encoding="utf-8") for p in (REPO_ROOT / "tests").glob("test_*.py"))
    for row in rows:
        names = re.findall(r"`(test_\w+)`", row.rsplit("|", 2)[1])
        assert names, row
        for name in names:
            assert f"def {name}(" in sources, f"docs/troubleshooting.md fault table names {name}, which is not a test"
