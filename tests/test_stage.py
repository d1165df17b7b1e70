"""Stage plumbing: user mistakes end in one clear message (no traceback); Olive failures fail the stage."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from slmkit.config import compose, to_yaml
from slmkit.olive_run import require
from slmkit.paths import stage_dir
from slmkit.stage import StageError

REPO_ROOT = Path(__file__).resolve().parents[1]


def _prepare_in(tmp_path: Path, data_lines: list[str], *overrides: str) -> subprocess.CompletedProcess:
    (tmp_path / "data.jsonl").write_text("\n".join(data_lines) + "\n", encoding="utf-8")
    cfg = compose([f"data.path={tmp_path / 'data.jsonl'}", *overrides])
    (tmp_path / "params.yaml").write_text(to_yaml(cfg), encoding="utf-8")
    return subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "prepare.py")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_bad_data_fails_prepare_with_file_and_line_not_a_traceback(tmp_path: Path):
    result = _prepare_in(tmp_path, ['{"phrase": "fine", "tone": "Joy"}', '{"phrase": "oops", "tone": "Angry"}'])
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert f"{tmp_path / 'data.jsonl'}:2" in result.stderr
    assert "unknown label 'Angry'" in result.stderr
    assert not (tmp_path / "artifacts" / "prepare").exists(), "nothing half-written"


def test_prepare_writes_splits_and_manifest(tmp_path: Path):
    labels = compose().data.labels
    lines = [json.dumps({"phrase": f"phrase number {i} about {lab}", "tone": lab}) for lab in labels for i in range(20)]
    lines.append(lines[0])  # an exact repeat
    result = _prepare_in(tmp_path, lines)
    assert result.returncode == 0, result.stderr
    manifest = json.loads((tmp_path / "artifacts/prepare/manifest.json").read_text())
    assert manifest["repeats_dropped"] == 1
    assert manifest["examples"] == 20 * len(labels)
    assert sum(s["count"] for s in manifest["splits"].values()) == manifest["examples"]
    assert "dropped 1 exact repeat" in result.stderr
    # prepare never imports PyTorch (~1 s a process), not even to say in its run record which GPU it did not use.
    device = json.loads((tmp_path / "artifacts/runs/prepare/run.json").read_text())["device"]
    assert device["machine"] and "gpu" not in device and "cuda" not in device


def test_prepare_truncates_long_phrases_when_configured_and_counts_them(tmp_path: Path):
    labels = compose().data.labels
    lines = [json.dumps({"phrase": f"phrase number {i} about {lab}", "tone": lab}) for lab in labels for i in range(20)]
    lines[0] = json.dumps({"phrase": "a very long phrase " * 10, "tone": labels[0]})
    lines[1] = json.dumps({"phrase": "another long phrase " * 10, "tone": labels[0]})
    result = _prepare_in(tmp_path, lines, "data.max_chars=60", "data.on_too_long=truncate")
    assert result.returncode == 0, result.stderr
    manifest = json.loads((tmp_path / "artifacts/prepare/manifest.json").read_text())
    assert manifest["truncated"] == 2 and manifest["examples"] == 20 * len(labels)
    assert "truncated 2 phrase(s) to data.max_chars=60" in result.stderr
    splits = [(tmp_path / f"artifacts/prepare/{f}.jsonl").read_text() for f in ("train", "val", "test")]
    texts = [json.loads(line)["text"] for text in splits for line in text.splitlines()]
    assert max(map(len, texts)) <= 60


def test_missing_params_is_a_clear_error(tmp_path: Path):
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "prepare.py")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert "params.yaml not found" in result.stderr and "make params" in result.stderr
    assert "Traceback" not in result.stderr


def test_require_fails_when_olive_produced_nothing_and_quotes_the_log(tmp_path: Path):
    log = tmp_path / "olive.log"
    log.write_text(
        "2026 olive.engine INFO: running pass\n"
        "2026 olive.engine ERROR: Pass ModelBuilder failed: vocab size mismatch\n"
        "2026 olive.engine INFO: done\n"
    )
    (tmp_path / "empty.onnx").write_bytes(b"")
    with pytest.raises(StageError) as err:
        require([tmp_path / "model.onnx", tmp_path / "empty.onnx"], "ModelBuilder int4", log)
    msg = str(err.value)
    assert "model.onnx" in msg and "empty.onnx" in msg
    assert "vocab size mismatch" in msg
    assert str(log) in msg


def test_require_passes_when_outputs_exist(tmp_path: Path):
    (tmp_path / "model.onnx").write_bytes(b"x")
    require([tmp_path / "model.onnx"], "ModelBuilder", tmp_path / "olive.log")


def test_lineage_record_carries_data_split_and_config_hashes():
    from slmkit import lineage

    cfg = compose()
    manifest = {"source": {"path": "d", "sha256": "a" * 64}, "splits": {"train": {"sha256": "b" * 64}}}
    rec = lineage.record("train", cfg, ("lora", "train"), manifest)
    assert rec["data_sha256"] == "a" * 64
    assert rec["split_sha256"] == {"train": "b" * 64}
    assert (
        rec["config_sha256"]
        != lineage.record("train", compose(["lora.r=4"]), ("lora", "train"), manifest)["config_sha256"]
    )
    assert rec["packages"]["olive-ai"] and rec["python"]
    manifest["splits"]["train"]["count"] = 10
    base = {"source": "tiny", "parameters": 1234, "vocab_size": 99}
    card = lineage.model_card(cfg, base, manifest, {"loss": "0.5", "eval_loss": "0.9"}, rec)
    assert f"r={cfg.lora.r}" in card and "a" * 64 in card and "train 10" in card and "1,234 parameters" in card
    assert cfg.data.template in card
    qlora = compose(["lora=qlora"])  # no module list: Olive adapts every 4-bit linear layer
    card = lineage.model_card(qlora, base, manifest, {"loss": "0.5", "eval_loss": "0.9"}, rec)
    assert "qlora" in card and "every 4-bit linear layer" in card


def test_lineage_record_holds_no_volatile_fact(monkeypatch):
    # lineage.json lives inside a DVC-tracked output: a rerun at another time, commit or host that writes
    # the same weights must write the same bytes, or DVC reruns everything downstream.
    from slmkit import lineage

    manifest = {"source": {"path": "d", "sha256": "a" * 64}, "splits": {"train": {"sha256": "b" * 64}}}
    first = lineage.record("train", compose(), ("lora", "train"), manifest)
    monkeypatch.setattr(lineage, "_git", lambda *args: "f" * 40)  # another commit, a dirty tree
    monkeypatch.setattr(lineage.platform, "node", lambda: "another-host")
    assert lineage.record("train", compose(), ("lora", "train"), manifest) == first
    assert not {"created", "git_commit", "git_dirty", "host", "device"} & first.keys()


def test_run_record_names_the_output_it_describes(tmp_path: Path, monkeypatch):
    from slmkit import lineage

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(lineage, "_git", lambda *args: "c0ffee" * 6 + "abcd" if args[0] == "rev-parse" else "")
    manifest = {"source": {"path": "d", "sha256": "a" * 64}, "splits": {"train": {"sha256": "b" * 64}}}
    out = stage_dir("prepare")
    out.mkdir(parents=True)
    lineage.write(out, "prepare", compose(), ("seed", "data"), manifest)
    run = lineage.write_run("prepare", 1_700_000_000.0, 1_700_000_012.5)
    assert run["git_commit"].startswith("c0ffee") and run["seconds"] == 12.5 and run["git_dirty"] is False
    assert (tmp_path / "artifacts/runs/prepare/run.json").is_file()
    [rec] = lineage.chain(out)
    assert rec["run"] == run
    assert "2023-11-14T22:13:32+00:00  git c0ffeec0ffee" in lineage.format_chain([rec])
    # DVC restored another output (other stable facts) from its cache: this run record is not its own.
    (out / "lineage.json").write_text((out / "lineage.json").read_text().replace("a" * 64, "9" * 64))
    [rec] = lineage.chain(out)
    assert rec["run"] is None
    assert "no run record here" in lineage.format_chain([rec]) and "c0ffee" not in lineage.format_chain([rec])


def test_model_card_carries_no_commit_or_time():
    from slmkit import lineage

    manifest = {"source": {"path": "d", "sha256": "a" * 64}, "splits": {"train": {"sha256": "b" * 64, "count": 3}}}
    rec = lineage.record("quantize", compose(), ("builder",), manifest)
    base = {"source": "tiny", "parameters": 1234, "vocab_size": 99}
    card = lineage.model_card(compose(), base, manifest, {"loss": "0.5", "eval_loss": "0.9"}, rec)
    assert rec["config_sha256"] in card and "make lineage" in card
    assert card == lineage.model_card(compose(), base, manifest, {"loss": "0.5", "eval_loss": "0.9"}, rec)


def test_adapter_config_is_written_the_same_whatever_the_set_order(tmp_path: Path):
    from slmkit.olive_run import canonical_adapter_config

    written = []
    for order in (["qkv_proj", "o_proj", "lm_head"], ["lm_head", "qkv_proj", "o_proj"]):
        folder = tmp_path / str(len(written))
        folder.mkdir()
        config = {"r": 16, "target_modules": order, "modules_to_save": None, "peft_type": "LORA"}
        (folder / "adapter_config.json").write_text(json.dumps(config))
        canonical_adapter_config(folder)
        written.append((folder / "adapter_config.json").read_bytes())
    assert written[0] == written[1]
    assert json.loads(written[0]) == {
        "r": 16,
        "target_modules": ["lm_head", "o_proj", "qkv_proj"],
        "modules_to_save": None,
        "peft_type": "LORA",
    }


def test_a_signal_turned_into_another_exception_still_ends_the_stage_as_interrupted(tmp_path: Path):
    """SIGINT inside a library's cleanup can surface as another exception (omegaconf's flag_override raised an
    AttributeError); the stage still exits 130 with its one line, not a traceback."""
    script = tmp_path / "stage.py"
    script.write_text(
        "import os, signal\n"
        "from slmkit.stage import main\n"
        "def body():\n"
        "    try:\n"
        "        os.kill(os.getpid(), signal.SIGINT)\n"
        "    except BaseException:\n"
        "        raise AttributeError(\"'NoneType' object has no attribute '_invalidate_flags_cache'\")\n"
        "main('report', body)\n"
    )
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 130, result.stderr
    assert "slmkit report: error: interrupted by SIGINT" in result.stderr
    assert "Traceback" not in result.stderr
