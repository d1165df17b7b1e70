"""Stage outputs do not depend on the folder the repo lives in (slmkit.files.workspace_relative)."""

from __future__ import annotations

import json
from pathlib import Path

from slmkit.files import TEXT_MAX_BYTES, atomic_dir


def test_paths_into_the_workspace_become_relative_when_an_output_is_committed(tmp_path: Path, monkeypatch):
    ws = tmp_path / "clone"
    ws.mkdir()
    monkeypatch.chdir(ws)
    base = ws.resolve() / "artifacts/base/model"
    elsewhere = "/opt/models/base"  # outside the workspace: kept as given
    with atomic_dir(Path("artifacts/train")) as out:
        (out / "adapter").mkdir()
        # What PEFT writes: the base model's absolute path, in its config and its model card.
        config = {"base_model_name_or_path": str(base), "other": elsewhere}
        (out / "adapter/adapter_config.json").write_text(json.dumps(config))
        (out / "adapter/README.md").write_text(f"---\nbase_model: {base}\n---\n")
        (out / "weights.bin").write_bytes(str(base).encode())  # not a text file: never rewritten
    adapter = Path("artifacts/train/adapter")
    assert json.loads((adapter / "adapter_config.json").read_text()) == {
        "base_model_name_or_path": "artifacts/base/model",
        "other": elsewhere,
    }
    assert (adapter / "README.md").read_text() == "---\nbase_model: artifacts/base/model\n---\n"
    assert Path("artifacts/train/weights.bin").read_bytes() == str(base).encode()


def test_two_clones_write_the_same_bytes(tmp_path: Path, monkeypatch):
    outputs = []
    for name in ("a", "b/deeper"):
        ws = tmp_path / name
        ws.mkdir(parents=True)
        monkeypatch.chdir(ws)
        with atomic_dir(Path("out")) as out:
            (out / "record.json").write_text(json.dumps({"model": str(ws.resolve() / "artifacts/base/model")}))
            # Large files are not scanned (weights, tokenizers): only small text records carry paths.
            (out / "big.json").write_text(" " * (TEXT_MAX_BYTES + 1))
        outputs.append((ws / "out/record.json").read_bytes())
    assert outputs[0] == outputs[1] == b'{"model": "artifacts/base/model"}'


def test_tokenizer_configs_lose_how_they_were_loaded(tmp_path: Path, monkeypatch):
    """transformers records local_files_only (it follows HF_HUB_OFFLINE) in tokenizer_config.json."""
    monkeypatch.chdir(tmp_path)
    written = []
    for offline in (True, False):
        with atomic_dir(Path("base")) as out:
            (out / "model").mkdir()
            config = {"eos_token": "<|im_end|>", "is_local": True, "local_files_only": offline}
            (out / "model/tokenizer_config.json").write_text(json.dumps(config))
        written.append(json.loads((tmp_path / "base/model/tokenizer_config.json").read_text()))
    assert written[0] == written[1] == {"eos_token": "<|im_end|>", "is_local": True}
