"""The scale-out paths that cannot run here are checked on paper: configs parse and point at real things."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_olive_has_no_azureml_system():
    """Why docs/scaling.md sends Azure ML users to a container job: Olive 0.13 dropped its AzureML system."""
    from olive.systems.common import SystemType

    assert "AzureML" not in {t.value for t in SystemType}
    assert {"LocalSystem", "Docker"} <= {t.value for t in SystemType}


def test_azureml_job_runs_a_make_target_in_the_image():
    job = yaml.safe_load((REPO_ROOT / "docker" / "azureml-job.yml").read_text())
    assert job["type"] == "command" and job["compute"].startswith("azureml:")
    command = job["command"]
    target = re.match(r"make (\S+)", command).group(1)
    makefile = (REPO_ROOT / "Makefile").read_text()
    assert re.search(rf"^{target}:", makefile, re.M), f"make {target} does not exist"
    dockerfile = (REPO_ROOT / "docker" / "Dockerfile").read_text()
    venv = re.search(r"VENV=(\S+)", command).group(1)
    assert f"VENV={venv}" in dockerfile or f"VENV {venv}" in dockerfile, "the job's VENV is not the image's"
    assert "${{inputs.dvc_cache}}" in command and "dvc_cache" in job["inputs"]


@pytest.mark.parametrize("preset", ["phi3_mini_tones", "phi3_mini_tones_qlora"])
def test_gpu_presets_target_cuda(preset: str):
    from slmkit.config import compose

    cfg = compose([f"experiment={preset}"])
    assert cfg.builder.execution_provider == "cuda" and cfg.train.torch_dtype == "bfloat16"


def test_random_weights_of_a_layout_build_and_load(tmp_path: Path, tiny_tokenizer):
    """model.source=random: the layout from model.architecture with random weights (GPU tests, benchmarks)."""
    from transformers import AutoModelForCausalLM

    from slmkit import arch
    from slmkit.config import compose

    small = {
        "model_type": "phi3",
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 3000,
        "max_position_embeddings": 256,
        "tie_word_embeddings": False,
    }
    overrides = ["model=phi3_mini_4k", "model.source=random", "model.architecture=null"]
    cfg = compose(overrides + [f"+model.architecture.{k}={v}" for k, v in small.items()])
    n = arch.build_random(cfg.model, tiny_tokenizer, 42, tmp_path)
    assert n == arch.check(cfg)["parameters"]
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert model.config.num_key_value_heads == 2 and model.config.eos_token_id == tiny_tokenizer.eos_token_id
    ids = tiny_tokenizer("a phrase", return_tensors="pt").input_ids
    assert model.generate(ids, max_new_tokens=2, do_sample=False).shape[1] == ids.shape[1] + 2


def test_random_source_needs_a_layout():
    from slmkit.config import ConfigError, compose

    with pytest.raises(ConfigError, match="model.architecture"):
        compose(["experiment=tiny", "model.source=random"])  # the tiny model config has no architecture block
